"""vLLM worker extension that loads new weights from a shared-memory file.

The rollout server receives weight frames over ZeroMQ and writes them into one file under
/dev/shm; only control (path, tensor layout, version) goes through ``collective_rpc``, which
cannot carry tensors on CPU. The worker maps the file (``FileViews``: the mapping and the
tensor views stay for the next reload of the same file) and feeds views of it to vLLM's
``reload_weights(weights_iterator=...)``: mutating parameters directly does nothing on CPU
because weights are repacked after load.

With ``rollout.cpu_fast_path`` (the default), the CPU workarounds that reach into vLLM 0.32's
internals apply (``climbrl.weights.vllm_cpu.CpuFastPath``, one per worker): a full update of a
dense model packs each linear layer straight from the file, possibly in the background, and
an MoE reload prepacks the experts again as the first load does. Without it every reload is
vLLM's ``reload_weights`` as is.

A reload may carry a subset of the checkpoint tensors (delta and LoRA sync,
``climbrl.weights.codecs``). vLLM 0.32 reloads layer by layer: each vLLM module is re-processed (CPU
repack included) once all of its elements have arrived, and modules that receive nothing keep
their kernel tensors. A module that receives only part of its elements (say q_proj of a packed
qkv_proj) is materialised from empty memory, so a subset must cover whole modules; the rollout
server expands it (``weights.codecs.module_key``). If a reload raises midway, the half-loaded
modules are put back to their previous kernel tensors
(``climbrl.weights.vllm_cpu.abandon_layerwise_reload``), so the server can roll back by
reloading the previous values of every module the failed update touched.

It also hosts climbrl's train = inference capture (``climbrl.rollout.replay``): installing the
MoE routing capture and handing out the per-request top-p/top-k and routing records.

Enabled with ``AsyncEngineArgs(worker_extension_cls="climbrl.rollout.worker_ext.WeightReceiver")``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from climbrl.weights.vllm_cpu import CpuFastPath, UnfitForShortPath, abandon_layerwise_reload

log = logging.getLogger("climbrl.rollout.worker_ext")

_DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
Layout = tuple[tuple[str, str, tuple[int, ...], int], ...]


class WeightReceiver:
    """Mixed into vLLM's worker class; methods are called through ``collective_rpc``."""

    def _climbrl(self) -> tuple[FileViews, CpuFastPath]:
        """This worker's file mappings and CPU fast path, made on first use (vLLM builds the
        worker; the mixin has no constructor of its own)."""
        got = self.__dict__.get("_climbrl_weights")
        if got is None:
            got = self.__dict__["_climbrl_weights"] = (FileViews(), CpuFastPath())
        return got

    def climbrl_load_weights(
        self,
        path: str,
        layout: list[tuple[str, str, list[int], int]],
        full: bool = False,
        defer: bool = False,
        fast: bool = True,
    ) -> tuple[float, str]:
        """Reload from ``path``; ``layout`` is (name, dtype, shape, byte offset) per tensor.
        ``full``: the layout holds every tensor of the checkpoint (a full sync), which a dense
        model on CPU loads by the fast path (``CpuFastPath.full_reload``). ``defer``: the
        caller leaves the file unchanged until its next call here, so that path may finish
        packing in the background. ``fast``: ``rollout.cpu_fast_path``. Returns the seconds
        taken and the path taken: "cpu_full", or "vllm" for vLLM's ``reload_weights``."""
        t0 = time.perf_counter()
        files, cpu = self._climbrl()
        cpu.settle()  # the last update's background packing reads the last file
        key: Layout = tuple((name, dtype, tuple(shape), off) for name, dtype, shape, off in layout)
        weights = files.views(path, key)

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if fast and full and cpu.supports_full(model):
            try:
                cpu.full_reload(model, weights, defer, key)
                return time.perf_counter() - t0, "cpu_full"
            except UnfitForShortPath as e:  # this model's loader does not fit: vLLM's way
                log.warning(
                    "short CPU reload does not fit this model (%s); full updates go "
                    "through vLLM's reload_weights from now on",
                    e,
                )
                model._climbrl_full_reload_ok = False
        model.__dict__.pop("_climbrl_plans", None)  # vLLM's reload may make new parameters
        if fast:
            cpu.repack_moe_on_reload(model)
        quiet = _QuietPartialReload()
        try:
            self.model_runner.reload_weights(weights_iterator=iter(weights))  # type: ignore[attr-defined]
        except BaseException:
            abandon_layerwise_reload(self.model_runner)  # type: ignore[attr-defined]
            raise
        finally:
            quiet.close()
        return time.perf_counter() - t0, "vllm"

    def climbrl_start_repack(self) -> None:
        """Start the background packing the last reload left (``CpuFastPath.repack_later``),
        unless the engine's first use of a layer since has started it. The server calls this
        shortly after its ack: started with the reload, the helper would compete for the CPU
        with the rest of the update (the reply, the resume, the ack's way to the learner)."""
        self._climbrl()[1].start_repack()

    def climbrl_param_digest(self) -> dict[str, str]:
        """sha256 of each parameter's bytes as the engine holds them (packed layouts
        included), by name: two engines agree exactly when they compute with the same
        weights (``WeightManifest.digest``; tests compare a synced engine with a fresh one)."""
        import hashlib

        self._climbrl()[1].settle()
        out = {}
        with torch.no_grad():
            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            for name, p in model.named_parameters():
                t = p.detach().contiguous().cpu().reshape(-1)
                out[name] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
        return out

    def climbrl_install_capture(self, routing: bool) -> dict[str, Any]:
        """Bind the MoE routing capture (when ``routing`` and the model is MoE)."""
        from climbrl.rollout.replay import install_capture

        return install_capture(self, routing)

    def climbrl_take_replay(self, key: str) -> dict[str, Any]:
        """Pop a finished request's keep counts and routed experts (bytes, not tensors)."""
        from climbrl.rollout.replay import take_record

        return take_record(key)


class FileViews:
    """The worker's mappings of weights files, and the tensor views of each layout in them.

    A mapping is kept for the next reload from the same file: the learner rewrites its ring
    files in place and the server its staging file, so the pages stay mapped from one update
    to the next instead of being faulted in and unmapped each time. A file replaced, resized
    or gone gets a new mapping or none. The views of the last two layouts of a file are kept
    with its mapping (the learner sends the same one every time)."""

    def __init__(self) -> None:
        self.maps: dict[str, tuple[tuple[int, int, int], torch.Tensor]] = {}
        self._views: dict[str, tuple[torch.Tensor, dict[Layout, list[tuple[str, Any]]]]] = {}

    def mapped(self, path: str, size: int) -> torch.Tensor:
        """The first ``size`` bytes of the file at ``path``, mapped (read only by the
        worker)."""
        for p in [p for p in self.maps if p != path and not os.path.exists(p)]:
            del self.maps[p]  # deleted files: do not keep their memory alive
            self._views.pop(p, None)
        st = os.stat(path)
        if st.st_size < size:  # reading a mapping past the end of the file kills the process
            raise ValueError(f"weights file {path} has {st.st_size} bytes, the layout needs {size}")
        key = (st.st_dev, st.st_ino, size)
        hit = self.maps.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        blob = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
        self.maps[path] = (key, blob)
        return blob

    def views(self, path: str, layout: Layout) -> list[tuple[str, Any]]:
        """(name, tensor view of the file) per layout entry (name, dtype, shape, offset)."""
        total = 0
        for _, dtype, shape, off in layout:
            n = _DTYPE_SIZES[dtype]
            for s in shape:
                n *= s
            total = max(total, off + n)
        blob = self.mapped(path, total)
        kept = self._views.get(path)
        if kept is None or kept[0] is not blob:
            kept = self._views[path] = (blob, {})
        views = kept[1].get(layout)
        if views is None:
            views = []
            for name, dtype, shape, off in layout:
                n = _DTYPE_SIZES[dtype]
                for d in shape:
                    n *= d
                views.append((name, blob[off : off + n].view(getattr(torch, dtype)).view(shape)))
            if len(kept[1]) >= 2:
                kept[1].clear()
            kept[1][layout] = views
        return views


class _QuietPartialReload:
    """Drop vLLM's per-module "not loaded" warnings while a subset (delta) is reloaded."""

    _LOGGERS = (
        "vllm.model_executor.model_loader.reload.inplace",
        "vllm.model_executor.model_loader.reload.layerwise",
    )

    def __init__(self) -> None:
        self._filter = logging.Filter()
        self._filter.filter = lambda r: (
            not (  # type: ignore[method-assign]
                "not loaded" in str(r.msg) or "Failed to load weights" in str(r.msg)
            )
        )
        for name in self._LOGGERS:
            logging.getLogger(name).addFilter(self._filter)

    def close(self) -> None:
        for name in self._LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)

"""vLLM worker extension that loads new weights from a shared-memory file.

The rollout server receives weight frames over ZeroMQ and writes them into one file under
/dev/shm; only control (path, tensor layout, version) goes through ``collective_rpc``, which
cannot carry tensors on CPU. The worker maps the file and feeds views of it to vLLM's
``reload_weights(weights_iterator=...)``: mutating parameters directly does nothing on CPU
because weights are repacked after load. A full update of a dense model on CPU takes a shorter
path (``_full_reload_cpu``): each linear layer is repacked straight from the file. When the file
stays unchanged until the next reload (the learner's own weights file, ``defer``) and the worker
has a spare CPU, that repacking is finished in the background: the engine resumes at once with
the new weights, each linear layer computing from its view of the file until its oneDNN
packing is swapped in (``_repack_later``), the helper starting once the server has acked the
update (``climbrl_start_repack``).

A reload may carry a subset of the checkpoint tensors (delta and LoRA sync,
``climbrl.weightsync``). vLLM 0.32 reloads layer by layer: each vLLM module is re-processed (CPU
repack included) once all of its elements have arrived, and modules that receive nothing keep
their kernel tensors. A module that receives only part of its elements (say q_proj of a packed
qkv_proj) is materialised from empty memory, so a subset must cover whole modules; the rollout
server expands it (``weightsync.module_key``). If a reload raises midway, the half-loaded
modules are put back to their previous kernel tensors here, so the server can roll back by
reloading the previous values of every module the failed update touched.

vLLM's CPU fused-MoE experts are prepacked after the first load and, in vLLM 0.32, not again
on a reload; ``_repack_cpu_moe_on_reload`` has the reload prepack them, so an MoE engine
holds bitwise the tensors a fresh load of the same weights gives (``climbrl_param_digest``).

It also hosts climbrl's train = inference capture (``climbrl.rollout.replay``): installing the
MoE routing capture and handing out the per-request top-p/top-k and routing records.

Enabled with ``AsyncEngineArgs(worker_extension_cls="climbrl.rollout.worker_ext.WeightReceiver")``.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

log = logging.getLogger("climbrl.rollout.worker_ext")

_DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


class WeightReceiver:
    """Mixed into vLLM's worker class; methods are called through ``collective_rpc``."""

    def climbrl_load_weights(
        self,
        path: str,
        layout: list[tuple[str, str, list[int], int]],
        full: bool = False,
        defer: bool = False,
    ) -> tuple[float, str]:
        """Reload from ``path``; ``layout`` is (name, dtype, shape, byte offset) per tensor.
        ``full``: the layout holds every tensor of the checkpoint (a full sync), which a dense
        model on CPU loads by the short path (``_full_reload_cpu``). ``defer``: the caller
        leaves the file unchanged until its next call here, so that path may finish packing
        in the background. Returns the seconds taken and the path taken: "cpu_full", or
        "vllm" for vLLM's ``reload_weights``."""
        t0 = time.perf_counter()
        _settle_repack()  # the last update's background packing reads the last file
        total = 0
        for _, dtype, shape, off in layout:
            n = _DTYPE_SIZES[dtype]
            for s in shape:
                n *= s
            total = max(total, off + n)
        blob = _mapped(path, total)
        key = tuple((name, dtype, tuple(shape), off) for name, dtype, shape, off in layout)
        weights = _views(path, blob, key)

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if full and _full_reload_cpu_supported(model):
            try:
                _full_reload_cpu(model, weights, defer, key)
                return time.perf_counter() - t0, "cpu_full"
            except _UnfitForShortPath as e:  # this model's loader does not fit: vLLM's way
                log.warning(
                    "short CPU reload does not fit this model (%s); full updates go "
                    "through vLLM's reload_weights from now on",
                    e,
                )
                model._climbrl_full_reload_ok = False
        model.__dict__.pop("_climbrl_plans", None)  # vLLM's reload may make new parameters
        _repack_cpu_moe_on_reload(model)
        quiet = _QuietPartialReload()
        try:
            self.model_runner.reload_weights(weights_iterator=iter(weights))  # type: ignore[attr-defined]
        except BaseException:
            _abandon_layerwise_reload(self.model_runner)
            raise
        finally:
            quiet.close()
        return time.perf_counter() - t0, "vllm"

    def climbrl_start_repack(self) -> None:
        """Start the background packing the last reload left (``_repack_later``), unless the
        engine's first use of a layer since has started it. The server calls this shortly
        after its ack: started with the reload, the helper would compete for the CPU with the
        rest of the update (the reply, the resume, the ack's way to the learner)."""
        _start_repack()

    def climbrl_param_digest(self) -> dict[str, str]:
        """sha256 of each parameter's bytes as the engine holds them (packed layouts
        included), by name: two engines agree exactly when they compute with the same
        weights (``WeightManifest.digest``; tests compare a synced engine with a fresh one)."""
        import hashlib

        import torch

        _settle_repack()
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


def _repack_cpu_moe_on_reload(model: Any) -> None:
    """Make vLLM's reload prepack the CPU fused-MoE experts again, as the first load does.

    vLLM 0.32's CPU experts kernel prepacks w13/w2 into its grouped-GEMM layout after the first
    load (``CPUUnquantizedExperts.process_weights_after_loading``: same shape, permuted
    values). On a reload ``UnquantizedFusedMoEMethod._setup_kernel`` sees the kernel already
    built, treats the call as a weight update and skips that prepack, so the layer-wise reload
    copies the checkpoint's raw layout into the packed storage: re-publishing unchanged
    weights moves w13/w2 by up to 0.12 and the engine's log-probs by ~0.04 nat. Here each such
    layer's ``process_weights_after_loading`` (which the layer-wise reload calls once the
    layer's tensors have all arrived) runs the experts' own prepack after the update, on the
    freshly loaded raw tensors; vLLM then copies the packed result into the kernel's storage.

    Internal to vLLM, so kept here and behind a flag: ``CLIMBRL_CPU_MOE_REPACK=0`` leaves
    vLLM's own reload untouched; a vLLM whose classes moved is left untouched too, with a
    warning."""
    import os

    if os.environ.get("CLIMBRL_CPU_MOE_REPACK", "1") == "0" or model.__dict__.get(
        "_climbrl_moe_repack"
    ):
        return
    model._climbrl_moe_repack = True
    try:
        from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
            UnquantizedFusedMoEMethod,
        )
        from vllm.model_executor.utils import is_weights_pre_processed
    except ImportError as e:
        log.warning(
            "CPU MoE reload repack not installed (vLLM layout changed: %s); MoE "
            "weight updates go through vLLM's reload as is",
            e,
        )
        return
    for m in model.modules():
        qm = getattr(m, "quant_method", None)
        if (
            type(qm) is not UnquantizedFusedMoEMethod
            or getattr(qm, "unquantized_backend", None) is not UnquantizedMoeBackend.CPU
        ):
            continue

        def after_loading(
            layer: Any, _orig: Any = qm.process_weights_after_loading, _qm: Any = qm
        ) -> None:
            update = _qm.moe_kernel is not None  # _setup_kernel's own test for an update
            _orig(layer)
            if update and not is_weights_pre_processed():
                _qm.moe_kernel.fused_experts.process_weights_after_loading(layer)

        qm.process_weights_after_loading = after_loading


_MAPS: dict[str, tuple[tuple[int, int, int], Any]] = {}  # path -> ((dev, inode, size), blob)


def _mapped(path: str, size: int) -> Any:
    """The first ``size`` bytes of the file at ``path``, mapped (read only by the worker).

    A mapping is kept for the next reload from the same file: the learner rewrites its ring
    files in place and the server its staging file, so the pages stay mapped from one update
    to the next instead of being faulted in and unmapped each time. A file replaced, resized
    or gone gets a new mapping or none."""
    import os

    import torch

    for p in [p for p in _MAPS if p != path and not os.path.exists(p)]:
        del _MAPS[p]  # deleted files: do not keep their memory alive
        _VIEWS.pop(p, None)
    st = os.stat(path)
    if st.st_size < size:  # reading a mapping past the end of the file kills the process
        raise ValueError(f"weights file {path} has {st.st_size} bytes, the layout needs {size}")
    key = (st.st_dev, st.st_ino, size)
    hit = _MAPS.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    blob = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    _MAPS[path] = (key, blob)
    return blob


_VIEWS: dict[str, tuple[Any, dict[Any, list[tuple[str, Any]]]]] = {}  # path -> (blob, views)


def _views(
    path: str, blob: Any, layout: tuple[tuple[str, str, tuple[int, ...], int], ...]
) -> list[tuple[str, Any]]:
    """(name, tensor view of ``blob``) per layout entry, kept with the mapping for the next
    reload of the same layout (the learner sends the same one every time)."""
    import torch

    kept = _VIEWS.get(path)
    if kept is None or kept[0] is not blob:
        kept = _VIEWS[path] = (blob, {})
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
        import logging

        self._filter = logging.Filter()
        self._filter.filter = lambda r: (
            not (  # type: ignore[method-assign]
                "not loaded" in str(r.msg) or "Failed to load weights" in str(r.msg)
            )
        )
        for name in self._LOGGERS:
            logging.getLogger(name).addFilter(self._filter)

    def close(self) -> None:
        import logging

        for name in self._LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)


class _UnfitForShortPath(Exception):
    """The model does not fit ``_full_reload_cpu`` (its loader names or metadata differ from
    what it expects): the worker falls back to vLLM's reload for this update and the next."""


def _full_reload_cpu_supported(model: Any) -> bool:
    """A dense, unquantized model on the CPU platform: every module with a quant method is a
    plain linear or embedding (no MoE, no quantization), so ``_full_reload_cpu`` covers it."""
    cached = getattr(model, "_climbrl_full_reload_ok", None)
    if cached is not None:
        return bool(cached)
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform

    try:  # the reload internals the short path builds on (vLLM 0.32)
        from vllm.model_executor.model_loader.reload import layerwise, meta, sanitize

        _ = (
            layerwise.get_layerwise_info,
            meta.materialize_meta_tensor,
            sanitize.restore_layer_refs,
        )
    except (ImportError, AttributeError) as e:
        log.warning("short CPU reload unavailable with this vLLM (%s): vLLM's reload_weights", e)
        model._climbrl_full_reload_ok = False
        return False
    ok = current_platform.is_cpu() and all(
        type(qm) in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)
        for m in model.modules()
        if (qm := getattr(m, "quant_method", None)) is not None
    )
    model._climbrl_full_reload_ok = ok
    return ok


def _full_reload_cpu(model: Any, weights: list[tuple[str, Any]], defer: bool, key: Any) -> None:
    """Load a complete checkpoint into a dense model on CPU, without vLLM's layer-by-layer
    reload (restore every module on the meta device, buffer and count each load under a
    dispatch mode, materialise, process, copy back), which at 5M-50M parameters costs more
    than the copies and the oneDNN repack together.

    vLLM's CPU GEMM dispatch replaces the weight of each linear layer by an empty tensor once
    it is packed for oneDNN, and packing copies it. So a linear layer whose checkpoint tensors
    are all in the file (stacked qkv/gate_up parts adjacent there, as the learner writes them)
    is packed straight from the file (``_direct_gemm_weights``), with no copy into a weight
    tensor first. The others get a model-format weight back (built from the metadata vLLM
    recorded at load for its own reloads), the model's ``load_weights`` maps and copies the
    remaining tensors into them (vLLM's own loaders; the other parameters are written in
    place), and each of those linear or embedding layers is dispatched again, which repacks
    it. Raises ``_UnfitForShortPath`` if a linear layer got no weight (the loader's names
    differ from the modules'); any other error propagates and the server rolls back. Either
    way the layers not yet repacked are put back in the packed format first. ``defer``: the
    file stays unchanged until the next reload, so the packing may be finished in the
    background (``_repack_later``). ``key`` names the layout (hashable), for replaying what
    this reload did on the next one of the same layout (``_Plan``)."""
    import torch
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    plans = model.__dict__.setdefault("_climbrl_plans", {})
    plan = plans.get(key)
    if plan is None:
        gemm = {name: m for name, m in model.named_modules() if hasattr(m, "cpu_linear")}
    else:
        gemm = plan.gemm
    packed = {
        name
        for name, m in gemm.items()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.numel() == 0
    }
    if plan is not None and plan.packed == packed:
        direct = {name: _whole(weights[i][1], shape) for name, (i, shape) in plan.direct.items()}
        used = plan.used
    else:
        plan = None
        direct, used = _direct_gemm_weights(model, {n: gemm[n] for n in packed}, weights)
    rebuilt: list[str] = list(direct)
    try:
        if not defer:
            _repack([(gemm[name], w) for name, w in direct.items()])
        for name in packed - direct.keys():
            m = gemm[name]
            meta = get_layerwise_info(m).restore_metadata[0].get("weight")
            if meta is None:
                raise _UnfitForShortPath(f"{name}: no recorded weight metadata")
            with get_layerwise_info(m).restore_device:
                m.weight = restore_layer_refs(materialize_meta_tensor(meta), m)
            rebuilt.append(name)
        rest = [(n, t) for n, t in weights if n not in used]
        if plan is not None:
            for n, t in rest:
                for prm, loader in plan.loads.get(n, ()):
                    loader(prm, t)
        else:
            for prm in model.parameters():
                # vLLM's reload wraps the loaders of the metadata it restores from, and leaves
                # them wrapped there: a wrapped loader only buffers for layer-by-layer processing
                loader = getattr(prm, "weight_loader", None)
                while getattr(loader, "__name__", "") == "online_process_loader":
                    loader = loader.__wrapped__
                if loader is not None:
                    prm.weight_loader = loader
            loaded, loads = _load_recorded(model, rest)
            missing = [n for n in packed - direct.keys() if f"{n}.weight" not in loaded]
            if missing:
                raise _UnfitForShortPath(
                    f"{len(missing)} linear layers got no weight, e.g. {missing[:3]}"
                )
            _remember_plan(model, key, gemm, packed, direct, weights, used, loads)
        others = [(m, None) for name, m in gemm.items() if name not in direct]
        if not (defer and _repack_later([(gemm[n], w) for n, w in direct.items()] + others)):
            _repack(([(gemm[n], w) for n, w in direct.items()] if defer else []) + others)
    except BaseException:
        # Back to the packed format (empty weight, previous oneDNN handler) for the layers not
        # repacked yet, so vLLM's own reload can load (or roll back) every module.
        for name in rebuilt:
            w = gemm[name].weight
            if w.numel():
                gemm[name].weight = torch.nn.Parameter(
                    torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False
                )
        raise


class _Plan:
    """What a full reload did with a weights layout, for the next reload of the same layout
    (the learner sends the same tensors at the same offsets every time): the layers packed
    straight from the file, as (index of their first part in the layout, whole shape), and
    the loader calls the model's ``load_weights`` made for the other tensors."""

    def __init__(
        self,
        gemm: dict[str, Any],
        packed: set[str],
        direct: dict[str, tuple[int, tuple[int, ...]]],
        used: set[str],
        loads: dict[str, list[tuple[Any, Any]]],
    ) -> None:
        self.gemm, self.packed, self.direct, self.used, self.loads = (
            gemm,
            packed,
            direct,
            used,
            loads,
        )


def _remember_plan(
    model: Any,
    key: Any,
    gemm: dict[str, Any],
    packed: set[str],
    direct: dict[str, Any],
    weights: list[tuple[str, Any]],
    used: set[str],
    loads: dict[str, list[tuple[Any, Any]]] | None,
) -> None:
    """Keep a ``_Plan`` when this reload can be replayed: every linear layer was packed
    straight from one run of the file (no concatenation, no rebuilt weight) and every other
    tensor went through recorded loader calls. A few layouts are kept (the learner's file and
    the server's staging file order the tensors differently)."""
    plans = model.__dict__.setdefault("_climbrl_plans", {})
    plans.pop(key, None)
    if loads is None or packed - direct.keys():
        return
    first: dict[int, int] = {}
    for i, (_, t) in enumerate(weights):
        first.setdefault(t.data_ptr(), i)
    index = {}
    for name, w in direct.items():
        i = first.get(w.data_ptr())
        if i is None:
            return  # a concatenation: not a view of the file
        index[name] = (i, tuple(w.shape))
    while len(plans) >= 4:
        del plans[next(iter(plans))]
    plans[key] = _Plan(gemm, packed, index, used, loads)


def _whole(part: Any, shape: tuple[int, ...]) -> Any:
    """The view of ``shape`` that starts where ``part`` starts in its file."""
    import torch

    if tuple(part.shape) == shape:
        return part
    return torch.empty(0, dtype=part.dtype).set_(
        part.untyped_storage(), part.storage_offset(), shape
    )


def _load_recorded(
    model: Any, rest: list[tuple[str, Any]]
) -> tuple[set[str], dict[str, list[tuple[Any, Any]]] | None]:
    """``model.load_weights(rest)``, recording the loader calls it makes: the names it
    loaded, and {checkpoint name: [(parameter, loader)]} when every call was
    ``loader(parameter, that very tensor)`` and every parameter it reports loaded got such a
    call (else None: the next reload calls ``load_weights`` again)."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    names = {id(t): n for n, t in rest}
    loads: dict[str, list[tuple[Any, Any]]] = {}
    plain = [True]
    saved: list[tuple[Any, Any]] = []

    def recorder(orig: Any) -> Any:
        def rec(param: Any, loaded: Any, *args: Any, **kwargs: Any) -> Any:
            n = names.get(id(loaded))
            if n is None or args or kwargs:
                plain[0] = False
            else:
                loads.setdefault(n, []).append((param, orig or default_weight_loader))
            return (orig or default_weight_loader)(param, loaded, *args, **kwargs)

        return rec

    try:
        for prm in model.parameters():
            orig = getattr(prm, "weight_loader", None)
            prm.weight_loader = recorder(orig)
            saved.append((prm, orig))
    except (AttributeError, TypeError):  # a loader that cannot be replaced: no recording
        plain[0] = False
    try:
        loaded = model.load_weights(iter(rest)) or set()
    finally:
        for prm, orig in saved:
            if orig is None:
                del prm.weight_loader
            else:
                prm.weight_loader = orig
    pname = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    got = {pname.get(id(p)) for calls in loads.values() for p, _ in calls}
    if not plain[0] or not set(loaded) <= got:
        return set(loaded), None
    return set(loaded), loads


def _repack(layers: list[tuple[Any, Any]]) -> None:
    """Dispatch each (linear or embedding layer, weight) for vLLM's CPU GEMM (``_pack``), the
    engine paused. The packing is memory-bound and, on a small machine, vLLM gives the
    worker one thread on one CPU and leaves the others to the frontend, which waits for this
    reload (``_spare_cpus``): there a helper thread on those CPUs packs about half the bytes
    (the oneDNN op releases the GIL)."""
    pool = _repack_helper() if len(layers) > 1 else None
    if pool is None:
        _Packing(layers).run()
        return
    halves: tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]] = ([], [])
    load = [0, 0]
    for m, w in sorted(layers, key=lambda x: -_nbytes(*x)):  # greedy halves by bytes
        k = 0 if load[0] <= load[1] else 1
        halves[k].append((m, w))
        load[k] += _nbytes(m, w)
    helper = pool.submit(_Packing(halves[1]).run)
    try:
        _Packing(halves[0]).run()
    finally:
        helper.result()


def _repack_later(layers: list[tuple[Any, Any]]) -> bool:
    """Leave the packing of ``layers`` (layer, file view or None for its own weight) to
    whichever thread gets to each first, so the engine resumes at once with the new weights:
    a helper thread at idle priority on the spare CPUs, once started (``_start_repack``: by
    the server after its ack, or by the first layer the engine computes with; it yields the
    CPUs to the frontend, the engine core and a learner), or the worker itself the first time
    the layer computes (``_Unpacked``). False where there is no helper. The next
    reload first packs whatever is still left (``_settle_repack``)."""
    global _PENDING

    if _repack_helper(idle=True) is None:
        return False
    job = _Packing(layers, background=True)
    for m, w in layers:
        # what vLLM's own ``m.cpu_linear = ...`` stores, without torch.nn.Module.__setattr__'s
        # checks for parameters, buffers and submodules (a plain attribute needs none)
        m.__dict__["cpu_linear"] = _Unpacked(job, m, w)
    _PENDING = (job, None)
    return True


def _start_repack() -> None:
    """Hand the packing ``_repack_later`` left to the idle helper (once; else a no-op)."""
    global _PENDING

    if _PENDING is not None and _PENDING[1] is None:
        pool = _repack_helper(idle=True)
        _PENDING = (_PENDING[0], pool.submit(_PENDING[0].run))


class _Unpacked:
    """``cpu_linear`` of a layer whose packing is left for later: the first call packs it
    here, unless another thread took it, in which case this call computes ``F.linear`` on
    the new weight (the file view, which stays unchanged, or the layer's own tensor)."""

    def __init__(self, job: _Packing, m: Any, w: Any) -> None:
        import torch

        self.job, self.m, self.w = job, m, w
        self.compute = (m.weight if w is None else w).detach()
        self.linear = torch.nn.functional.linear

    def __call__(self, x: Any, weight: Any, bias: Any) -> Any:
        if self.job.take(self.m):
            _start_repack()  # the engine computes again: the helper packs other layers too
            _pack(self.m, self.w, background=True)
            return self.m.cpu_linear(x, self.m.weight, bias)
        return self.linear(x, self.compute, bias)


def _nbytes(m: Any, w: Any) -> int:
    return int((m.weight if w is None else w).nbytes)


class _Packing:
    """(layer, weight) pairs to pack, each taken once by whichever thread gets to it."""

    def __init__(self, layers: list[tuple[Any, Any]], background: bool = False) -> None:
        import threading

        self.todo = {id(m): (m, w) for m, w in layers}
        self.background, self.lock = background, threading.Lock()

    def take(self, m: Any) -> bool:
        with self.lock:
            return self.todo.pop(id(m), None) is not None

    def run(self) -> None:
        """Pack what is left, last layer first."""
        while True:
            with self.lock:
                if not self.todo:
                    return
                m, w = self.todo.popitem()[1]
            _pack(m, w, self.background)


def _pack(m: Any, w: Any, background: bool = False) -> None:
    """vLLM's CPU GEMM dispatch of layer ``m``, on weight ``w`` (a file view) or, if None, on
    its own weight. A layer that had its weight removed ends up owning its memory: oneDNN's
    packed copy, or a copy of ``w`` if it keeps a weight. In the background (the engine
    already runs on the new weight) a failure is logged and the layer keeps torch's linear;
    in the foreground it fails the reload."""
    import torch

    try:
        if w is not None:
            m.weight = torch.nn.Parameter(w, requires_grad=False)
        m.quant_method.process_weights_after_loading(m)
    except Exception:
        if not background:  # the reload fails and the server rolls back
            raise
        log.exception("packing a layer in the background failed: it keeps torch's linear")
        if w is None:
            m.cpu_linear = torch.nn.functional.linear
        else:
            m.cpu_linear = functools.partial(_linear_on, w.clone())
            m.weight = torch.nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        return
    if w is not None and m.weight.numel():  # kept its weight (no oneDNN): own the memory
        m.weight = torch.nn.Parameter(w.clone(), requires_grad=False)


def _linear_on(w: Any, x: Any, weight: Any, bias: Any) -> Any:
    """``cpu_linear`` on ``w`` (vLLM calls ``cpu_linear(x, weight, bias)``, and a packed
    layer's ``weight`` is empty)."""
    import torch

    return torch.nn.functional.linear(x, w, bias)


_PENDING: Any = None  # the last deferred packing: (_Packing, Future of its helper or None)


def _settle_repack() -> None:
    """Finish the last deferred packing (pack what the helper has not taken yet here, wait for
    the layer it is on): after it no layer reads the file it came from."""
    global _PENDING

    if _PENDING is not None:
        job, helper = _PENDING
        try:
            job.run()
            if helper is not None:
                helper.result()
        finally:
            _PENDING = None


@functools.cache
def _spare_cpus() -> frozenset[int]:
    """The CPUs the worker's parent may use and the worker may not, when the worker computes
    on a single thread (vLLM on a machine with few cores); else none."""
    import os

    import torch

    if torch.get_num_threads() == 1 and hasattr(os, "sched_getaffinity"):
        try:
            return frozenset(os.sched_getaffinity(os.getppid()) - os.sched_getaffinity(0))
        except OSError:
            pass
    return frozenset()


@functools.cache
def _repack_helper(idle: bool = False) -> Any:
    """A one-thread executor placed on ``_spare_cpus`` (None without any). ``idle``: its
    thread runs at idle priority (``SCHED_IDLE``), so that it only takes CPU time nothing else
    wants."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    spare = _spare_cpus()
    if not spare:
        return None

    def init() -> None:
        os.sched_setaffinity(0, spare)
        if idle:
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except (AttributeError, OSError):
                log.warning(
                    "weight repack helper: no idle priority here; it runs at normal priority"
                )

    log.info(
        "weight repack: a helper thread on CPUs %s%s",
        sorted(spare),
        " at idle priority" if idle else "",
    )
    return ThreadPoolExecutor(1, thread_name_prefix="climbrl-repack", initializer=init)


def _direct_gemm_weights(
    model: Any, layers: dict[str, Any], weights: list[tuple[str, Any]]
) -> tuple[dict[str, Any], set[str]]:
    """The complete weight of each packed linear layer that can be taken from the file as
    it is: {module name: tensor}, and the checkpoint names they use. A layer qualifies when
    the checkpoint holds its ``.weight`` under the module's name (after the model's
    ``hf_to_vllm_mapper``), or, for a stacked layer such as qkv_proj, every shard the mapper
    stacks into it (q, k, v; or 0, 1, ... for gate_up), or else every part the model's
    ``packed_modules_mapping`` lists for it, in that order. Each part must have the height the
    layer gives that shard, and the whole the shape and dtype vLLM recorded at load, on an
    unsharded layer. Stacked parts adjacent in the file (as the learner writes them) make one
    view of it, others one concatenation. Anything else is left to the model's
    ``load_weights``."""
    import torch
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    mapper = getattr(model, "hf_to_vllm_mapper", None)
    stacked = getattr(model, "packed_modules_mapping", None) or {}
    ckpt: dict[str, dict[Any, tuple[str, Any]]] = {}  # vLLM name -> {shard id: (name, t)}
    for n, t in weights:
        mapped = mapper._map_name_with_shard(n) if mapper is not None else (n, None)
        if mapped is None or isinstance(mapped[1], list):
            continue
        ckpt.setdefault(mapped[0], {})[mapped[1]] = (n, t)
    out: dict[str, Any] = {}
    used: set[str] = set()
    for name, m in layers.items():
        meta = get_layerwise_info(m).restore_metadata[0].get("weight")
        if meta is None or meta.dim() != 2 or getattr(m, "tp_size", 1) != 1:
            continue
        sizes = list(getattr(m, "output_partition_sizes", None) or [meta.shape[0]])
        shards = ckpt.get(f"{name}.weight", {})
        if list(shards) == [None]:
            parts, sizes = [shards[None]], [meta.shape[0]]
        elif shards and set(shards) == {"q", "k", "v"}:
            parts = [shards[k] for k in ("q", "k", "v")]
        elif shards and all(isinstance(k, int) for k in shards):
            parts = [shards[k] for k in sorted(shards)]
        else:
            prefix, _, leaf = name.rpartition(".")
            keys = [
                f"{prefix}.{p}.weight" if prefix else f"{p}.weight" for p in stacked.get(leaf, ())
            ]
            if not keys or not all(list(ckpt.get(k, {})) == [None] for k in keys):
                continue
            parts = [ckpt[k][None] for k in keys]
        ts = [t for _, t in parts]
        if (
            len(ts) != len(sizes)
            or sum(sizes) != meta.shape[0]
            or any(
                t.dtype != meta.dtype
                or t.dim() != 2
                or t.shape[1] != meta.shape[1]
                or t.shape[0] != s
                or not t.is_contiguous()
                for t, s in zip(ts, sizes)
            )
        ):
            continue
        if len(ts) == 1:
            w = ts[0]
        elif all(
            b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
            and b.data_ptr() == a.data_ptr() + a.nbytes
            for a, b in zip(ts, ts[1:])
        ):
            w = torch.empty(0, dtype=meta.dtype).set_(
                ts[0].untyped_storage(), ts[0].storage_offset(), tuple(meta.shape)
            )
        else:
            w = torch.cat(ts)
        out[name] = w
        used.update(n for n, _ in parts)
    return out, used


def _abandon_layerwise_reload(model_runner: Any) -> None:
    """After a reload raised midway: forget the weights buffered for modules that were not
    complete and put their previous kernel tensors back (vLLM's own finalize does that for
    modules that received nothing). Modules already processed keep their new values; the
    caller reloads their previous values."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
        get_layerwise_info,
    )

    model = model_runner.get_model()
    for layer in model.modules():
        info = get_layerwise_info(layer)
        if info.can_load():
            info.loaded_weights.clear()
            info.load_numel = 0
    finalize_layerwise_reload(model, model_runner.vllm_config.model_config)

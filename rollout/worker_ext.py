"""vLLM worker extension that loads new weights from a shared-memory file.

The rollout server receives weight frames over ZeroMQ and writes them into one file under
/dev/shm; only control (path, tensor layout, version) goes through ``collective_rpc``, which
cannot carry tensors on CPU. The worker maps the file and feeds views of it to vLLM's
``reload_weights(weights_iterator=...)``: mutating parameters directly does nothing on CPU
because weights are repacked after load.

A reload may carry a subset of the checkpoint tensors (delta and LoRA sync,
``climbrl.weightsync``). vLLM 0.32 reloads layer by layer: each vLLM module is re-processed (CPU
repack included) once all of its elements have arrived, and modules that receive nothing keep
their kernel tensors. A module that receives only part of its elements (say q_proj of a packed
qkv_proj) is materialised from empty memory, so a subset must cover whole modules; the rollout
server expands it (``weightsync.module_key``). If a reload raises midway, the half-loaded
modules are put back to their previous kernel tensors here, so the server can roll back by
reloading the previous values of every module the failed update touched.

It also hosts climbrl's train = inference capture (``climbrl.rollout.replay``): installing the
MoE routing capture and handing out the per-request top-p/top-k and routing records.

Enabled with ``AsyncEngineArgs(worker_extension_cls="climbrl.rollout.worker_ext.WeightReceiver")``.
"""

from __future__ import annotations

import time
from typing import Any

_DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


class WeightReceiver:
    """Mixed into vLLM's worker class; methods are called through ``collective_rpc``."""

    def climbrl_load_weights(self, path: str, layout: list[tuple[str, str, list[int], int]]) -> float:
        """Reload from ``path``; ``layout`` is (name, dtype, shape, byte offset) per tensor."""
        import torch

        t0 = time.perf_counter()
        total = 0
        for _, dtype, shape, off in layout:
            n = _DTYPE_SIZES[dtype]
            for s in shape:
                n *= s
            total = max(total, off + n)
        blob = torch.from_file(path, shared=False, size=total, dtype=torch.uint8)

        def weights() -> Any:
            for name, dtype, shape, off in layout:
                n = _DTYPE_SIZES[dtype]
                for s in shape:
                    n *= s
                yield name, blob[off : off + n].view(getattr(torch, dtype)).view(shape)

        quiet = _QuietPartialReload()
        try:
            self.model_runner.reload_weights(weights_iterator=weights())  # type: ignore[attr-defined]
        except BaseException:
            _abandon_layerwise_reload(self.model_runner)
            raise
        finally:
            quiet.close()
        return time.perf_counter() - t0

    def climbrl_param_checksum(self) -> float:
        """Sum of all parameters, for tests that check an update reached the engine."""
        import torch

        with torch.no_grad():
            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            return float(sum(p.double().sum() for p in model.parameters()))

    def climbrl_install_capture(self, routing: bool) -> dict[str, Any]:
        """Bind the MoE routing capture (when ``routing`` and the model is MoE)."""
        from climbrl.rollout.replay import install_capture

        return install_capture(self, routing)

    def climbrl_take_replay(self, key: str) -> dict[str, Any]:
        """Pop a finished request's keep counts and routed experts (bytes, not tensors)."""
        from climbrl.rollout.replay import take_record

        return take_record(key)


class _QuietPartialReload:
    """Drop vLLM's per-module "not loaded" warnings while a subset (delta) is reloaded."""

    _LOGGERS = ("vllm.model_executor.model_loader.reload.inplace",
                "vllm.model_executor.model_loader.reload.layerwise")

    def __init__(self) -> None:
        import logging

        self._filter = logging.Filter()
        self._filter.filter = lambda r: not (  # type: ignore[method-assign]
            "not loaded" in str(r.msg) or "Failed to load weights" in str(r.msg))
        for name in self._LOGGERS:
            logging.getLogger(name).addFilter(self._filter)

    def close(self) -> None:
        import logging

        for name in self._LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)


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

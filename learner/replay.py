"""Train = inference, learner side: replay the engine's top-p/top-k mask and MoE routing.

The rollout records, per generated token, the kept count n of its top-p/top-k filter (the
kept set is the n highest tempered logits, ties included; see ``climbrl.rollout.replay``)
and, for MoE models, the experts every input position was routed to in every layer. Here:

- ``keep_counts_BT`` lays the counts out as the [B, Tc] ``keep_count`` tensor that
  ``climbrl.kernels.token_logprobs_and_entropy`` masks with before its log-softmax. The
  learner's kept set for a token is its own top-n (n = the recorded count) union the sampled
  token: at lag 0 that is the sampler's top-n, and at lag >= 1 a sampled token the newer
  weights rank below the n-th (a replay miss) stays in the support instead of dropping out;
- ``keep_mask_with_targets`` builds that union as a dense [N, V] mask for the rows that miss;
- ``routing_BLNK`` decodes ``Sample.routing`` into a [B, L, layers, top_k] long tensor
  (-1 = not recorded: that position keeps the learner's own routing);
- ``forced_routing(model, experts_BLNK)`` is a context manager under which the HF
  transformers MoE routers pick exactly those experts. Their weights are still the learner's
  own, computed from its router logits at the forced experts the way the router's family
  computes them, so gradients reach the router as usual:

  - Qwen3-MoE, Qwen2-MoE (``Qwen3MoeTopKRouter``, ``Qwen2MoeTopKRouter``): softmax,
    renormalised when ``norm_topk_prob``; Mixtral (``MixtralTopKRouter``): softmax, always
    renormalised;
  - DeepSeek-V3 (``DeepseekV3TopkRouter``): sigmoid scores, renormalised when
    ``norm_topk_prob``, times ``routed_scaling_factor``. Its ``e_score_correction_bias`` and
    group-limited top-k only select experts, which the recorded routing replaces.

  Routers of any other class are refused (``moe_routers`` raises): set
  ``rollout.replay_routing=false`` for those models.

Tests: ``pytest tests/unit/test_replay_learner.py tests/unit/test_replay_routers.py``.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from climbrl.routing_codec import decode_routing
from climbrl.routing_codec import encode_routing as encode_routing  # re-exported for callers


def keep_counts_BT(samples: Sequence[Any], Tc: int) -> Tensor | None:
    """[B, Tc] long keep counts (0 = keep the whole row), or None when no sample has any."""
    if not any(getattr(s, "keep_counts", None) for s in samples):
        return None
    out = torch.zeros((len(samples), Tc), dtype=torch.long)
    for b, s in enumerate(samples):
        kc = list(getattr(s, "keep_counts", None) or ())
        if not kc:
            continue
        if len(kc) != len(s.completion_ids):
            raise ValueError(
                f"sample {b}: keep_counts has {len(kc)} entries for {len(s.completion_ids)} "
                "completion tokens; they must align (0 where nothing was filtered)"
            )
        if min(kc) < 0:
            raise ValueError(f"sample {b}: keep_counts must be >= 0")
        out[b, : len(kc)] = torch.tensor(kc, dtype=torch.long)
    return out


def keep_mask_with_targets(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    keep_count_N: Tensor,
    fp32_head: bool = True,
    chunk: int = 256,
) -> Tensor:
    """[N, V] bool kept set: the keep_count[n] highest logits of hidden @ W^T (ties at the
    n-th kept, as in ``keep_count_threshold``) union targets[n]. Meant for the few rows whose
    sampled token is outside the learner's top-n; built ``chunk`` rows at a time, no grad."""
    from climbrl.kernels import keep_count_threshold
    from climbrl.kernels.logprob import compute_dtype

    cdt = compute_dtype(hidden_NH.dtype, fp32_head)
    w_VH = weight_VH.detach().to(cdt)
    keep_NV = torch.empty(
        (hidden_NH.shape[0], w_VH.shape[0]), dtype=torch.bool, device=hidden_NH.device
    )
    with torch.no_grad():
        for s in range(0, hidden_NH.shape[0], chunk):
            z_CV = hidden_NH[s : s + chunk].detach().to(cdt) @ w_VH.T
            if z_CV.dtype not in (torch.float32, torch.float64):
                z_CV = z_CV.float()  # the kernel's softmax dtype (fp32_head=False)
            thr_C = keep_count_threshold(z_CV, keep_count_N[s : s + chunk])
            keep_NV[s : s + chunk] = z_CV >= thr_C[:, None]
        keep_NV.scatter_(1, targets_N[:, None].to(keep_NV.device), True)
    return keep_NV


def routing_BLNK(samples: Sequence[Any], L: int, num_layers: int, top_k: int) -> Tensor | None:
    """[B, L, layers, top_k] forced experts for input positions 0..L-1, -1 = not forced."""
    if not any(getattr(s, "routing", None) is not None for s in samples):
        return None
    out = torch.full((len(samples), L, num_layers, top_k), -1, dtype=torch.long)
    for b, s in enumerate(samples):
        r = getattr(s, "routing", None)
        if r is None:
            continue
        a = decode_routing(r)
        T, N, K = a.shape
        if N != num_layers or K != top_k:
            raise ValueError(
                f"sample {b}: routing was recorded for {N} layers x top-{K}, the model has "
                f"{num_layers} layers x top-{top_k}: was it generated by another model?"
            )
        n_pos = len(s.prompt_ids) + len(s.completion_ids) - 1
        if T > n_pos:
            raise ValueError(f"sample {b}: routing covers {T} positions, the sample has {n_pos}")
        out[b, :T] = torch.from_numpy(a)
    return out


def moe_routers(model: Any) -> list[tuple[int, Any]]:
    """(decoder layer index, router module) for every MoE layer of an HF causal LM.

    A layer is MoE when one of its blocks holds ``experts`` (every transformers MoE block
    does). Its router must be one of the classes whose routing ``forced_routing`` rebuilds
    exactly (``_router_weights``); any other router is refused here, by class, so an unknown
    family never gets another family's weights."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no .model.layers; cannot find MoE routers")
    table = _router_weights()
    found = []
    for i, layer in enumerate(layers):
        blocks = [b for b in layer.children() if isinstance(getattr(b, "experts", None), Module)]
        if not blocks:
            continue  # a dense layer
        router = getattr(blocks[0], "gate", getattr(blocks[0], "router", None))
        if type(router) not in table:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            what = type(blocks[0] if router is None else router).__name__
            raise ValueError(
                f"{model_type or type(model).__name__}: MoE routing replay does not support "
                f"layer {i}'s router ({what}); it replays "
                f"{', '.join(sorted(c.__name__ for c in table))}. Set "
                "rollout.replay_routing=false to train this model without routing replay."
            )
        found.append((i, router))
    return found


@functools.cache
def _router_weights() -> dict[type, Callable[[Any, Tensor, Tensor], Tensor]]:
    """Router class -> its expert weights at given experts, from its router logits. Each entry
    is checked against its class's forward (``tests/unit/test_replay_routers.py``)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    return {
        Qwen3MoeTopKRouter: _qwen_weights,
        Qwen2MoeTopKRouter: _qwen_weights,
        MixtralTopKRouter: _mixtral_weights,
        DeepseekV3TopkRouter: _deepseek_v3_weights,
    }


def _qwen_weights(router: Any, logits_NE: Tensor, idx_NK: Tensor) -> Tensor:
    # Qwen3MoeTopKRouter / Qwen2MoeTopKRouter: softmax in float32, renormalised when
    # norm_topk_prob, cast back to the logits' dtype.
    w_NK = torch.softmax(logits_NE, dtype=torch.float, dim=-1).gather(1, idx_NK)
    if router.norm_topk_prob:
        w_NK = w_NK / w_NK.sum(dim=-1, keepdim=True)
    return w_NK.to(logits_NE.dtype)


def _mixtral_weights(router: Any, logits_NE: Tensor, idx_NK: Tensor) -> Tensor:
    # MixtralTopKRouter: softmax in float32, always renormalised, left in float32.
    w_NK = torch.softmax(logits_NE.float(), dim=-1).gather(1, idx_NK)
    return w_NK / w_NK.sum(dim=-1, keepdim=True)


def _deepseek_v3_weights(router: Any, logits_NE: Tensor, idx_NK: Tensor) -> Tensor:
    # DeepseekV3TopkRouter: sigmoid scores of the float32 logits. e_score_correction_bias and
    # the group limit (n_group, topk_group) only select experts, so with the experts given
    # they play no part; renormalised when norm_topk_prob, then times routed_scaling_factor.
    w_NK = logits_NE.sigmoid().gather(1, idx_NK)
    if router.norm_topk_prob:
        w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20)
    return w_NK * router.routed_scaling_factor


def _forced_forward(self: Any, hidden_states: Tensor, *, forced_NK: Tensor) -> tuple[Tensor, ...]:
    # The class's own forward gives the router logits and the natural top-k (kept for rows
    # with a -1); the weights are then the family's, at the experts actually used.
    n_tokens = hidden_states.numel() // self.weight.shape[1]
    if n_tokens != forced_NK.shape[0]:
        raise ValueError(
            f"forced routing was built for {forced_NK.shape[0]} tokens, the forward has "
            f"{n_tokens}: use forced_routing with the [B, L] batch being run"
        )
    logits_NE, _, natural_NK = type(self).forward(self, hidden_states)
    forced_NK = forced_NK.to(natural_NK.device)
    use_N1 = (forced_NK >= 0).all(dim=-1, keepdim=True)
    idx_NK = torch.where(use_N1, forced_NK, natural_NK)
    return logits_NE, _router_weights()[type(self)](self, logits_NE, idx_NK), idx_NK


@contextlib.contextmanager
def forced_routing(model: Any, experts_BLNK: Tensor) -> Iterator[None]:
    """Within the block, MoE layer i of ``model`` routes token (b, t) to experts_BLNK[b, t, i]
    (rows with any -1 keep their natural top-k). The batch run inside must be [B, L]."""
    routers = moe_routers(model)
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no MoE router; routing replay needs an MoE model (set "
            "rollout.replay_routing=false for dense models)"
        )
    B, L, N, K = experts_BLNK.shape
    for i, r in routers:
        if i >= N or K != r.top_k:
            raise ValueError(
                f"routing is [.., {N} layers, top-{K}]; layer {i} routes top-{r.top_k}"
            )
    patched = []
    try:
        for i, r in routers:
            r.forward = types.MethodType(
                lambda self, h, _f=experts_BLNK[:, :, i, :].reshape(B * L, K): _forced_forward(
                    self, h, forced_NK=_f
                ),
                r,
            )
            patched.append(r)
        yield
    finally:
        for r in patched:
            del r.forward  # back to the class's forward


def model_moe_shape(model: Any) -> tuple[int, int] | None:
    """(num decoder layers, experts per token) of an MoE model, None for a dense one."""
    routers = moe_routers(model)
    if not routers:
        return None
    base = getattr(model, "model", model)
    return len(base.layers), int(routers[0][1].top_k)

"""Per-token log-probs and entropy of sampled completions under the learner's model.

Matches what the engine reports as ``processed_logprobs``: log softmax of the logits / T after
the sampler's top-p/top-k filter, with the LM head in float32 (``fp32_head``, like the engine:
vLLM's CPU sampler works in float32). Train = inference replay (``climbrl.learner.replay``):

- ``replay_mask``: the top-p/top-k kept set recorded per token (``Sample.keep_counts``) is
  applied before the log-softmax. The learner's kept set is its own top-n (n = the recorded
  count) union the sampled token y, so log pi(y) = log(p_y / sum_{top-n u {y}} p) is always
  finite. At lag 0 y is inside the top-n (the sampler's distribution is the learner's) and
  this is exactly the engine's value; at lag >= 1 the newer weights may rank y below the
  n-th, a replay miss: y is still trained, over the top-n and y, and counted in
  ``replay_miss``. Dropping it instead would take it out of the loss numerator while the
  denominators (``BatchNorm``, fixed from the token counts before the forward) still count it;
- ``replay_routing``: for MoE models the experts recorded per position and layer
  (``Sample.routing``) are forced in the forward pass.

Each applies only when the samples carry the record. Only completion positions are projected
through the LM head, by default through ``climbrl.kernels`` (chunked, never the full
[tokens x vocab] logits); ``impl="naive"`` is the plain-torch path.

The reference model of the KL term replays neither (``reference_logprobs``): both records
describe the policy that sampled, and pi_ref is the reference's own full distribution.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from climbrl.kernels import token_logprobs_and_entropy
from climbrl.learner.replay import (
    forced_routing,
    keep_counts_BT,
    keep_mask_with_targets,
    model_moe_shape,
    routing_BLNK,
)
from torch import Tensor


def head_logprobs(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    temperature: float,
    impl: str,
    keep_count_N: Tensor | None = None,
    fp32_head: bool = True,
) -> tuple[Tensor, Tensor]:
    return token_logprobs_and_entropy(
        hidden_NH, weight_VH, targets_N, temperature=temperature, keep_count_N=keep_count_N,
        fp32_head=fp32_head, impl=impl,
    )


def pack_positions(samples: list[Any]) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids_BL, attention_BL, pos_BT): right-padded prompt+completion inputs (the last
    token dropped); ``pos_BT`` is the input position whose hidden state predicts completion
    token t. The one packing the learner's log-probs and the PPO value head share."""
    seqs = [list(s.prompt_ids) + list(s.completion_ids) for s in samples]
    B, L = len(samples), max(len(x) for x in seqs) - 1
    Tc = max(len(s.completion_ids) for s in samples)
    ids = torch.zeros((B, L), dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, Tc), dtype=torch.long)
    for b, (s, seq) in enumerate(zip(samples, seqs)):
        n = len(seq) - 1
        ids[b, :n] = torch.tensor(seq[:-1])
        attn[b, :n] = 1
        p0, c = len(s.prompt_ids) - 1, len(s.completion_ids)
        pos[b, :c] = torch.arange(p0, p0 + c)
    return ids, attn, pos


def completion_logprobs(
    model: Any,
    samples: list[Any],
    temperature: float,
    impl: str = "auto",
    *,
    replay_mask: bool = True,
    replay_routing: bool = True,
    fp32_head: bool = True,
) -> dict[str, Tensor]:
    """Returns [B, Tc] tensors: logp, entropy, old_logp (the sampler's), mask (trainable),
    and replay_miss (1 on a trainable token outside the learner's own top-n: a newer policy
    than the sampler's, or a boundary near-tie at lag 0). A missed token stays in ``mask``;
    its logp and entropy are over the learner's top-n union the token (module docstring)."""
    B = len(samples)
    ids, attn, pos = pack_positions(samples)
    L, Tc = ids.shape[1], pos.shape[1]
    tgt = torch.zeros((B, Tc), dtype=torch.long)
    mask = torch.zeros((B, Tc), dtype=torch.float32)
    old = torch.zeros((B, Tc), dtype=torch.float32)
    for b, s in enumerate(samples):
        c = len(s.completion_ids)
        tgt[b, :c] = torch.tensor(s.completion_ids)
        mask[b, :c] = torch.tensor(s.completion_mask, dtype=torch.float32)
        old[b, :c] = torch.tensor(s.logprobs, dtype=torch.float32)
    keep_BT = keep_counts_BT(samples, Tc) if replay_mask else None
    dev = model.get_input_embeddings().weight.device  # a GPU learner (FSDP on CUDA)
    if dev.type != "cpu":
        ids, attn, pos, tgt, mask, old = (t.to(dev) for t in (ids, attn, pos, tgt, mask, old))
        keep_BT = None if keep_BT is None else keep_BT.to(dev)
    route: contextlib.AbstractContextManager = contextlib.nullcontext()
    if replay_routing and any(getattr(s, "routing", None) is not None for s in samples):
        shape = model_moe_shape(model)
        if shape is None:
            raise ValueError("samples carry MoE routing but the learner's model has no MoE "
                             "router; is the learner loading the rollout's model?")
        experts = routing_BLNK(samples, L, *shape)
        if experts is not None:
            route = forced_routing(model, experts if dev.type == "cpu" else experts.to(dev))
    with route:
        hidden_BLH = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    hidden_BTH = hidden_BLH.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden_BLH.shape[-1]))
    W = model.get_output_embeddings().weight
    logp, ent = head_logprobs(
        hidden_BTH.reshape(B * Tc, -1), W, tgt.reshape(-1), temperature, impl,
        keep_count_N=None if keep_BT is None else keep_BT.reshape(-1), fp32_head=fp32_head,
    )
    miss = (mask > 0) & ~torch.isfinite(logp.detach()).view(B, Tc)
    if bool(miss.any()):
        assert keep_BT is not None, "only a replayed kept set can exclude the sampled token"
        idx = miss.reshape(-1).nonzero().squeeze(1)
        h_MH = hidden_BTH.reshape(B * Tc, -1)[idx]
        keep_MV = keep_mask_with_targets(h_MH, W, tgt.reshape(-1)[idx],
                                         keep_BT.reshape(-1)[idx], fp32_head=fp32_head)
        logp_M, ent_M = token_logprobs_and_entropy(
            h_MH, W, tgt.reshape(-1)[idx], temperature=temperature, keep_mask_NV=keep_MV,
            fp32_head=fp32_head, impl=impl,
        )
        logp = logp.index_put((idx,), logp_M.to(logp.dtype))
        ent = ent.index_put((idx,), ent_M.to(ent.dtype))
    logp, ent = logp.view(B, Tc), ent.view(B, Tc)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return {
        "logp": torch.where(mask.bool(), logp, zero),
        "entropy": torch.where(torch.isfinite(ent.detach()), ent, zero),
        "old_logp": old,
        "mask": mask,
        "replay_miss": miss.float(),
    }


def reference_logprobs(
    ref: Any, samples: list[Any], temperature: float, impl: str = "auto", *,
    fp32_head: bool = True,
) -> Tensor:
    """[B, Tc] log pi_ref(y_t) of the sampled tokens under the reference model's own full
    distribution, log softmax(logits / T), with neither the rollout's top-p/top-k kept set nor
    its MoE routing replayed; 0 on non-trainable positions.

    The kept set is the sampling policy's: applied to the reference, it would score each token
    over the reference's top-n plus that token, a support chosen by the policy's count, so
    the KL would not be to pi_ref. The full support keeps KL(pi || pi_ref) finite, since
    every token pi can sample has pi_ref > 0."""
    return completion_logprobs(
        ref, samples, temperature, impl, replay_mask=False, replay_routing=False,
        fp32_head=fp32_head,
    )["logp"]

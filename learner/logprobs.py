"""Per-token log-probs and entropy of sampled completions under the learner's model.

Matches what the engine reports as ``processed_logprobs``: log softmax(logits / temperature),
with the LM head in float32. Only completion positions are projected through the LM head, and
by default through ``climbrl.kernels`` (chunked, never the full [tokens x vocab] logits);
``impl="naive"`` is the plain-torch path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def head_logprobs(
    hidden_NH: Tensor, weight_VH: Tensor, targets_N: Tensor, temperature: float, impl: str
) -> tuple[Tensor, Tensor]:
    if impl != "naive":
        try:
            from climbrl.kernels import token_logprobs_and_entropy
        except ImportError:
            impl = "naive"
        else:
            return token_logprobs_and_entropy(
                hidden_NH, weight_VH, targets_N, temperature=temperature, fp32_head=True,
                impl=impl,
            )
    logits_NV = hidden_NH.float() @ weight_VH.float().t()
    logits_NV = logits_NV / temperature
    logp_NV = F.log_softmax(logits_NV, dim=-1)
    logp_N = logp_NV.gather(1, targets_N.unsqueeze(1)).squeeze(1)
    ent_N = -(logp_NV.exp() * logp_NV).sum(-1)
    return logp_N, ent_N


def completion_logprobs(
    model: Any, samples: list[Any], temperature: float, impl: str = "auto"
) -> dict[str, Tensor]:
    """Returns [B, Tc] tensors: logp, entropy, old_logp (the sampler's), mask (trainable)."""
    B = len(samples)
    seqs = [list(s.prompt_ids) + list(s.completion_ids) for s in samples]
    L = max(len(x) for x in seqs) - 1
    Tc = max(len(s.completion_ids) for s in samples)
    pad = 0
    ids = torch.full((B, L), pad, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, Tc), dtype=torch.long)  # input position predicting completion token t
    tgt = torch.zeros((B, Tc), dtype=torch.long)
    mask = torch.zeros((B, Tc), dtype=torch.float32)
    old = torch.zeros((B, Tc), dtype=torch.float32)
    for b, (s, seq) in enumerate(zip(samples, seqs)):
        n = len(seq) - 1
        ids[b, :n] = torch.tensor(seq[:-1])
        attn[b, :n] = 1
        p0, c = len(s.prompt_ids) - 1, len(s.completion_ids)
        pos[b, :c] = torch.arange(p0, p0 + c)
        tgt[b, :c] = torch.tensor(s.completion_ids)
        mask[b, :c] = torch.tensor(s.completion_mask, dtype=torch.float32)
        old[b, :c] = torch.tensor(s.logprobs, dtype=torch.float32)
    hidden_BLH = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    hidden_BTH = hidden_BLH.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden_BLH.shape[-1]))
    W = model.get_output_embeddings().weight
    logp, ent = head_logprobs(
        hidden_BTH.reshape(B * Tc, -1), W, tgt.reshape(-1), temperature, impl
    )
    return {
        "logp": torch.where(mask.bool(), logp.view(B, Tc), torch.zeros((), dtype=logp.dtype)),
        "entropy": ent.view(B, Tc),
        "old_logp": old,
        "mask": mask,
    }

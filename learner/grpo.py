"""GRPO: group-relative advantages and the token-level clipped policy loss.

Advantage (GRPO, Shao et al. 2024), per group of G samples of one prompt:

    A_i = (r_i - mean(r)) / (std(r) + eps)        (Dr. GRPO: without the std division)

Loss (PPO clip with DAPO's decoupled bounds, token-level aggregation over the whole batch):

    rho_t = exp(log pi_theta(y_t) - log pi_old(y_t))
    L = - sum_t m_t * w_t * min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) / sum_t m_t
      + beta * KL_t(pi_theta || pi_ref)

``w_t`` is an optional importance weight (truncated IS for stale data). KL estimators
(Schulman 2020): k1 = log pi - log pi_ref, k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards_GS: Tensor, std_norm: bool = True, eps: float = 1e-6) -> Tensor:
    """[groups, samples] rewards -> [groups, samples] advantages."""
    mean = rewards_GS.mean(dim=1, keepdim=True)
    adv = rewards_GS - mean
    if std_norm:
        adv = adv / (rewards_GS.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv


def kl_estimate(logp_BT: Tensor, ref_logp_BT: Tensor, kind: str) -> Tensor:
    d = ref_logp_BT - logp_BT
    if kind == "k1":
        return -d
    if kind == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {kind!r}")


def clipped_pg_loss(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_B: Tensor,
    mask_BT: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    total_tokens: float | None = None,
    is_weight_BT: Tensor | None = None,
    ref_logp_BT: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level clipped loss. ``total_tokens`` normalises over a whole batch split into
    micro-batches (defaults to this call's mask sum). Returns (loss, detached stats)."""
    mask = mask_BT.to(logp_BT.dtype)
    denom = float(total_tokens) if total_tokens is not None else mask.sum().clamp(min=1.0)
    ratio = torch.exp(logp_BT - old_logp_BT)
    adv = adv_B.unsqueeze(1).to(logp_BT.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_tok = -torch.minimum(unclipped, clipped)
    if is_weight_BT is not None:
        per_tok = per_tok * is_weight_BT
    if kl_coef > 0.0:
        if ref_logp_BT is None:
            raise ValueError("kl_coef > 0 needs reference log-probs")
        kl = kl_estimate(logp_BT, ref_logp_BT, kl_estimator)
        per_tok = per_tok + kl_coef * kl
    loss = (per_tok * mask).sum() / denom
    with torch.no_grad():
        clipped_frac = ((unclipped != clipped).to(mask.dtype) * mask).sum()
        stats = {"clip_count": clipped_frac, "tokens": mask.sum()}
    return loss, stats

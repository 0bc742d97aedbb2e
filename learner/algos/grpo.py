"""GRPO and its DAPO / Dr. GRPO variants: group-relative advantages and the token-level clipped
loss (Shao et al. 2024; Yu et al. 2025; Liu et al. 2025).

    A_i = (r_i - mean(r)) / (std(r) + eps)          (Dr. GRPO: without the std division)
    L   = - sum_t m_t w_t min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) / sum_t m_t
          + beta * KL_t(pi || pi_ref)
"""

from __future__ import annotations

import torch
from torch import Tensor

from climbrl.learner.algos.common import BatchNorm, clipped_surrogate, token_log_ratio


def group_advantages(
    rewards_GS: Tensor, std_norm: bool = True, eps: float = 1e-6, valid_GS: Tensor | None = None
) -> Tensor:
    """GRPO (Shao et al. 2024), per group of G samples of one prompt:

        A_i = (r_i - mean(r)) / (std(r) + eps)

    Dr. GRPO (Liu et al. 2025) drops the std division (``std_norm=False``): A_i = r_i - mean(r).
    std is the unbiased sample std, as in TRL. Returns [groups, samples].

    ``valid_GS`` (bool) leaves samples out of their group's statistics (episodes whose
    environment failed): mean and std are over the valid ones, and an invalid sample's
    advantage is 0. A group with a single valid sample has advantage 0.
    """
    if valid_GS is None:
        adv_GS = rewards_GS - rewards_GS.mean(dim=1, keepdim=True)
        if std_norm:
            adv_GS = adv_GS / (rewards_GS.std(dim=1, keepdim=True, unbiased=True) + eps)
        return adv_GS
    v = valid_GS.to(rewards_GS.dtype)
    n = v.sum(dim=1, keepdim=True)
    mean = (rewards_GS * v).sum(dim=1, keepdim=True) / n.clamp(min=1)
    adv_GS = (rewards_GS - mean) * v
    if std_norm:
        var = (adv_GS**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        adv_GS = adv_GS / (var.sqrt() + eps)
    return adv_GS


def surrogate(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    clip_low: float,
    clip_high: float,
    ratio_cap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-token clipped loss on the token ratio r_t = pi(y_t) / pi_old(y_t)."""
    ratio = torch.exp(token_log_ratio(logp_BT, old_logp_BT))
    return clipped_surrogate(ratio, adv_BT, clip_low, clip_high, ratio_cap)


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
    """GRPO's loss with token aggregation as one call (``PolicyLoss('grpo', ...)``):
    ``total_tokens`` normalises over a whole batch split into micro-batches (defaults to this
    call's mask sum). Returns (loss, detached stats)."""
    from climbrl.learner.algos.loss import PolicyLoss

    tokens = float(mask_BT.sum()) if total_tokens is None else float(total_tokens)
    pl = PolicyLoss(
        "grpo", clip_low, clip_high, aggregation="token", kl_coef=kl_coef, kl_estimator=kl_estimator
    )
    loss, st = pl(
        logp_BT,
        old_logp_BT,
        adv_B,
        mask_BT,
        BatchNorm(tokens, float(len(adv_B))),
        is_weight_BT=is_weight_BT,
        ref_logp_BT=ref_logp_BT,
    )
    return loss, {"clip_count": torch.tensor(st["clipped"]), "tokens": mask_BT.sum()}

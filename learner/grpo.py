"""GRPO's pieces under their historical names; the objectives live in ``objectives.py``.

    A_i = (r_i - mean(r)) / (std(r) + eps)          (Dr. GRPO: without the std division)
    L   = - sum_t m_t w_t min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) / sum_t m_t
          + beta * KL_t(pi || pi_ref)

``clipped_pg_loss`` is ``PolicyLoss(objective='grpo', aggregation='token')`` with the stats
returned as tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from climbrl.learner.objectives import BatchNorm, PolicyLoss, group_advantages, kl_estimate

__all__ = ["clipped_pg_loss", "group_advantages", "kl_estimate"]


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

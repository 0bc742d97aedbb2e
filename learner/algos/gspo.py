"""GSPO (Zheng et al. 2025): GRPO's group advantages with one length-normalised ratio per
sequence, clipped as PPO clips the token ratio."""

from __future__ import annotations

import torch
from torch import Tensor

from climbrl.learner.algos.common import clipped_surrogate
from climbrl.learner.algos.grpo import group_advantages

__all__ = ["group_advantages", "gspo_log_ratio", "surrogate"]


def gspo_log_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """The sequence-level, length-normalised ratio:

        s_i = (pi(y_i|x) / pi_old(y_i|x)) ^ (1/|y_i|) = exp( 1/|y_i| sum_t log r_{i,t} )

    Returns log s_i as [B, 1] (it broadcasts over the tokens of its sample).
    """
    m = mask_BT.to(logp_BT.dtype)
    num_B = ((logp_BT - old_logp_BT) * m).sum(-1)
    return (num_B / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def surrogate(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    clip_low: float,
    clip_high: float,
    ratio_cap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-token loss ([B, 1], broadcast over each sample's tokens) on the sequence ratio."""
    ratio = torch.exp(gspo_log_ratio(logp_BT, old_logp_BT, mask_BT))
    return clipped_surrogate(ratio, adv_BT, clip_low, clip_high, ratio_cap)

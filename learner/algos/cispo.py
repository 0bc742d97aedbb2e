"""CISPO (MiniMax-M1, 2025): GRPO's group advantages; the importance weight is clipped and its
gradient stopped, so every token keeps a REINFORCE gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from climbrl.learner.algos.common import token_log_ratio
from climbrl.learner.algos.grpo import group_advantages

__all__ = ["cispo_surrogate", "group_advantages", "surrogate"]


def cispo_surrogate(
    logp_BT: Tensor, ratio_BT: Tensor, adv_BT: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """The per-token loss

        l_t = - sg( clip(r_t, 1 - eps_low, 1 + eps_high) ) * A_t * log pi(y_t)

    (TRL's ``epsilon_high`` for CISPO is the absolute cap, i.e. 1 + eps_high here; the paper
    leaves the lower bound off, which is ``clip_low = 1``.) Returns (loss, clipped mask).
    """
    w_BT = torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high).detach()
    return -w_BT * adv_BT * logp_BT, (w_BT != ratio_BT).detach()


def surrogate(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    clip_low: float,
    clip_high: float,
    ratio_cap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """CISPO's per-token loss on the token ratio; ``ratio_cap`` does not apply (clip_high
    bounds the weight already)."""
    ratio = torch.exp(token_log_ratio(logp_BT, old_logp_BT))
    return cispo_surrogate(logp_BT, ratio, adv_BT, clip_low, clip_high)

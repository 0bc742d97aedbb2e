"""Reward shaping, batch filters and the entropy controller: the pieces around the loss
(``learner.shaping``).

- ``overlong_penalty``: DAPO's soft overlong punishment.
- ``length_penalty``: a difficulty-aware length penalty (Kimi k1.5's, scaled by pass rate).
- ``pass_rate`` / ``keep_group``: dynamic sampling (DAPO) and the trainability band filter,
  applied per group in the learner's collect loop, which refills the batch.
- ``truncated_mask``: DAPO's overlong filtering (no loss on completions cut by the budget).
- ``ClipHighController``: steers the clip-high bound toward a target entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def overlong_penalty(length_B: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO (Yu et al. 2025) soft overlong punishment, added to the reward, with
    L_max = ``max_len`` and L_cache = ``buffer``:

        R_len(y) = 0                                  if |y| <= L_max - L_cache
                 = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                 = -1                                 if |y| > L_max

    times ``factor``. Returns [B]."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    length_B = length_B.double()
    soft = max_len - buffer
    pen_B = torch.where(length_B <= soft, torch.zeros_like(length_B), (soft - length_B) / buffer)
    return factor * pen_B.clamp(min=-1.0)


def length_penalty(
    length_GS: Tensor, correct_GS: Tensor, coef: float, difficulty_aware: bool = True
) -> Tensor:
    """Length penalty of Kimi k1.5 (2025), made difficulty-aware. Per group, with the shortest
    and longest response lengths L_min, L_max and pass rate p:

        lambda_i = 1/2 - (|y_i| - L_min) / (L_max - L_min)        (0 when L_max = L_min)
        R_i     += coef * s * ( lambda_i            if y_i is correct
                                min(0, lambda_i)    otherwise )

    with s = p when ``difficulty_aware`` (easy prompts are pushed to be short, hard ones, whose
    long answers may be needed, barely at all), else s = 1. Returns [G, S] reward deltas."""
    L = length_GS.double()
    lo, hi = L.min(dim=1, keepdim=True).values, L.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp(min=1e-9)
    lam = torch.where(hi > lo, 0.5 - (L - lo) / span, torch.zeros_like(L))
    c = correct_GS.double()
    pen = torch.where(c > 0.5, lam, lam.clamp(max=0.0))
    scale = c.mean(dim=1, keepdim=True) if difficulty_aware else torch.ones_like(lo)
    return coef * scale * pen


def sample_correct(sample: Any, reward_max: float) -> float:
    """1.0 when a sample passed: the env's ``correct`` metric, else reward at the top of range."""
    c = sample.metrics.get("correct") if sample.metrics else None
    return float(c) if c is not None else float(sample.reward >= reward_max)


def pass_rate(samples: list[Any], reward_max: float) -> float:
    return sum(sample_correct(s, reward_max) for s in samples) / max(len(samples), 1)


def keep_group(rate: float, dynamic_sampling: bool, band: tuple[float, float]) -> bool:
    """Dynamic sampling (DAPO) drops groups every sample of which passed or failed (they carry
    no group-relative signal); the trainability filter keeps pass rates in ``band`` (inclusive)."""
    if dynamic_sampling and (rate <= 0.0 or rate >= 1.0):
        return False
    return band[0] <= rate <= band[1]


def truncated_mask(finish_reasons: list[str]) -> Tensor:
    """[B] 0.0 for completions stopped by the token budget (finish_reason 'length'), else 1.0."""
    return torch.tensor([0.0 if f == "length" else 1.0 for f in finish_reasons])


@dataclass
class ClipHighController:
    """Integral controller on the clip-high bound: entropy below target opens the upper clip
    (more room for low-probability tokens to grow, i.e. exploration), above target closes it:

        eps_high <- clip(eps_high + lr * (H_target - H), eps_min, eps_max)

    ``H`` is the batch's mean token entropy. The state is ``clip_high``; it is checkpointed."""

    clip_high: float
    target: float
    lr: float
    lo: float
    hi: float

    def update(self, entropy: float) -> float:
        if entropy == entropy:  # not NaN
            self.clip_high = min(
                self.hi, max(self.lo, self.clip_high + self.lr * (self.target - entropy))
            )
        return self.clip_high

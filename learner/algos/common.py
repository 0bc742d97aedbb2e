"""What every objective family uses: the batch a step trains on, loss aggregation, the KL term,
the clipped surrogate, off-policy weights and the train/rollout mismatch metrics.

Every function takes per-token tensors named by shape (``_BT`` = [samples, completion tokens],
``_B1`` = one value per sample broadcast over tokens, ``_GS`` = [groups, samples per group]) and
a trainable-token mask. Loss functions return the *per-token* loss; ``aggregate`` turns it into
the scalar for a micro-batch, normalised over the whole optimizer batch so that micro-batches add
up to exactly the full-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Aggregation = Literal["token", "sample", "fixed"]


@dataclass(frozen=True)
class BatchNorm:
    """Whole-optimizer-batch counts that every micro-batch normalises by."""

    tokens: float  # trainable tokens in the batch
    samples: float  # samples with at least one trainable token
    fixed_len: float = 0.0  # Dr. GRPO's constant (the generation budget)


@dataclass
class StepBatch:
    """One optimizer batch as ``ObjectiveStep.prepare`` builds it (learner/algos/step.py)."""

    samples: list[Any]
    rewards_B: Tensor  # after shaping
    raw_rewards_B: Tensor
    lag_B: Tensor
    keep_B: Tensor  # 0 for samples excluded from the loss (truncated, when masked)
    norm: BatchNorm
    adv_B: Tensor | None = None  # group-relative objectives
    adv_BT: Tensor | None = None  # PPO (GAE)
    returns_BT: Tensor | None = None
    values_BT: Tensor | None = None  # PPO: V_old(s_t), the critic's values the returns use
    prox_BT: Tensor | None = None  # decoupled: log pi_prox(y_t), before the batch's first step
    epochs: int = 1
    updates: int = 1  # optimizer steps taken over this batch
    stepped: bool = False  # the weights moved since the batch was taken
    acc: dict[str, float] = field(default_factory=dict)
    env_errors: int = 0  # episodes left out because their environment failed


# ----------------------------------------------------------------------------- surrogate, KL


def token_log_ratio(logp_BT: Tensor, old_logp_BT: Tensor) -> Tensor:
    """PPO/GRPO token-level importance ratio, in log space: log r_t = log pi(y_t) - log pi_old."""
    return logp_BT - old_logp_BT


def clipped_surrogate(
    ratio_BT: Tensor, adv_BT: Tensor, clip_low: float, clip_high: float, ratio_cap: float = 0.0
) -> tuple[Tensor, Tensor]:
    """PPO clip (Schulman et al. 2017) with DAPO's decoupled bounds ("clip-higher", Yu et al.
    2025) and an optional hard outer cap on the ratio (dual-clip, Ye et al. 2020; TRL's
    ``delta``, INTELLECT-2):

        l_t = - min( min(r_t, c) * A_t , clip(r_t, 1 - eps_low, 1 + eps_high) * A_t )

    ``c = ratio_cap`` (0 = off) bounds the loss of a negative-advantage token whose ratio ran
    away. ``ratio_BT`` may be [B, T] (token-level) or [B, 1] (GSPO). Returns (loss, clipped mask).
    """
    clipped_ratio = torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    if ratio_cap > 0:
        ratio_BT = torch.clamp(ratio_BT, max=ratio_cap)
    unclipped_BT = ratio_BT * adv_BT
    clipped_BT = clipped_ratio * adv_BT
    loss_BT = -torch.minimum(unclipped_BT, clipped_BT)
    return loss_BT, (clipped_BT < unclipped_BT).detach()


def kl_estimate(logp_BT: Tensor, ref_logp_BT: Tensor, kind: str) -> Tensor:
    """Per-token estimators on tokens y ~ pi (Schulman 2020), d = log pi_ref(y) - log pi(y):

        k1 = -d                   k3 = exp(d) - d - 1      (k3 >= 0; GRPO's KL term)

    Both values are unbiased for KL(pi || pi_ref). As loss terms, with pi the (detached)
    sampling weight, their expected gradients are

        E_pi[grad k1] = E_pi[grad log pi] = sum_y grad pi(y) = 0
        E_pi[grad k3] = sum_y (pi(y) - pi_ref(y)) grad log pi(y) = grad KL(pi_ref || pi)

    so k1 applies no KL pressure (the config refuses it; it serves as a value only), and k3
    pulls pi along the reverse KL, KL(pi_ref || pi), not along the KL(pi || pi_ref) its value
    estimates (tests/unit/test_kl_reference.py checks both by exact sums over a vocabulary).
    ``ref_logp_BT`` is the reference's own full distribution (``reference_logprobs``), never its
    log-prob under the rollout's top-p/top-k kept set.
    """
    d_BT = ref_logp_BT - logp_BT
    if kind == "k1":
        return -d_BT
    if kind == "k3":
        return torch.exp(d_BT) - d_BT - 1
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {kind!r}")


# ----------------------------------------------------------------------------- aggregation


def aggregate(loss_BT: Tensor, mask_BT: Tensor, mode: Aggregation, norm: BatchNorm) -> Tensor:
    """Reduce per-token losses to this micro-batch's share of the batch loss:

    token  (DAPO):     sum_i sum_t l_it / sum_i |y_i|          (each token weighs the same)
    sample (GRPO):     1/N sum_i ( sum_t l_it / |y_i| )         (each sample weighs the same)
    fixed  (Dr. GRPO): sum_i sum_t l_it / (N * L_max)           (no length bias at all)
    """
    m = mask_BT.to(loss_BT.dtype)
    if loss_BT.shape[-1] != m.shape[-1]:
        loss_BT = loss_BT.expand_as(m)
    if mode == "token":
        return (loss_BT * m).sum() / max(norm.tokens, 1.0)
    if mode == "sample":
        per_sample = (loss_BT * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_sample.sum() / max(norm.samples, 1.0)
    if mode == "fixed":
        if norm.fixed_len <= 0:
            raise ValueError("loss aggregation 'fixed' needs a positive fixed length")
        return (loss_BT * m).sum() / (max(norm.samples, 1.0) * norm.fixed_len)
    raise ValueError(f"loss aggregation must be token, sample or fixed, got {mode!r}")


# ----------------------------------------------------------------------------- off-policy


def offpolicy_weights(
    logp_BT: Tensor,
    rollout_logp_BT: Tensor,
    mask_BT: Tensor,
    kind: Literal["tis", "icepop"],
    level: Literal["token", "sequence"],
    low: float,
    high: float,
) -> tuple[Tensor, Tensor]:
    """Importance weights that correct for sampling from a stale or mismatched engine policy
    mu (async data, inference/training numerics). With w = pi_train / mu, detached:

        token:    w_t = exp(log pi(y_t) - log mu(y_t))
        sequence: w   = exp( sum_t (log pi(y_t) - log mu(y_t)) )     (same for every token)

        TIS (Yao et al. 2025):   w <- clip(w, low, high)          (truncate)
        IcePop (Ling 2.0, 2025): w <- w * 1[low <= w <= high]     (mask the token/sequence)

    Same convention as TRL's ``vllm_importance_sampling_mode``. Returns (w_BT, changed_BT), the
    latter marking trainable tokens whose weight was truncated or masked.
    """
    m = mask_BT > 0
    d_BT = torch.where(m, (logp_BT.detach() - rollout_logp_BT), torch.zeros_like(logp_BT))
    if level == "sequence":
        d_BT = d_BT.sum(-1, keepdim=True).expand_as(d_BT)
    elif level != "token":
        raise ValueError(f"off-policy level must be token or sequence, got {level!r}")
    w_BT = torch.exp(d_BT)
    out_BT = (w_BT < low) | (w_BT > high)
    if kind == "tis":
        w_BT = w_BT.clamp(min=low, max=high)
    elif kind == "icepop":
        w_BT = w_BT.masked_fill(out_BT, 0.0)
    else:
        raise ValueError(f"off-policy correction must be tis or icepop, got {kind!r}")
    return w_BT, out_BT & m


def behaviour_correction(
    prox_BT: Tensor,
    rollout_BT: Tensor,
    mask_BT: Tensor,
    lag_B1: Tensor,
    off: Any,
    max_staleness: int,
) -> tuple[Tensor, Tensor | None, float]:
    """The policy the ratio is taken against, the importance weight on the loss (None = 1) and
    the count of trainable tokens whose weight was truncated or masked.

    ``off`` is ``learner.offpolicy``. With a correction (tis/icepop) the objective is
    decoupled: the clip is on pi_theta / pi_prox and the sampler mu enters through the weight
    pi_prox / mu. With ``stale_policy = 'correct'`` only samples past ``max_staleness`` are
    decoupled, with TIS capped at ``tis_cap``. Otherwise the ratio is against mu."""
    if off.correction != "none":
        w, changed = offpolicy_weights(
            prox_BT, rollout_BT, mask_BT, off.correction, off.level, off.low, off.high
        )
        return prox_BT, w, float(changed.sum())
    if off.stale_policy == "correct" and bool((lag_B1 > max_staleness).any()):
        stale = (lag_B1 > max_staleness).expand_as(prox_BT)
        w_tis, changed = offpolicy_weights(
            prox_BT, rollout_BT, mask_BT, "tis", "token", 0.0, off.tis_cap
        )
        w = torch.where(stale, w_tis, torch.ones_like(w_tis))
        return torch.where(stale, prox_BT, rollout_BT), w, float((changed & stale).sum())
    return rollout_BT, None, 0.0


# ----------------------------------------------------------------------------- mismatch


def mismatch_sums(logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor) -> dict[str, float]:
    """Train/rollout mismatch over the masked tokens, as sums (callers average across
    micro-batches): |log pi_train - log mu| (sum and max) and the k3 estimate of
    KL(mu || pi_train) on tokens sampled from mu, with d = log pi_train - log mu:
    KL ~ exp(d) - d - 1."""
    m = mask_BT > 0
    d = (logp_BT.detach() - rollout_logp_BT)[m].double()
    if d.numel() == 0:
        return {"abs_sum": 0.0, "abs_max": 0.0, "kl_sum": 0.0, "n": 0.0}
    return {
        "abs_sum": float(d.abs().sum()),
        "abs_max": float(d.abs().max()),
        "kl_sum": float((torch.exp(d) - d - 1).sum()),
        "n": float(d.numel()),
    }


def add_mismatch(acc: dict[str, float], mm: dict[str, float], probe: bool = False) -> None:
    """Add ``mismatch_sums`` to a step's accumulators (``probe``: measured under the weight
    snapshot, learner/snapshot.py)."""
    acc["mm_abs"] += mm["abs_sum"]
    acc["mm_kl"] += mm["kl_sum"]
    acc["mm_n"] += mm["n"]
    acc["mm_max"] = max(acc["mm_max"], mm["abs_max"])
    if probe:
        acc["mm_probe_n"] += mm["n"]

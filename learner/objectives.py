"""Policy objectives as small typed units: advantages, per-token losses, aggregation, KL,
off-policy corrections and the train/rollout mismatch metrics.

Every function takes per-token tensors named by shape (``_BT`` = [samples, completion tokens],
``_B1`` = one value per sample broadcast over tokens, ``_GS`` = [groups, samples per group]) and
a trainable-token mask. Loss functions return the *per-token* loss; ``aggregate`` turns it into
the scalar for a micro-batch, normalised over the whole optimizer batch so that micro-batches add
up to exactly the full-batch loss. ``PolicyLoss`` composes them as the learner uses them.

Tested against TRL's GRPOTrainer (tests/unit/test_objectives_trl.py) and hand-computed cases
(tests/unit/test_objectives.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Objective = Literal["grpo", "gspo", "cispo", "ppo"]
Aggregation = Literal["token", "sample", "fixed"]

# ----------------------------------------------------------------------------- advantages


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


def terminal_rewards(reward_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Outcome reward placed on each sample's last trainable token, zero elsewhere."""
    m = mask_BT > 0
    idx = torch.arange(mask_BT.shape[1], device=mask_BT.device).expand_as(mask_BT)
    last_B = torch.where(m, idx, torch.full_like(idx, -1)).max(dim=1).values
    r_BT = torch.zeros(mask_BT.shape, dtype=reward_B.dtype, device=reward_B.device)
    has = last_B >= 0
    r_BT[has.nonzero().squeeze(1), last_B[has]] = reward_B[has]
    return r_BT


def gae(
    rewards_BT: Tensor,
    values_BT: Tensor,
    mask_BT: Tensor,
    gamma: float,
    lam: float,
    bootstrap_B: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each sample's trainable
    tokens, which are the agent's time steps (env/tool tokens with mask 0 are skipped):

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = sum_l (gamma * lam)^l * delta_{t+l}
        R_t     = A_t + V(s_t)                       (the critic's regression target)

    After the last trainable token T-1 the next value is V(s_T) = ``bootstrap_B``: the critic's
    value of the state after the last token for an episode cut off by the token budget (it did
    not end, so its return goes on past T), 0 for one that terminated. ``bootstrap_B=None`` is
    0 for every sample.

    Samples of different lengths and one rollout per prompt need nothing special: every row is
    its own trajectory. Returns (advantages_BT, returns_BT), zero on masked tokens.
    """
    B, T = mask_BT.shape
    m = mask_BT > 0
    values_BT = values_BT.detach()
    adv_BT = torch.zeros_like(values_BT)
    next_v_B = torch.zeros(B, dtype=values_BT.dtype, device=values_BT.device)
    if bootstrap_B is not None:
        next_v_B = bootstrap_B.detach().to(next_v_B).clone()
    run_B = torch.zeros_like(next_v_B)
    for t in range(T - 1, -1, -1):
        delta_B = rewards_BT[:, t] + gamma * next_v_B - values_BT[:, t]
        new_B = delta_B + gamma * lam * run_B
        run_B = torch.where(m[:, t], new_B, run_B)
        next_v_B = torch.where(m[:, t], values_BT[:, t], next_v_B)
        adv_BT[:, t] = torch.where(m[:, t], new_B, torch.zeros_like(new_B))
    returns_BT = torch.where(m, adv_BT + values_BT, torch.zeros_like(adv_BT))
    return adv_BT, returns_BT


def whiten(x_BT: Tensor, mask_BT: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (PPO's advantage normalisation)."""
    m = mask_BT > 0
    vals = x_BT[m]
    if vals.numel() < 2:
        return torch.where(m, x_BT - vals.mean() if vals.numel() else x_BT, torch.zeros_like(x_BT))
    return torch.where(m, (x_BT - vals.mean()) / (vals.std() + eps), torch.zeros_like(x_BT))


# ----------------------------------------------------------------------------- ratios


def token_log_ratio(logp_BT: Tensor, old_logp_BT: Tensor) -> Tensor:
    """PPO/GRPO token-level importance ratio, in log space: log r_t = log pi(y_t) - log pi_old."""
    return logp_BT - old_logp_BT


def gspo_log_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """GSPO (Zheng et al. 2025), the sequence-level, length-normalised ratio:

        s_i = (pi(y_i|x) / pi_old(y_i|x)) ^ (1/|y_i|) = exp( 1/|y_i| sum_t log r_{i,t} )

    Returns log s_i as [B, 1] (it broadcasts over the tokens of its sample).
    """
    m = mask_BT.to(logp_BT.dtype)
    num_B = ((logp_BT - old_logp_BT) * m).sum(-1)
    return (num_B / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)


# ----------------------------------------------------------------------------- per-token losses


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


def cispo_surrogate(
    logp_BT: Tensor, ratio_BT: Tensor, adv_BT: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1, 2025): clip the importance weight, not the update, and stop its
    gradient, so every token keeps a REINFORCE gradient:

        l_t = - sg( clip(r_t, 1 - eps_low, 1 + eps_high) ) * A_t * log pi(y_t)

    (TRL's ``epsilon_high`` for CISPO is the absolute cap, i.e. 1 + eps_high here; the paper
    leaves the lower bound off, which is ``clip_low = 1``.) Returns (loss, clipped mask).
    """
    w_BT = torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high).detach()
    return -w_BT * adv_BT * logp_BT, (w_BT != ratio_BT).detach()


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


@dataclass(frozen=True)
class BatchNorm:
    """Whole-optimizer-batch counts that every micro-batch normalises by."""

    tokens: float  # trainable tokens in the batch
    samples: float  # samples with at least one trainable token
    fixed_len: float = 0.0  # Dr. GRPO's constant (the generation budget)


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


# ----------------------------------------------------------------------------- the composed loss


@dataclass
class PolicyLoss:
    """One objective with its knobs, as the learner calls it per micro-batch.

    L = aggregate( w_t * l_t(objective) + beta * KL_t ) - c_H * mean_t H_t

    where w_t is the off-policy weight (1 when off), KL_t is ``kl_estimate`` (k3: its gradient
    is that of KL(pi_ref || pi)), and the entropy bonus is the token mean over the whole batch
    (TRL's convention, independent of the aggregation).
    """

    objective: Objective = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    ratio_cap: float = 0.0
    aggregation: Aggregation = "token"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0

    def __call__(
        self,
        logp_BT: Tensor,
        old_logp_BT: Tensor,
        adv_BT: Tensor,
        mask_BT: Tensor,
        norm: BatchNorm,
        *,
        is_weight_BT: Tensor | None = None,
        ref_logp_BT: Tensor | None = None,
        entropy_BT: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """``adv_BT`` may be [B] (one advantage per sample) or [B, T] (PPO's GAE). Returns the
        micro-batch loss and detached sums (clipped tokens, KL sum) for the step's metrics."""
        if adv_BT.dim() == 1:
            adv_BT = adv_BT.unsqueeze(1)
        adv_BT = adv_BT.to(logp_BT.dtype)
        if self.objective == "gspo":
            log_ratio = gspo_log_ratio(logp_BT, old_logp_BT, mask_BT)
        else:
            log_ratio = token_log_ratio(logp_BT, old_logp_BT)
        ratio = torch.exp(log_ratio)
        if self.objective == "cispo":
            loss_BT, clipped = cispo_surrogate(
                logp_BT, ratio, adv_BT, self.clip_low, self.clip_high
            )
        elif self.objective in ("grpo", "gspo", "ppo"):
            loss_BT, clipped = clipped_surrogate(
                ratio, adv_BT, self.clip_low, self.clip_high, self.ratio_cap
            )
        else:
            raise ValueError(f"unknown objective {self.objective!r}: grpo, gspo, cispo or ppo")
        if is_weight_BT is not None:
            loss_BT = loss_BT * is_weight_BT
        m = mask_BT.to(logp_BT.dtype)
        kl_sum = 0.0
        if self.kl_coef > 0:
            if ref_logp_BT is None:
                raise ValueError("kl_coef > 0 needs reference log-probs")
            kl_BT = kl_estimate(logp_BT, ref_logp_BT, self.kl_estimator)
            loss_BT = loss_BT + self.kl_coef * kl_BT
            kl_sum = float((kl_BT.detach() * m).sum())
        loss = aggregate(loss_BT, mask_BT, self.aggregation, norm)
        if self.entropy_coef != 0:
            if entropy_BT is None:
                raise ValueError("entropy_coef != 0 needs per-token entropies")
            loss = loss - self.entropy_coef * (entropy_BT * m).sum() / max(norm.tokens, 1.0)
        clipped_n = float((clipped.expand_as(m) & (m > 0)).sum())
        return loss, {"clipped": clipped_n, "kl_sum": kl_sum}


def value_loss(
    values_BT: Tensor,
    returns_BT: Tensor,
    mask_BT: Tensor,
    norm: BatchNorm,
    old_values_BT: Tensor | None = None,
    clip: float = 0.0,
) -> Tensor:
    """Critic regression (PPO, Schulman et al. 2017) over the batch's tokens:

        L_V = 1/2 * mean_t (V(s_t) - R_t)^2

    With ``clip = eps_v > 0`` the value update is clipped around the values V_old the returns
    were computed with (``old_values_BT``; the clipped value loss of OpenAI baselines' PPO2):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L_V    = 1/2 * mean_t max( (V - R_t)^2, (V_clip - R_t)^2 )

    The mean is over the whole batch's trainable tokens (``norm.tokens``), as the policy loss.
    """
    m = mask_BT.to(values_BT.dtype)
    sq_BT = (values_BT - returns_BT) ** 2
    if clip > 0:
        if old_values_BT is None:
            raise ValueError(
                "value_loss with clip > 0 needs old_values_BT (the values the "
                "returns were computed with)"
            )
        old_BT = old_values_BT.detach().to(values_BT.dtype)
        v_clip_BT = old_BT + torch.clamp(values_BT - old_BT, -clip, clip)
        sq_BT = torch.maximum(sq_BT, (v_clip_BT - returns_BT) ** 2)
    return 0.5 * (sq_BT * m).sum() / max(norm.tokens, 1.0)

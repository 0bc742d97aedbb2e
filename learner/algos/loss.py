"""``PolicyLoss``: one objective family's surrogate with the terms every family shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from climbrl.learner.algos import cispo, grpo, gspo, ppo
from climbrl.learner.algos.common import Aggregation, BatchNorm, aggregate, kl_estimate

Surrogate = Callable[..., tuple[Tensor, Tensor]]
# each family's per-token loss: (logp, old_logp, adv, mask, clip_low, clip_high, ratio_cap)
SURROGATES: dict[str, Surrogate] = {
    "grpo": grpo.surrogate,
    "gspo": gspo.surrogate,
    "cispo": cispo.surrogate,
    "ppo": ppo.surrogate,
}


@dataclass
class PolicyLoss:
    """One objective with its knobs, as the learner calls it per micro-batch.

    L = aggregate( w_t * l_t(objective) + beta * KL_t ) - c_H * mean_t H_t

    where w_t is the off-policy weight (1 when off), KL_t is ``kl_estimate`` (k3: its gradient
    is that of KL(pi_ref || pi)), and the entropy bonus is the token mean over the whole batch
    (TRL's convention, independent of the aggregation).
    """

    objective: str = "grpo"
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
        surrogate = SURROGATES.get(self.objective)
        if surrogate is None:
            raise ValueError(f"unknown objective {self.objective!r}: grpo, gspo, cispo or ppo")
        if adv_BT.dim() == 1:
            adv_BT = adv_BT.unsqueeze(1)
        adv_BT = adv_BT.to(logp_BT.dtype)
        loss_BT, clipped = surrogate(
            logp_BT, old_logp_BT, adv_BT, mask_BT, self.clip_low, self.clip_high, self.ratio_cap
        )
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

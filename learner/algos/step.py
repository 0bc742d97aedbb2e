"""One optimizer step of the configured objective, as the learner drives it.

    batch = step.prepare(groups, version)           # shaped rewards, advantages, masks, norms
    step.prepare_values(model, batch)               # PPO only: V(s_t), V(s_T), GAE(gamma, lambda)
    if step.needs_proximal(batch): batch.prox_BT = ...   # decoupled: log pi_prox before any step
    for epoch in range(epochs):
        for (lo, hi, norm) in step.minibatches(batch):   # one optimizer step each
            for each micro-batch of samples[lo:hi]:
                b = completion_logprobs(model, mb, ...)     # PPO's value head reads its hidden
                step.micro_loss(batch, i, b, ref_logp, norm, epoch).backward()
            optimizer step; step.step_critic()
    stats = step.finish(batch)

With ``minibatches = epochs = 1`` that is one optimizer step per batch. With more, the policy
moves between the steps over one batch, so the ratio pi_theta / pi_old and every clip on it
bind (PPO, Schulman et al. 2017). pi_old is the sampler's policy mu (the rollout's log-probs),
except in the decoupled form (``learner.offpolicy.correction`` tis/icepop, and the stale samples
of ``stale_policy = "correct"``), where it is the proximal policy pi_prox: the learner's weights
when the batch is taken (Hilton et al. 2022, "Batch size-invariance for policy optimization";
AReaL). There the importance weight pi_prox / mu corrects for the sampler, and the clip is on
pi_theta / pi_prox.

``ObjectiveStep`` owns the objective's state: the loss (``PolicyLoss``), PPO's critic
(``PpoCritic``, learner/algos/ppo.py) and the clip-high controller. ``Trainer.train_step`` in
learner/trainer.py reads as the loop above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from climbrl.learner.algos.common import (
    BatchNorm,
    StepBatch,
    add_mismatch,
    behaviour_correction,
    mismatch_sums,
)
from climbrl.learner.algos.grpo import group_advantages
from climbrl.learner.algos.loss import PolicyLoss
from climbrl.learner.algos.ppo import Critic, PpoCritic
from climbrl.learner.algos.shaping import (
    ClipHighController,
    length_penalty,
    overlong_penalty,
    sample_correct,
    truncated_mask,
)
from climbrl.wire import ENV_ERROR

_ACC_KEYS = (
    "loss entropy clipped kl mm_abs mm_max mm_kl mm_n mm_probe_n op_changed vloss vmean replay_miss "
    "tokens_seen tokens_seen_once"
).split()


class ObjectiveStep:
    def __init__(self, cfg: Any, policy: nn.Module | None, reward_max: float):
        lc, self.cfg, self.lc = cfg.learner, cfg, cfg.learner
        algo = lc.algo
        self.reward_max = reward_max
        self.loss = PolicyLoss(
            objective=algo.name,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            ratio_cap=getattr(algo, "ratio_cap", 0.0),
            aggregation=algo.loss_agg,
            kl_coef=algo.kl_coef if algo.kl_estimator != "off" else 0.0,
            kl_estimator=algo.kl_estimator,
            entropy_coef=algo.entropy_coef,
        )
        self.fixed_len = float(algo.loss_agg_len or cfg.rollout.max_tokens)
        sh = lc.shaping
        self.controller: ClipHighController | None = None
        if sh.target_entropy > 0:
            self.controller = ClipHighController(
                algo.clip_high,
                sh.target_entropy,
                sh.clip_high_lr,
                sh.clip_high_min,
                sh.clip_high_max,
            )
        self.ppo: PpoCritic | None = None
        if algo.name == "ppo":
            assert policy is not None, "PPO's critic is sized from the policy"
            self.ppo = PpoCritic(cfg, policy)

    @property
    def critic(self) -> Critic | None:
        return self.ppo.critic if self.ppo is not None else None

    @property
    def critic_opt(self) -> torch.optim.Optimizer | None:
        return self.ppo.opt if self.ppo is not None else None

    # ------------------------------------------------------------------ batch

    def prepare(self, groups: list[Any], version: int) -> StepBatch:
        lc, sh = self.lc, self.lc.shaping
        samples = [s for g in groups for s in g.samples]
        raw_GS = torch.tensor([[s.reward for s in g.samples] for g in groups], dtype=torch.float64)
        rew_GS = raw_GS.clone()
        n_gen_GS = torch.tensor([[sum(s.completion_mask) for s in g.samples] for g in groups])
        if sh.overlong_buffer > 0:
            max_len = lc.algo.loss_agg_len or self.cfg.rollout.max_tokens
            rew_GS += overlong_penalty(
                n_gen_GS.flatten(), max_len, sh.overlong_buffer, sh.overlong_penalty
            ).view_as(rew_GS)
        if sh.length_penalty_coef > 0:
            correct_GS = torch.tensor(
                [[sample_correct(s, self.reward_max) for s in g.samples] for g in groups]
            )
            rew_GS += length_penalty(
                n_gen_GS, correct_GS, sh.length_penalty_coef, sh.length_penalty_difficulty_aware
            )
        keep_B = torch.ones(len(samples))
        if sh.mask_truncated:
            keep_B = truncated_mask([s.finish_reason for s in samples])
        # An episode whose environment failed (finish_reason "env_error", Sample.error) costs
        # that episode only: it is left out of its group's statistics and out of the batch.
        valid_GS = torch.tensor([[s.finish_reason != ENV_ERROR for s in g.samples] for g in groups])
        valid_B = valid_GS.flatten()
        env_errors = int((~valid_B).sum())  # a group whose episodes all failed never gets here
        keep_B = keep_B * valid_B
        tokens = float(sum(float(k) * sum(s.completion_mask) for k, s in zip(keep_B, samples)))
        n_samples = float(
            sum(1 for k, s in zip(keep_B, samples) if k > 0 and sum(s.completion_mask))
        )
        idx = valid_B.nonzero().squeeze(1)
        lag_B = torch.tensor([version - g.policy_version for g in groups for _ in g.samples])
        batch = StepBatch(
            samples=[samples[i] for i in idx.tolist()],
            rewards_B=rew_GS.flatten()[idx],
            raw_rewards_B=raw_GS.flatten()[idx],
            lag_B=lag_B[idx],
            keep_B=keep_B[idx],
            norm=BatchNorm(tokens, n_samples, self.fixed_len),
            env_errors=env_errors,
            epochs=lc.epochs,
        )
        if self.ppo is None:  # group-relative advantages (grpo, gspo, cispo)
            batch.adv_B = group_advantages(
                rew_GS, std_norm=lc.algo.adv_std_norm, valid_GS=valid_GS if env_errors else None
            ).flatten()[idx]
        batch.acc = dict.fromkeys(_ACC_KEYS, 0.0)
        return batch

    def minibatches(self, batch: StepBatch) -> list[tuple[int, int, BatchNorm]]:
        """``(lo, hi, norm)`` of each optimizer step of an epoch: ``learner.minibatches``
        contiguous slices of the batch's samples (sizes differ by at most one), each with the
        counts of its own trainable tokens and samples, so each step's loss is the mean over
        its mini-batch."""
        n = len(batch.samples)
        k = min(self.lc.minibatches, n)
        bounds = [n * j // k for j in range(k + 1)]
        out = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            keep = batch.keep_B[lo:hi]
            lens = [sum(s.completion_mask) for s in batch.samples[lo:hi]]
            tokens = float(sum(float(kk) * ln for kk, ln in zip(keep, lens)))
            n_samples = float(sum(1 for kk, ln in zip(keep, lens) if kk > 0 and ln))
            out.append((lo, hi, BatchNorm(tokens, n_samples, self.fixed_len)))
        return out

    def idle_rows(self, batch: StepBatch) -> Tensor | None:
        """[B] True for the samples whose loss and gradient are exactly 0 this step: a
        group-relative advantage of exactly 0 under a loss whose every term scales with the
        advantage. None where ``learner.skip_zero_advantage`` is off or the loss has a term
        that does not (KL, the entropy bonus, the entropy-driven clip-high, PPO's value)."""
        if (
            not self.lc.skip_zero_advantage
            or batch.adv_B is None
            or self.ppo is not None
            or self.loss.kl_coef > 0
            or self.loss.entropy_coef != 0
            or self.controller is not None
        ):
            return None
        return batch.adv_B == 0

    def needs_proximal(self, batch: StepBatch) -> bool:
        """Whether the decoupled objective needs log pi_prox from a separate no-grad forward:
        only when the batch takes more than one optimizer step (with one, pi_prox is the
        weights of the step's own forward, and its detached log-probs are pi_prox)."""
        lc, off = self.lc, self.lc.offpolicy
        decoupled = off.correction != "none" or (
            off.stale_policy == "correct" and bool((batch.lag_B > lc.max_staleness).any())
        )
        return decoupled and lc.minibatches * lc.epochs > 1

    def prepare_values(self, policy: nn.Module, batch: StepBatch) -> None:
        """PPO: the critic's values and GAE advantages of the batch (``PpoCritic``)."""
        assert self.ppo is not None
        self.ppo.prepare_values(policy, batch)

    # ------------------------------------------------------------------ micro-batches

    def micro_loss(
        self,
        batch: StepBatch,
        i: int,
        b: dict[str, Tensor],
        ref_logp_BT: Tensor | None,
        norm: BatchNorm | None = None,
        epoch: int = 0,
    ) -> Tensor:
        """Loss of samples[i : i + len(b)], normalised over its optimizer step's samples
        (``norm``: the mini-batch's counts; the whole batch's by default)."""
        acc = batch.acc
        norm = norm or batch.norm
        logp, rollout = b["logp"], b["old_logp"]
        n, Tc = logp.shape
        dev = logp.device  # the batch's tensors live on the CPU; the model may be on a GPU
        mask = b["mask"] * batch.keep_B[i : i + n].to(b["mask"]).unsqueeze(1)
        lag = batch.lag_B[i : i + n].to(dev).unsqueeze(1)
        # pi_prox: the weights when the batch was taken (see the module docstring)
        prox = (
            batch.prox_BT[i : i + n, :Tc].to(logp) if batch.prox_BT is not None else logp.detach()
        )
        old, w, changed = behaviour_correction(
            prox, rollout, mask, lag, self.lc.offpolicy, self.lc.max_staleness
        )
        if epoch == 0:
            acc["op_changed"] += changed
        if batch.adv_B is not None:
            adv = batch.adv_B[i : i + n]
        else:
            assert batch.adv_BT is not None  # PPO: prepare_values
            adv = batch.adv_BT[i : i + n, :Tc]
        adv = adv.to(dev)
        loss, st = self.loss(
            logp,
            old,
            adv,
            mask,
            norm,
            is_weight_BT=w,
            ref_logp_BT=ref_logp_BT,
            entropy_BT=b["entropy"] if self.loss.entropy_coef else None,
        )
        if self.ppo is not None:
            loss = loss + self.ppo.value_term(batch, i, b, mask, norm)
        with torch.no_grad():
            m = mask.bool()
            if epoch == 0 and (batch.prox_BT is not None or not batch.stepped):
                # engine/trainer mismatch: same weights (lag 0), before this batch's updates
                fresh = m & (lag == 0)
                add_mismatch(acc, mismatch_sums(prox, rollout, fresh))
            if "replay_miss" in b and epoch == 0:  # sampled tokens outside the learner's top-n
                acc["replay_miss"] += float((b["replay_miss"] * mask).sum())
            acc["loss"] += float(loss)
            acc["entropy"] += float(b["entropy"][m].sum())
            acc["tokens_seen"] += float(m.sum())  # the denominators of the token means
            if epoch == 0:
                acc["tokens_seen_once"] += float(m.sum())
            acc["clipped"] += st["clipped"]
            acc["kl"] += st["kl_sum"]
        return loss

    # ------------------------------------------------------------------ end of step

    def zero_grad(self) -> None:
        if self.ppo is not None:
            self.ppo.zero_grad()

    def step_critic(self) -> float:
        return self.ppo.step() if self.ppo is not None else float("nan")

    def finish(self, batch: StepBatch) -> dict[str, float]:
        """The step's metrics. Sums over every pass of the batch are averaged: per token over
        ``epochs`` passes of its tokens, the losses over its ``updates`` optimizer steps."""
        acc = batch.acc
        # the trainable tokens forwarded: once (n_tok), and over all the passes (n_seen); all of
        # the batch's unless learner.skip_zero_advantage left some micro-batches out
        n_tok = max(acc["tokens_seen_once"], 1.0)
        n_seen = max(acc["tokens_seen"], 1.0)
        entropy = acc["entropy"] / n_seen
        out = {
            "loss": acc["loss"] / batch.updates,
            "reward": float(batch.raw_rewards_B.mean()),
            "reward_shaped": float(batch.rewards_B.mean()),
            "correct": _nanmean([s.metrics.get("correct", float("nan")) for s in batch.samples]),
            "entropy": entropy,
            "clip_frac": acc["clipped"] / n_seen,
            "staleness_mean": float(batch.lag_B.double().mean()),
            "staleness_max": float(batch.lag_B.max()),
            "mismatch_mean": acc["mm_abs"] / max(acc["mm_n"], 1.0),
            "mismatch_max": acc["mm_max"],
            "mismatch_kl": acc["mm_kl"] / max(acc["mm_n"], 1.0),
            "mismatch_tokens": acc["mm_n"],
            "mismatch_probe_tokens": acc["mm_probe_n"],  # of them, lag >= 1 (learner/snapshot.py)
            "replay_miss_tokens": acc["replay_miss"],
            "replay_miss_frac": acc["replay_miss"] / n_tok,  # of the trainable tokens
            "offpolicy_masked_frac": acc["op_changed"] / n_tok,
            "truncated_masked_frac": float(1.0 - batch.keep_B.mean()),
            "completion_len": sum(sum(s.completion_mask) for s in batch.samples)
            / len(batch.samples),
            "clip_high": self.loss.clip_high,
            "env_errors": float(batch.env_errors),
        }
        if self.loss.kl_coef > 0:
            out["kl_ref"] = acc["kl"] / n_seen
        if self.ppo is not None:
            out["value_loss"] = acc["vloss"] / batch.updates
            out["value_mean"] = acc["vmean"] / n_seen
        if self.controller is not None:
            self.loss.clip_high = self.controller.update(entropy)
        return out

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        return {"clip_high": self.loss.clip_high}

    def load_state(self, st: dict[str, Any], ckpt: Path | None = None) -> None:
        if "clip_high" in st:
            self.loss.clip_high = float(st["clip_high"])
            if self.controller is not None:
                self.controller.clip_high = self.loss.clip_high
        if ckpt is not None and self.ppo is not None:
            self.ppo.load(ckpt)

    def save(self, folder: Path) -> None:
        """Write the critic (weights + optimizer) into a checkpoint folder being assembled."""
        if self.ppo is not None:
            self.ppo.save(folder)


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")

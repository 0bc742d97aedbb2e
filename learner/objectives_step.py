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
except in the decoupled form (``offpolicy_correction`` tis/icepop, and the stale samples of
``stale_policy = "correct"``), where it is the proximal policy pi_prox: the learner's weights
when the batch is taken (Hilton et al. 2022, "Batch size-invariance for policy optimization";
AReaL). There the importance weight pi_prox / mu corrects for the sampler, and the clip is on
pi_theta / pi_prox.

``ObjectiveStep`` owns the objective's state: the PPO critic (a value head on the policy's last
hidden state, or a separate value model) with its optimizer, and the clip-high controller.
``Learner.train_step`` in learner.py reads as the loop above.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from climbrl.learner.logprobs import pack_positions
from climbrl.learner.objectives import (
    BatchNorm,
    PolicyLoss,
    gae,
    group_advantages,
    mismatch_sums,
    offpolicy_weights,
    terminal_rewards,
    value_loss,
    whiten,
)
from climbrl.learner.objectives_shaping import (
    ClipHighController,
    length_penalty,
    overlong_penalty,
    sample_correct,
    truncated_mask,
)
from climbrl.learner.replay import forced_routing, model_moe_shape, routing_BLNK
from climbrl.wire import ENV_ERROR

# Finish reasons of an episode cut off before it ended: the token budget ("length") or the
# context window ("context", rollout/server.py). GAE bootstraps these from V(s_T).
TRUNCATED = ("length", "context")


class Critic(nn.Module):
    """V(s_t) at completion positions. ``kind='head'``: a linear value head on the policy's
    last hidden state (shared backbone; the value loss also trains the backbone, weighted by
    ``vf_coef``). ``kind='model'``: a separate value model (the policy's backbone, initialised
    from ``path``) with its own head; nothing is shared.

    V(s_t) is read at the input position of the last token of s_t = prompt + completion[:t],
    the position whose hidden state predicts completion token t (``pack_positions``).

    MoE models: every backbone forward the critic runs itself (``forward_samples``,
    ``state_values``) forces the experts the samples recorded (``Sample.routing``), as
    ``completion_logprobs`` does for the policy, so the values and the log-probs see the same
    routing. With ``kind='head'`` the values trained in the loss come from the policy's own
    forward (``completion_logprobs``' ``hidden_BTH``), under that forced routing already."""

    def __init__(self, kind: str, hidden_size: int, path: str | None = None, dtype: Any = None):
        super().__init__()
        self.kind = kind
        self.backbone: nn.Module | None = None
        if kind == "model":
            from transformers import AutoModelForCausalLM

            self.backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).base_model
        self.head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # V ~ 0 at start, but not exactly: a zero head would pass no gradient to the backbone
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def values(self, hidden_BLH: Tensor, pos_BT: Tensor) -> Tensor:
        h_BTH = hidden_BLH.gather(1, pos_BT.unsqueeze(-1).expand(-1, -1, hidden_BLH.shape[-1]))
        return self.head(h_BTH.float()).squeeze(-1)

    def forward_samples(self, samples: list[Any], policy: nn.Module | None = None) -> Tensor:
        """[B, Tc] V(s_t), t < T, by a forward of the value model (or of the policy backbone)."""
        ids_BL, attn_BL, pos_BT = pack_positions(samples)
        return self.values(self._hidden(samples, policy, ids_BL, attn_BL), pos_BT)

    def state_values(
        self, samples: list[Any], policy: nn.Module | None = None
    ) -> tuple[Tensor, Tensor]:
        """([B, Tc] V(s_t) for t < T, [B] V(s_T)) from one forward of the full sequences.

        s_T is the whole sequence, prompt + every completion token; V(s_T) is read at its last
        token, which the engine never ran through the model, so no routing was recorded for
        that position and it keeps the backbone's own experts."""
        _, _, pos_BT = pack_positions(samples)
        seqs = [list(s.prompt_ids) + list(s.completion_ids) for s in samples]
        B, L = len(seqs), max(len(x) for x in seqs)
        ids_BL = torch.zeros((B, L), dtype=torch.long)
        attn_BL = torch.zeros((B, L), dtype=torch.long)
        for b, seq in enumerate(seqs):
            ids_BL[b, : len(seq)] = torch.tensor(seq)
            attn_BL[b, : len(seq)] = 1
        last_B1 = torch.tensor([[len(x) - 1] for x in seqs], dtype=torch.long)
        v_BT1 = self.values(
            self._hidden(samples, policy, ids_BL, attn_BL), torch.cat([pos_BT, last_B1], dim=1)
        )
        return v_BT1[:, :-1], v_BT1[:, -1]

    def _hidden(
        self, samples: list[Any], policy: nn.Module | None, ids_BL: Tensor, attn_BL: Tensor
    ) -> Tensor:
        backbone = self.backbone if self.backbone is not None else policy.base_model
        with replayed_routing(backbone, samples, ids_BL.shape[1]):
            return backbone(input_ids=ids_BL, attention_mask=attn_BL).last_hidden_state


def replayed_routing(
    model: nn.Module, samples: list[Any], L: int
) -> contextlib.AbstractContextManager:
    """The experts ``samples`` recorded (``Sample.routing``), forced in ``model``'s MoE routers
    for a [B, L] forward (``climbrl.learner.replay.forced_routing``); nothing when no sample
    carries routing. Positions past the record keep the model's own routing."""
    if not any(getattr(s, "routing", None) is not None for s in samples):
        return contextlib.nullcontext()
    shape = model_moe_shape(model)
    if shape is None:
        raise ValueError(
            "samples carry MoE routing but the critic's model has no MoE router; "
            "is learner.critic loading the rollout's model?"
        )
    experts_BLNK = routing_BLNK(samples, L, *shape)
    dev = next(model.parameters()).device
    return forced_routing(model, experts_BLNK.to(dev))


def turn_ends(completion_mask: list[int]) -> list[int]:
    """Index of the last generated token of each model turn: the end of every run of 1s."""
    m = list(completion_mask)
    return [t for t, x in enumerate(m) if x and (t + 1 == len(m) or not m[t + 1])]


def episode_rewards(samples: list[Any], rewards_B: Tensor, mask_BT: Tensor) -> Tensor:
    """[B, T] per-token rewards r_t of PPO's return R_t = sum_l gamma^l r_{t+l}.

    Turn k of a multi-turn episode ends on the last generated token of the k-th run of
    ``completion_mask`` 1s (observation tokens between turns have mask 0, rollout/server.py);
    ``Sample.step_rewards[k]`` is placed there. The episode reward ``rewards_B`` (after
    shaping) is placed on the episode's last generated token, where it adds to the last
    turn's step reward. A row of ``mask_BT`` with no trainable token (left out) gets none."""
    r_BT = terminal_rewards(rewards_B, mask_BT)
    for b, s in enumerate(samples):
        steps = list(getattr(s, "step_rewards", None) or ())
        if not steps or not bool((mask_BT[b] > 0).any()):
            continue
        ends = turn_ends(s.completion_mask)
        if len(ends) != len(steps):
            raise ValueError(
                f"sample {b} ({s.task_id or 'no task id'}) has {len(steps)} step_rewards for "
                f"{len(ends)} model turns: an environment that sets StepResult.step_reward must "
                "set it on every step (0.0 where the step earns nothing)"
            )
        for t, r in zip(ends, steps):
            r_BT[b, t] += r
    return r_BT


@dataclass
class StepBatch:
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


class ObjectiveStep:
    def __init__(self, cfg: Any, policy: nn.Module, reward_max: float):
        lc, self.cfg, self.lc = cfg.learner, cfg, cfg.learner
        self.reward_max = reward_max
        self.loss = PolicyLoss(
            objective=lc.objective,
            clip_low=lc.clip_low,
            clip_high=lc.clip_high,
            ratio_cap=lc.ratio_cap,
            aggregation=lc.loss_agg,
            kl_coef=lc.kl_coef if lc.kl_estimator != "off" else 0.0,
            kl_estimator=lc.kl_estimator,
            entropy_coef=lc.entropy_coef,
        )
        self.fixed_len = float(lc.loss_agg_len or cfg.rollout.max_tokens)
        self.controller: ClipHighController | None = None
        if lc.target_entropy > 0:
            self.controller = ClipHighController(
                lc.clip_high, lc.target_entropy, lc.clip_high_lr, lc.clip_high_min, lc.clip_high_max
            )
        self.critic: Critic | None = None
        self.critic_opt: torch.optim.Optimizer | None = None
        if lc.objective == "ppo":
            dtype = getattr(torch, cfg.model.dtype)
            self.critic = Critic(lc.critic, policy.config.hidden_size, cfg.model.path, dtype)
            self.critic_opt = torch.optim.AdamW(
                self.critic.parameters(),
                lr=lc.critic_lr,
                weight_decay=lc.weight_decay,
                betas=tuple(lc.adam_betas),
            )

    # ------------------------------------------------------------------ batch

    def prepare(self, groups: list[Any], version: int) -> StepBatch:
        lc = self.lc
        samples = [s for g in groups for s in g.samples]
        raw_GS = torch.tensor([[s.reward for s in g.samples] for g in groups], dtype=torch.float64)
        rew_GS = raw_GS.clone()
        n_gen_GS = torch.tensor([[sum(s.completion_mask) for s in g.samples] for g in groups])
        if lc.overlong_buffer > 0:
            max_len = lc.loss_agg_len or self.cfg.rollout.max_tokens
            rew_GS += overlong_penalty(
                n_gen_GS.flatten(), max_len, lc.overlong_buffer, lc.overlong_penalty
            ).view_as(rew_GS)
        if lc.length_penalty_coef > 0:
            correct_GS = torch.tensor(
                [[sample_correct(s, self.reward_max) for s in g.samples] for g in groups]
            )
            rew_GS += length_penalty(
                n_gen_GS, correct_GS, lc.length_penalty_coef, lc.length_penalty_difficulty_aware
            )
        keep_B = torch.ones(len(samples))
        if lc.mask_truncated:
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
        batch = StepBatch(
            samples=[samples[i] for i in idx.tolist()],
            rewards_B=rew_GS.flatten()[idx],
            raw_rewards_B=raw_GS.flatten()[idx],
            lag_B=torch.tensor([version - g.policy_version for g in groups for _ in g.samples])[
                idx
            ],
            keep_B=keep_B[idx],
            norm=BatchNorm(tokens, n_samples, self.fixed_len),
            env_errors=env_errors,
            epochs=lc.epochs,
        )
        if lc.objective != "ppo":
            batch.adv_B = group_advantages(
                rew_GS, std_norm=lc.adv_std_norm, valid_GS=valid_GS if env_errors else None
            ).flatten()[idx]
        batch.acc = dict(
            loss=0.0,
            entropy=0.0,
            clipped=0.0,
            kl=0.0,
            mm_abs=0.0,
            mm_max=0.0,
            mm_kl=0.0,
            mm_n=0.0,
            mm_probe_n=0.0,
            op_changed=0.0,
            vloss=0.0,
            vmean=0.0,
            replay_miss=0.0,
        )
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

    def needs_proximal(self, batch: StepBatch) -> bool:
        """Whether the decoupled objective needs log pi_prox from a separate no-grad forward:
        only when the batch takes more than one optimizer step (with one, pi_prox is the
        weights of the step's own forward, and its detached log-probs are pi_prox)."""
        lc = self.lc
        decoupled = lc.offpolicy_correction != "none" or (
            lc.stale_policy == "correct" and bool((batch.lag_B > lc.max_staleness).any())
        )
        return decoupled and lc.minibatches * lc.epochs > 1

    def prepare_values(self, policy: nn.Module, batch: StepBatch) -> None:
        """PPO: the critic's V(s_t) for the whole batch (no grad), the per-token rewards
        (``episode_rewards``), then GAE(gamma, lambda) and whitening. The value after the last
        token is V(s_T) for a truncated episode (finish_reason in ``TRUNCATED``) and 0 for one
        that terminated:

            delta_{T-1} = r_{T-1} + gamma * V(s_T) - V(s_{T-1})
        """
        assert self.critic is not None
        mb_size = self.lc.micro_batch_size
        T = max(len(s.completion_ids) for s in batch.samples)
        B = len(batch.samples)
        values_BT = torch.zeros(B, T, dtype=torch.float64)
        last_B = torch.zeros(B, dtype=torch.float64)
        mask_BT = torch.zeros(B, T, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, B, mb_size):
                mb = batch.samples[i : i + mb_size]
                v_BT, v_last_B = self.critic.state_values(mb, policy)
                values_BT[i : i + len(mb), : v_BT.shape[1]] = v_BT.double()
                last_B[i : i + len(mb)] = v_last_B.double()
        for b, s in enumerate(batch.samples):
            mask_BT[b, : len(s.completion_mask)] = torch.tensor(
                s.completion_mask, dtype=torch.float64
            )
        mask_BT *= batch.keep_B.double().unsqueeze(1)
        truncated_B = torch.tensor([s.finish_reason in TRUNCATED for s in batch.samples])
        bootstrap_B = torch.where(truncated_B, last_B, torch.zeros_like(last_B))
        r_BT = episode_rewards(batch.samples, batch.rewards_B, mask_BT)
        values_BT = values_BT * mask_BT
        adv_BT, ret_BT = gae(
            r_BT, values_BT, mask_BT, self.lc.gamma, self.lc.gae_lambda, bootstrap_B
        )
        batch.adv_BT = whiten(adv_BT, mask_BT) if self.lc.adv_whiten else adv_BT
        batch.returns_BT = ret_BT
        batch.values_BT = values_BT

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
        lc, acc = self.lc, batch.acc
        norm = norm or batch.norm
        logp, rollout = b["logp"], b["old_logp"]
        n, Tc = logp.shape
        mb = batch.samples[i : i + n]
        dev = logp.device  # the batch's tensors live on the CPU; the model may be on a GPU
        mask = b["mask"] * batch.keep_B[i : i + n].to(b["mask"]).unsqueeze(1)
        lag = batch.lag_B[i : i + n].to(dev).unsqueeze(1)
        # pi_prox: the weights when the batch was taken (see the module docstring)
        prox = (
            batch.prox_BT[i : i + n, :Tc].to(logp) if batch.prox_BT is not None else logp.detach()
        )
        old, w = rollout, None
        if lc.offpolicy_correction != "none":
            # decoupled: the clip on pi_theta / pi_prox, the sampler mu corrected by the IS
            # weight pi_prox / mu (TIS) or mask (IcePop)
            w, changed = offpolicy_weights(
                prox,
                rollout,
                mask,
                lc.offpolicy_correction,
                lc.offpolicy_level,
                lc.offpolicy_low,
                lc.offpolicy_high,
            )
            old = prox
            if epoch == 0:
                acc["op_changed"] += float(changed.sum())
        elif lc.stale_policy == "correct" and bool((lag > lc.max_staleness).any()):
            stale = (lag > lc.max_staleness).expand_as(logp)
            w_tis, changed = offpolicy_weights(prox, rollout, mask, "tis", "token", 0.0, lc.tis_cap)
            w = torch.where(stale, w_tis, torch.ones_like(w_tis))
            old = torch.where(stale, prox, rollout)
            if epoch == 0:
                acc["op_changed"] += float((changed & stale).sum())
        adv = batch.adv_B[i : i + n] if batch.adv_B is not None else batch.adv_BT[i : i + n, :Tc]
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
        if self.critic is not None:
            if self.critic.kind == "head":
                # the policy's own forward (``b["hidden_BTH"]``), under the MoE routing
                # ``completion_logprobs`` forces: the values trained here see the experts the
                # log-probs see, the same ones ``prepare_values`` forces in its own forward
                values = self.critic.head(b["hidden_BTH"].float()).squeeze(-1)
            else:
                values = self.critic.forward_samples(mb)
            ret = batch.returns_BT[i : i + n, :Tc].to(values.dtype)
            old = None
            if lc.value_clip > 0:
                old = batch.values_BT[i : i + n, :Tc].to(values)
            vl = value_loss(values, ret, mask, norm, old, lc.value_clip)
            loss = loss + lc.vf_coef * vl
            acc["vloss"] += float(vl.detach())
            acc["vmean"] += float((values.detach() * mask).sum())
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
            acc["clipped"] += st["clipped"]
            acc["kl"] += st["kl_sum"]
        return loss

    # ------------------------------------------------------------------ end of step

    def zero_grad(self) -> None:
        if self.critic_opt is not None:
            self.critic_opt.zero_grad(set_to_none=True)

    def step_critic(self) -> float:
        if self.critic is None or self.critic_opt is None:
            return float("nan")
        gn = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.lc.grad_clip)
        self.critic_opt.step()
        return float(gn)

    def finish(self, batch: StepBatch) -> dict[str, float]:
        """The step's metrics. Sums over every pass of the batch are averaged: per token over
        ``epochs`` passes of its tokens, the losses over its ``updates`` optimizer steps."""
        acc, n_tok = batch.acc, max(batch.norm.tokens, 1.0)
        n_seen = n_tok * batch.epochs  # trainable tokens seen over all the passes
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
        if self.critic is not None:
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
        if ckpt is not None and self.critic is not None and (ckpt / "critic.safetensors").is_file():
            from safetensors.torch import load_model

            load_model(self.critic, str(ckpt / "critic.safetensors"))
            self.critic_opt.load_state_dict(
                torch.load(ckpt / "critic_optimizer.pt", weights_only=True)
            )

    def save(self, folder: Path) -> None:
        """Write the critic (weights + optimizer) into a checkpoint folder being assembled."""
        if self.critic is None:
            return
        from safetensors.torch import save_model

        save_model(self.critic, str(folder / "critic.safetensors"))
        torch.save(self.critic_opt.state_dict(), folder / "critic_optimizer.pt")


def add_mismatch(acc: dict[str, float], mm: dict[str, float], probe: bool = False) -> None:
    """Add ``mismatch_sums`` to a step's accumulators (``probe``: measured under the weight
    snapshot, learner/snapshot.py)."""
    acc["mm_abs"] += mm["abs_sum"]
    acc["mm_kl"] += mm["kl_sum"]
    acc["mm_n"] += mm["n"]
    acc["mm_max"] = max(acc["mm_max"], mm["abs_max"])
    if probe:
        acc["mm_probe_n"] += mm["n"]


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")

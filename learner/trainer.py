"""The trainer: a transformers causal LM, its optimizer and the objective. A batch of groups
goes in, ``learner.epochs`` x ``learner.minibatches`` optimizer steps come out, with the step's
statistics. It has no sockets, cursor or orders (``learner/learner.py`` coordinates those), so
a test builds one around any model: ``Trainer(cfg, model)``.

Under FSDP (``learner.fsdp``; learner/fsdp.py) every rank holds a ``Trainer``. Rank 0 tells the
others, before each collective, which one follows (``command``); they run ``follow``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import torch

from climbrl.config import Config
from climbrl.learner import fsdp
from climbrl.learner.algos.common import add_mismatch, mismatch_sums
from climbrl.learner.algos.step import ObjectiveStep
from climbrl.learner.checkpoint import load_state
from climbrl.learner.device import Precision, learner_precision
from climbrl.learner.logprobs import completion_logprobs, micro_chunks, reference_logprobs
from climbrl.learner.snapshot import WeightSnapshot
from climbrl.learner.weights import LoraCheckpoint, setup_lora
from climbrl.wire import Trajectory

log = logging.getLogger("climbrl.learner")


class Trainer:
    # rank 0 told the other ranks a command and has not finished its collective
    mid_collective = False

    def __init__(
        self,
        cfg: Config,
        model: torch.nn.Module,
        *,
        reward_max: float = 1.0,
        ref: torch.nn.Module | None = None,
        opt: torch.optim.Optimizer | None = None,
        ds: fsdp.DistState | None = None,
        precision: Precision | None = None,
    ):
        """``model`` (and ``ref``, the KL reference) as built, on ``precision.device`` (by
        default the model's own device and dtype, no autocast); ``opt`` defaults to AdamW
        over the parameters that train (``learner.optim.lr``, ``weight_decay``, ``adam_betas``)."""
        lc = cfg.learner
        self.cfg, self.ds = cfg, ds or fsdp.DistState()
        self.model, self.ref = model.train(), ref
        p0 = next(model.parameters())
        self.prec = precision or Precision(p0.device, None, p0.dtype, lc.fp32_lm_head)
        self.opt = opt or torch.optim.AdamW(
            self.trainable(),
            lr=lc.optim.lr,
            weight_decay=lc.optim.weight_decay,
            betas=(lc.optim.adam_betas[0], lc.optim.adam_betas[1]),
        )
        self.obj = ObjectiveStep(cfg, model, reward_max)
        if self.obj.critic is not None:
            self.obj.critic.to(self.prec.device)  # (in place: its optimizer keeps the params)
        self.snapshot = WeightSnapshot()  # the last published version's trainable weights

    @classmethod
    def build(
        cls, cfg: Config, ds: fsdp.DistState, reward_max: float, ckpt: Path | None = None
    ) -> Trainer:
        """The policy from ``model.path`` (or the checkpoint ``ckpt``), LoRA adapters and FSDP
        sharding as configured, and the KL reference when the objective has a KL term."""
        from transformers import AutoModelForCausalLM

        lc = cfg.learner
        # learner.device and learner.autocast (learner/device.py); FSDP: the rank's device
        prec = learner_precision(cfg, ds.device if ds.distributed else None)
        dtype = prec.param_dtype  # float32 master weights under autocast
        # LoRA resumes from the frozen base plus the checkpoint's adapter (merged on load)
        src = str(ckpt) if ckpt and lc.weights.mode != "lora" else cfg.model.path
        model: Any = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        if lc.activation_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable({"use_reentrant": False})
        if lc.weights.mode == "lora":
            model = setup_lora(model, lc, ckpt)
        if not ds.distributed:
            model = model.to(prec.device)
        model = fsdp.shard_model(model, cfg, ds)  # no-op for one process
        ref: torch.nn.Module | None = None
        if lc.algo.kl_coef > 0 and lc.algo.kl_estimator != "off":
            ref = cast(
                torch.nn.Module,
                AutoModelForCausalLM.from_pretrained(
                    lc.algo.ref_model_path or cfg.model.path, dtype=dtype
                ),
            ).eval()
            ref.requires_grad_(False)
            if not ds.distributed:
                ref = ref.to(prec.device)
            ref = fsdp.shard_model(ref, cfg, ds)
        return cls(cfg, model, reward_max=reward_max, ref=ref, ds=ds, precision=prec)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ state

    def load(self, ckpt: Path) -> dict[str, Any]:
        """The optimizer and objective state of checkpoint ``ckpt`` (sharded under FSDP);
        returns its ``learner_state.json``."""
        if self.ds.distributed:
            sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
            fsdp.load_optimizer_state(self.model, self.opt, sd, self.ds)
            st = json.loads((ckpt / "learner_state.json").read_text())
        else:
            st = load_state(ckpt, self.opt)
        self.obj.load_state(st.get("objective", {}), ckpt)
        return st

    def checkpoint_views(self, base_path: str) -> tuple[Any, Any]:
        """(model, optimizer) as ``save_checkpoint`` writes them: the full ones gathered on
        rank 0 under FSDP; a LoRA model as its adapter plus the merged weights."""
        if self.ds.distributed:
            self.command("checkpoint")
            model, opt = fsdp.checkpoint_views(self.model, self.opt, self.ds)
            self.mid_collective = False
            return model, opt
        lora = self.cfg.learner.weights.mode == "lora"
        return (LoraCheckpoint(self.model, base_path) if lora else self.model), self.opt

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The full weights gathered from every rank (FSDP), None for one process."""
        if not self.ds.distributed:
            return None
        self.command("publish")
        state = fsdp.full_state_dict(self.model, self.ds)
        self.mid_collective = False
        return state

    # ------------------------------------------------------------------ ranks (FSDP)

    def command(self, cmd: str, groups: list[Trajectory] | None = None) -> None:
        """Rank 0: tell the other ranks the collective that follows (nothing for one process)."""
        if self.ds.distributed and self.ds.is_coordinator:
            self.mid_collective = True
            fsdp.broadcast_step(cmd, groups, self.ds)

    def follow(self) -> None:
        """An FSDP rank > 0: run rank 0's commands until it says stop."""
        log.info(
            "rank %d/%d (FSDP, %s) follows rank 0", self.ds.rank, self.ds.world_size, self.ds.device
        )
        while True:
            cmd, groups = fsdp.broadcast_step(None, None, self.ds)
            name, _, arg = cmd.partition("@")
            if name == "train":
                self.train_step(groups, int(arg))
            elif name == "publish":
                fsdp.full_state_dict(self.model, self.ds)
            elif name == "checkpoint":
                fsdp.checkpoint_views(self.model, self.opt, self.ds)
            elif name == "stop":
                return
            else:
                raise RuntimeError(f"rank {self.ds.rank}: unknown command {cmd!r} from rank 0")

    # ------------------------------------------------------------------ one step

    def train_step(self, groups: list[Trajectory], version: int) -> dict[str, Any]:
        """``learner.epochs`` x ``learner.minibatches`` optimizer steps of ``learner.algo.name``
        on one batch (learner/algos/step.py; one step by default), at weights
        ``version``."""
        lc, ds = self.cfg.learner, self.ds
        t0 = time.perf_counter()
        self.command(f"train@{version}", groups)  # FSDP: every rank trains this batch
        batch = self.obj.prepare(groups, version)  # shaped rewards, advantages, norms
        # (only where a lag >= 1 sample can be trained: the copy costs a model's memory)
        lagged = lc.max_staleness > 0 or lc.offpolicy.stale_policy == "correct"
        if lc.mismatch_probe_samples and lagged and not ds.distributed:
            self._probe_mismatch(batch, version)  # lag >= 1 under the weights that made them
            if self.snapshot.version is None or version % lc.publish_every == 0:
                # the weights the servers hold from now on (version 0 and each publish)
                self.snapshot.take(self.trainable(), version)
        if self.obj.critic is not None:
            with self.prec.autocast():
                self.obj.prepare_values(self.model, batch)  # PPO: V(s_t) -> GAE(gamma, lambda)
        plan = [
            (lo, hi, norm, self._micro(batch.samples, lo, hi))
            for lo, hi, norm in self.obj.minibatches(batch)
        ]
        idle = None if ds.distributed else self.obj.idle_rows(batch)
        skipped = 0
        if idle is not None:  # learner.skip_zero_advantage: exactly 0 loss and gradient
            plan = [(lo, hi, norm, skip_idle(micro, idle)) for lo, hi, norm, micro in plan]
            skipped = len(batch.samples) - sum(n for *_, ms in plan for _i, n, _s in ms)
        if self.obj.needs_proximal(batch):  # decoupled: log pi_prox before any update
            batch.prox_BT = self._proximal_logprobs(batch, [m for *_, ms in plan for m in ms])
        batch.updates = lc.epochs * len(plan)
        grad_norms: list[float] = []
        critic_grad_norm = float("nan")
        for epoch in range(lc.epochs):
            for _lo, _hi, norm, micro in plan:
                self.opt.zero_grad(set_to_none=True)
                self.obj.zero_grad()
                for i, n, scale in micro:
                    self._micro_backward(batch, i, n, scale, norm, epoch)
                if ds.distributed:
                    grad_norm = fsdp.clip_grad_norm(self.model.parameters(), lc.optim.grad_clip)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self.model.parameters(), lc.optim.grad_clip
                    )
                self.opt.step()
                critic_grad_norm = self.obj.step_critic()
                batch.stepped = True
                grad_norms.append(float(grad_norm))
        if ds.distributed:
            batch.acc = fsdp.reduce_stats(batch.acc, ds)  # sums over ranks (max for *_max)
        stats: dict[str, Any] = self.obj.finish(batch)  # also steps the clip-high controller
        self.mid_collective = False
        stats["grad_norm"] = grad_norms[0]  # the first step's: before the batch moved the policy
        stats["optimizer_steps"] = float(batch.updates)
        stats["skipped_samples"] = skipped
        if self.obj.critic is not None:
            stats["critic_grad_norm"] = critic_grad_norm
        stats["train_s"] = time.perf_counter() - t0
        return stats

    def _probe_mismatch(self, batch: Any, version: int) -> None:
        """Add to the step's mismatch sums up to ``learner.mismatch_probe_samples`` samples the
        snapshot's version generated, their log-probs from a no-grad forward under that
        version's weights (``learner/snapshot.py``). The step's own forward measures the
        lag-0 samples."""
        lc, snap = self.cfg.learner, self.snapshot
        if snap.version is None or snap.version >= version:
            return
        lag = version - snap.version
        pick = [
            j
            for j in range(len(batch.samples))
            if int(batch.lag_B[j]) == lag and batch.keep_B[j] > 0
        ][: lc.mismatch_probe_samples]
        if not pick:
            return
        samples = [batch.samples[j] for j in pick]
        acc = batch.acc
        with torch.no_grad(), snap.swapped_in(self.trainable()):
            for i, n in micro_chunks(samples, lc.micro_batch_size, lc.micro_batch_tokens):
                b = self._policy_logprobs(samples[i : i + n])
                add_mismatch(acc, mismatch_sums(b["logp"], b["old_logp"], b["mask"]), probe=True)

    def _micro(self, samples: list[Any], lo: int, hi: int) -> list[tuple[int, int, float]]:
        """``(start, size, loss_scale)`` of the micro-batches of samples[lo:hi] this process
        runs. FSDP: this rank's share (padded so every rank runs as many), each loss times a
        scale that makes FSDP's gradient mean over ranks the sum."""
        lc = self.cfg.learner
        chunks = micro_chunks(samples[lo:hi], lc.micro_batch_size, lc.micro_batch_tokens)
        if not self.ds.distributed:
            return [(lo + i, n, 1.0) for i, n in chunks]
        return [(lo + i, n, scale) for i, n, scale in fsdp.rank_microbatches(chunks, self.ds)]

    def _policy_logprobs(self, mb: list[Any]) -> dict[str, torch.Tensor]:
        lc = self.cfg.learner
        with self.prec.autocast():  # (the LM head stays float32: learner/logprobs.py)
            return self._forward(mb, lc)

    def _forward(self, mb: list[Any], lc: Any) -> dict[str, torch.Tensor]:
        return fsdp.root_forward(
            self.model,
            completion_logprobs,
            self.model,
            mb,
            temperature=self.cfg.rollout.temperature,
            impl=lc.logprob_impl,
            fp32_head=lc.fp32_lm_head,
            pack_length=lc.pack_length,
            share_prompts=lc.share_prompts,
        )

    def _proximal_logprobs(self, batch: Any, micro: list[tuple[int, int, float]]) -> torch.Tensor:
        """[B, T] log pi_prox(y_t) of the samples this process trains, by a no-grad forward of
        the current weights (0 at positions past a completion and in other ranks' rows)."""
        T = max(len(s.completion_ids) for s in batch.samples)
        out = torch.zeros(len(batch.samples), T, dtype=torch.float32)
        with torch.no_grad():
            for i, n, _scale in micro:
                logp = self._policy_logprobs(batch.samples[i : i + n])["logp"]
                out[i : i + n, : logp.shape[1]] = logp.float().cpu()
        return out

    def _micro_backward(
        self, batch: Any, i: int, n: int, scale: float, norm: Any, epoch: int
    ) -> None:
        mb = batch.samples[i : i + n]
        acc = dict(batch.acc) if scale == 0.0 else None  # a padding pass (FSDP)
        b = self._policy_logprobs(mb)  # PPO's value head reads its hidden_BTH
        ref = None
        if self.ref is not None:
            lc = self.cfg.learner
            with torch.no_grad(), self.prec.autocast():
                ref = fsdp.root_forward(  # its own full distribution: no replay
                    self.ref,
                    reference_logprobs,
                    self.ref,
                    mb,
                    self.cfg.rollout.temperature,
                    impl=lc.logprob_impl,
                    fp32_head=lc.fp32_lm_head,
                    pack_length=lc.pack_length,
                    share_prompts=lc.share_prompts,
                )
        with self.prec.autocast():  # (PPO's critic runs in it; backward stays outside)
            loss = self.obj.micro_loss(batch, i, b, ref, norm, epoch)
        if self.ds.distributed:
            loss = loss * scale
        if acc is not None:  # the padding pass ran for the collectives, not the statistics
            batch.acc = acc
        loss.backward()


def skip_idle(
    micro: list[tuple[int, int, float]], idle: torch.Tensor
) -> list[tuple[int, int, float]]:
    """The micro-batches ``(start, size, scale)`` with a sample not ``idle``: one whose loss
    can move the weights. At least the first, so the step still has its gradients (zeros
    where nothing can move them: the optimizer steps as it would) and its statistics."""
    kept = [m for m in micro if not bool(idle[m[0] : m[0] + m[1]].all())]
    return kept or micro[:1]

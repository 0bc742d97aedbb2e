"""The learner: coordinator of an async GRPO run.

    climbrl learn --config runs/x/config.resolved.toml [--resume]

It owns the data cursor, hands work orders to the rollout servers that connect to its socket,
collects trajectories, enforces the staleness bound, trains a transformers causal LM with the
token-level clipped GRPO loss, publishes weights over ZeroMQ and checkpoints in HF format.
``train()`` below reads as the algorithm; the machinery lives in ``Learner``.

Crash consistency. A training order's id is ``train-<cursor sequence>``, and the rollout server
seeds every sample from (run seed, order id, sample index, turn), so a group is a function of
the weights it was sampled with; the batch is trained in sequence order. With
``learner.max_staleness = 0`` a step is then a deterministic function of the checkpoint it
starts from, and a run killed with -9 and resumed (``--resume``) retrains exactly the
sequences the checkpoint had not trained (``learner_state.json`` ``cursor.pending`` and
``next_seq``), with the same loss curve. Trajectories in flight at the crash die with their
processes or, from a server that outlived the learner, are dropped by run id. On resume,
``metrics.jsonl`` keeps the records up to the checkpoint's step and moves the later ones to
``metrics.discarded.jsonl``; every step record lists its ``trained_seqs``. A (re)started
rollout server that says Hello gets the current weights and its old orders are reassigned.

Multi-process (``learner.fsdp``, ``learner.world_size = N``; learner/fsdp.py): torchrun starts
N processes of this command. Rank 0 is the learner described here; before every step,
weight publish, checkpoint and at shutdown it tells the other ranks (``Learner.follow``) what
to do, so that all run the same collectives in the same order. Checkpoints keep the
single-process format, so a run resumes with any world size.

An environment that fails costs episodes, never a hang: a failed training episode is left out
of its group, a failed eval episode scores 0 (``eval_env_errors`` in the summary; an eval order
with no answer within ``wire.order_timeout_s`` too, ``eval_timeouts``), and
``wire.max_env_failures`` failed training episodes in a row end the run with an error that
quotes the env's (``EnvFailureStreak``). Servers fail the same way, never a hang: one whose
engine died (its ``engine_dead`` error or its heartbeat says so) or whose last
``wire.max_order_failures`` orders failed takes no more orders; more than
``wire.max_order_failure_rate`` of the last ``wire.order_failure_window`` training orders
failing ends the run, and so do orders out for ``wire.progress_timeout_s`` with none coming
back (servers that heartbeat but never answer), each with an error that names the last cause.
An eval order keeps its deadline when it moves to another server, so evaluation always ends.

``CLIMBRL_FAULT_KILL_AT_STEP=N`` (fault injection for tests) makes the learner SIGKILL itself
after step N, once a trajectory of the next batch has arrived.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from climbrl.config import Config
from climbrl.envs.base import make_env
from climbrl.learner import fsdp
from climbrl.learner.checkpoint import latest_checkpoint, load_state, save_checkpoint
from climbrl.learner.data import DataCursor
from climbrl.learner.hub import HubError, LearnerHub
from climbrl.learner.logprobs import completion_logprobs, micro_chunks, reference_logprobs
from climbrl.learner.objectives import mismatch_sums
from climbrl.learner.objectives_shaping import keep_group, pass_rate
from climbrl.learner.objectives_step import ObjectiveStep
from climbrl.learner.snapshot import WeightSnapshot
from climbrl.learner.weights import WeightPublisher, setup_lora
from climbrl.metrics import MetricsWriter, paired_change
from climbrl.wire import (
    ENV_ERROR,
    Error,
    Heartbeat,
    Hello,
    SamplingSpec,
    Trajectory,
    WeightAck,
    WorkOrder,
)

log = logging.getLogger("climbrl.learner")


class LearnerError(RuntimeError):
    pass


@dataclass
class EnvFailureStreak:
    """Training episodes the environment failed since its last successful one, on any server.

    A failed episode is a sample with finish_reason ``env_error``, or each episode of a training
    order that came back as an ``Error`` (the server reports an order whose episodes all failed
    that way). Any episode that ran resets the count. ``wire.max_env_failures`` in a row ends
    the run: failed orders are replaced at once by orders for new tasks, so an env that fails
    every task would otherwise keep the learner busy forever without a step. (Evaluation is
    bounded by its size: a failed eval episode scores 0, see ``Learner.evaluate``.)
    """

    limit: int
    env: str
    env_args: dict[str, Any] = field(default_factory=dict)
    in_a_row: int = 0
    last_error: str = ""

    def record(self, failed: int, succeeded: int, error: str = "") -> None:
        """Count one result; raise LearnerError once ``limit`` episodes failed in a row."""
        if error:
            self.last_error = error
        if succeeded:
            self.in_a_row = 0
            return
        self.in_a_row += failed
        if self.in_a_row >= self.limit:
            check = f"climbrl env-check {self.env}" + (
                f" --args '{json.dumps(self.env_args)}'" if self.env_args else ""
            )
            raise LearnerError(
                f"the environment {self.env!r} failed {self.in_a_row} training episodes in a "
                f"row, with none that ran in between (wire.max_env_failures = {self.limit}); "
                f"its last error: {self.last_error or 'unknown'}. `{check}` tests the env "
                "without a model"
            )


def train(cfg: Config, resume: bool = False, endpoint_file: str | None = None) -> dict[str, Any]:
    """Run GRPO to ``learner.total_steps``; returns the final summary (also in summary.json)."""
    ds = fsdp.setup(cfg)
    if not ds.is_coordinator:  # an FSDP rank > 0: follows rank 0's commands
        Learner(cfg, resume=resume, ds=ds).follow()
        fsdp.cleanup(ds)
        return {}
    L = Learner(cfg, resume=resume, ds=ds)
    try:
        if endpoint_file:
            Path(endpoint_file).write_text(L.hub.endpoint)
        L.wait_for_servers()
        before = L.evaluate("test") if L.step == 0 else None
        before_outcomes = L.eval_outcomes.get("test")
        t_train, budget_s = time.monotonic(), cfg.learner.max_train_minutes * 60
        while L.step < cfg.learner.total_steps and not (
            budget_s and time.monotonic() - t_train >= budget_s
        ):
            L.dispatch()  # keep orders queued, at most (max_staleness + 1) batches ahead
            groups = L.collect(cfg.learner.batch_groups)  # fresh-enough groups, stale counted
            stats = L.train_step(groups)  # advantages -> clipped loss -> optimizer step
            L.version += 1
            L.step += 1
            if L.step % cfg.learner.publish_every == 0:
                stats["weight_sync_s"] = L.publish_weights()
            L.log_step(stats)
            every = cfg.learner.eval_every
            if every and L.step % every == 0 and L.step < cfg.learner.total_steps:
                L.evaluate("test")  # held-out accuracy along the way
            if cfg.learner.checkpoint_every and L.step % cfg.learner.checkpoint_every == 0:
                L.checkpoint()
        L.train_s = time.monotonic() - t_train
        after = L.evaluate("test")
        if not (cfg.learner.checkpoint_every and L.step % cfg.learner.checkpoint_every == 0):
            L.checkpoint()  # (the loop saved this step already)
        return L.finish(before, after, before_outcomes)
    finally:
        L.shutdown()


class Learner:
    ds: fsdp.DistState = fsdp.DistState()  # one process unless train() passes a torchrun rank
    _mid_collective = False  # rank 0 told the other ranks a command and has not finished it
    # when an order last came back with a trajectory (None: no order out), for
    # wire.progress_timeout_s; the last error a server reported; the last training orders'
    # outcomes (True: failed), for wire.max_order_failure_rate
    _last_progress: float | None = None
    _last_error = ""
    _outcomes: deque[bool] | None = None
    train_s: float | None = None  # the training loop's wall time, set by train()

    def __init__(self, cfg: Config, resume: bool = False, ds: fsdp.DistState | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        if ds is not None:
            self.ds = ds
        lc = cfg.learner
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if lc.threads:
            torch.set_num_threads(lc.threads)
        torch.manual_seed(cfg.run.seed)
        self.run_id = f"{cfg.run.name}-{uuid.uuid4().hex[:8]}"
        self.env = make_env(cfg.env.name, cfg.env.args)
        dtype = getattr(torch, cfg.model.dtype)
        ckpt = latest_checkpoint(self.out) if resume else None
        # LoRA resumes from the frozen base plus the checkpoint's adapter (its weights are merged)
        src = str(ckpt) if ckpt and lc.weight_sync != "lora" else cfg.model.path
        self.model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        if lc.activation_checkpointing:
            self.model.config.use_cache = False
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        if lc.weight_sync == "lora":
            self.model = setup_lora(self.model, lc, ckpt)
        self.model = fsdp.shard_model(self.model, cfg, self.ds)  # no-op for one process
        shm = (
            "/dev/shm"
            if cfg.wire.weight_transport == "auto" and os.path.isdir("/dev/shm")
            else None
        )
        if not self.ds.is_coordinator:
            shm = None  # only rank 0 publishes (and cleans up weights files)
        self.weights = WeightPublisher(self.model, lc.weight_sync, cfg.model.path, shm_dir=shm)
        self.model.train()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.opt = torch.optim.AdamW(
            self.weights.trainable(), lr=lc.lr, weight_decay=lc.weight_decay, betas=(0.9, 0.99)
        )
        self.ref = None
        if lc.kl_coef > 0 and lc.kl_estimator != "off":
            self.ref = AutoModelForCausalLM.from_pretrained(
                lc.ref_model_path or cfg.model.path, dtype=dtype
            ).eval()
            self.ref.requires_grad_(False)
            self.ref = fsdp.shard_model(self.ref, cfg, self.ds)
        self.obj = ObjectiveStep(cfg, self.model, self.env.reward_range[1])
        self.snapshot = WeightSnapshot()  # the last published version's trainable weights
        self.cursor = DataCursor(self.env.num_tasks("train"), seed=cfg.run.seed)
        self.step = self.version = 0
        if ckpt:
            st = load_state(ckpt, self.opt) if not self.ds.distributed else self._load_sharded(ckpt)
            self.step, self.version = st["step"], st["version"]
            self.cursor = DataCursor.from_state(st["cursor"])
            self.obj.load_state(st.get("objective", {}), ckpt)
            log.info(
                "resumed from %s at step %d; replaying sequences %s, then from %d",
                ckpt,
                self.step,
                st["cursor"]["pending"],
                st["cursor"]["next_seq"],
            )
        if not self.ds.is_coordinator:
            return  # a follower: no sockets, metrics or bookkeeping of orders
        if resume:
            discarded = _truncate_metrics(self.out, self.step if ckpt else -1)
            if discarded:
                log.info(
                    "metrics of steps %s (after the checkpoint) moved to metrics.discarded.jsonl",
                    discarded,
                )
        from climbrl.wirekeys import learner_keys

        self.hub = LearnerHub.from_config(cfg.wire, self.run_id, learner_keys(cfg.wire, self.out))
        self.metrics = MetricsWriter(self.out, resume=resume)
        if resume:
            self.metrics.write(
                {
                    "step": self.step,
                    "resumed_from": ckpt.name if ckpt else None,
                    "discarded_steps": discarded,
                }
            )
        self.orders: dict[str, dict[str, Any]] = {}  # order_id -> {seq, server, sent, eval}
        self.ready: list[Trajectory] = []
        self.seq_of: dict[str, int] = {}  # order_id -> cursor sequence, for groups in `ready`
        self.eval_results: dict[int, Trajectory] = {}  # task index -> its greedy trajectory
        # task index -> (why, the error) of an eval order that failed ("env") or got no
        # answer within wire.order_timeout_s ("timeout"): it scores 0
        self.eval_failures: dict[int, tuple[str, str]] = {}
        self.eval_outcomes: dict[str, list[float]] = {}  # split -> correctness per task, last eval
        # step -> the mean of each numeric metric the env reports (Sample.metrics) on split
        # "test", per eval: e.g. arith_chat's answer-correct and strict-format rates
        self.eval_metrics: dict[int, dict[str, float]] = {}
        self.counters = dict(
            stale_dropped=0,
            stale_corrected=0,
            order_failures=0,
            servers_dead=0,
            engines_dead=0,
            eval_env_errors=0,
            eval_timeouts=0,
            filtered_groups=0,
            weight_bytes_sent=0,
            weight_syncs_full=0,
            weight_syncs_delta=0,
            weight_syncs_failed=0,
        )
        # sid -> {version: publish time}: every update not yet acked (with publish_every=1 the
        # next version is often sent before the last one's ack arrives)
        self.pending_acks: dict[str, dict[int, float]] = {}
        self.sync_times: list[float] = []
        self.sync_phases: dict[str, float] = {}
        self._last_log = (time.time(), 0)
        self.t_start = time.time()
        self.tokens_generated = 0
        self._no_server_since: float | None = None
        # servers that take no orders: sid -> why (an engine death, or order failures in a
        # row); cleared when the server says Hello again (a restarted process)
        self.benched: dict[str, str] = {}
        self.failures_in_a_row: dict[
            str, int
        ] = {}  # sid -> failed orders since its last trajectory
        self.env_failures = EnvFailureStreak(
            cfg.wire.max_env_failures, cfg.env.name, dict(cfg.env.args)
        )

    def _load_sharded(self, ckpt: Path) -> dict[str, Any]:
        """``load_state`` for an FSDP rank: the single-process optimizer file, sharded."""
        sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
        fsdp.load_optimizer_state(self.model, self.opt, sd, self.ds)
        return json.loads((ckpt / "learner_state.json").read_text())

    # ------------------------------------------------------------------ ranks (FSDP)

    def _command(self, cmd: str, groups: list[Trajectory] | None = None) -> None:
        """Rank 0: tell the other ranks the collective that follows (nothing for one process)."""
        if self.ds.distributed and self.ds.is_coordinator:
            self._mid_collective = True
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
                self.version = int(arg)
                self.train_step(groups)
            elif name == "publish":
                fsdp.full_state_dict(self.model, self.ds)
            elif name == "checkpoint":
                fsdp.checkpoint_views(self.model, self.opt, self.ds)
            elif name == "stop":
                return
            else:
                raise LearnerError(f"rank {self.ds.rank}: unknown command {cmd!r} from rank 0")

    # ------------------------------------------------------------------ servers

    def wait_for_servers(self) -> None:
        n = self.cfg.rollout.num_servers
        deadline = time.monotonic() + self.cfg.wire.connect_timeout_s
        while len(self.hub.alive_servers()) < n:
            if time.monotonic() > deadline:
                raise LearnerError(
                    f"only {len(self.hub.alive_servers())}/{n} rollout servers connected to "
                    f"{self.hub.endpoint} within {self.cfg.wire.connect_timeout_s:.0f}s"
                )
            self._pump(0.2)
        # resumed: every engine that said Hello below our version was sent the checkpoint's
        # weights by _pump (the same path brings a restarted server to the current version)
        log.info("%d rollout servers connected", n)

    def _usable(self, servers: list[str]) -> list[str]:
        return [s for s in servers if s not in self.benched]

    def _pick_server(self) -> str | None:
        alive = self._usable(self.hub.order_servers())
        if not alive:  # every live server is pinned for serving: its data is judged by staleness
            alive = self._usable(self.hub.alive_servers())
        if not alive:
            died = {s: why for s, why in self.benched.items() if why.startswith("vLLM engine")}
            if self.cfg.run.on_child_death == "restart" and (died or not self.benched):
                return None  # the launcher restarts it; the order waits for a Hello (_pump)
            if self.benched:
                sid, why = next(reversed(self.benched.items()))
                raise LearnerError(f"no rollout server can take work orders; {sid}: {why}")
            raise LearnerError("no rollout server is alive; see their logs for the cause")
        load = {s: 0 for s in alive}
        for o in self.orders.values():
            if o["server"] in load:
                load[o["server"]] += 1
        return min(alive, key=lambda s: load[s])

    def _send_order(self, seq: int, task_index: int, split: str, is_eval: bool) -> str:
        lc, rc = self.cfg.learner, self.cfg.rollout
        # a training order's id is a function of its sequence (the server seeds samples from
        # it): a re-sent order samples the same group from the same weights
        oid = f"eval-{seq}-{uuid.uuid4().hex[:6]}" if is_eval else f"train-{seq}"
        sampling = SamplingSpec(
            temperature=0.0 if is_eval else rc.temperature,
            top_p=1.0 if is_eval else rc.top_p,
            top_k=-1 if is_eval else rc.top_k,
            max_tokens=rc.max_tokens,
            seed=self.cfg.run.seed,
        )
        server = self._pick_server()
        order = WorkOrder(
            order_id=oid,
            policy_version=self.version,
            env=self.cfg.env.name,
            env_args=self.cfg.env.args,
            task_index=task_index,
            split=split,
            group_size=1 if is_eval else lc.group_size,
            sampling=sampling,
        )
        self.orders[oid] = dict(
            seq=seq,
            task=task_index,
            split=split,
            server=server,
            sent=time.monotonic(),
            eval=is_eval,
        )
        if server is not None:
            self.hub.send(server, order)
        return oid

    def dispatch(self) -> None:
        lc = self.cfg.learner
        limit = lc.batch_groups * (lc.max_staleness + 1)
        train_inflight = sum(1 for o in self.orders.values() if not o["eval"]) + len(self.ready)
        while train_inflight < limit:
            seq, idx = self.cursor.take()
            self._send_order(seq, idx, "train", False)
            train_inflight += 1

    # ------------------------------------------------------------------ messages

    def _pump(self, timeout: float) -> None:
        """Handle one inbound message (or time out), then check liveness and deadlines."""
        item = self.hub.recv(timeout)
        if item is not None:
            sid, msg, _, arrived = item
            if isinstance(msg, Trajectory) and msg.run_id != self.run_id:
                log.warning(
                    "trajectory %s from another learner run (%s) dropped", msg.order_id, msg.run_id
                )
            elif isinstance(msg, Trajectory):
                self.failures_in_a_row[sid] = 0
                o = self.orders.pop(msg.order_id, None)
                if o is not None:
                    self._last_progress = time.monotonic()
                if o is not None and not o["eval"]:
                    failed = [s for s in msg.samples if s.finish_reason == ENV_ERROR]
                    self.env_failures.record(
                        len(failed),
                        len(msg.samples) - len(failed),
                        failed[0].error if failed else "",
                    )
                    self._order_outcome(False)
                if o is None:
                    log.warning("trajectory for unknown order %s dropped", msg.order_id)
                elif o["eval"]:
                    self.eval_results[o["task"]] = msg
                else:
                    self.seq_of[msg.order_id] = o["seq"]  # cursor sequence of the group
                    self.tokens_generated += msg.num_generated_tokens
                    self.ready.append(msg)
            elif isinstance(msg, WeightAck):
                self._on_ack(sid, msg, arrived)
            elif (isinstance(msg, Error) and msg.code == "engine_dead") or (
                isinstance(msg, Heartbeat) and msg.engine_error
            ):
                # the server's engine is gone: its orders (this one included) go elsewhere or
                # wait for its restart, and lose nothing
                why = msg.message if isinstance(msg, Error) else msg.engine_error
                self._last_error = f"{sid}: {why}"
                if sid not in self.benched:
                    self.counters["engines_dead"] += 1
                    log.error("rollout %s: %s; it gets no more work orders", sid, why)
                self.benched[sid] = why
                self._reassign(lambda o, s=sid: o["server"] == s)
            elif isinstance(msg, Error):
                self.counters["order_failures"] += 1
                self._last_error = f"{sid}: {msg.code}: {msg.message}"
                log.error("rollout %s: %s: %s (order %s)", sid, msg.code, msg.message, msg.ref_id)
                o = self.orders.get(msg.ref_id)
                if o is not None and o["server"] == sid:  # not an order reassigned since
                    del self.orders[msg.ref_id]
                    if o["eval"]:  # it scores 0; a held-out task says nothing of the server
                        self.eval_failures[o["task"]] = ("env", msg.message)
                    else:
                        self._training_order_failed(sid, o["seq"], msg.message)
            elif isinstance(msg, Hello):
                log.info(
                    "rollout %s (pid %d) connected at version %d", sid, msg.pid, msg.policy_version
                )
                self.weights.join(sid, msg.hostname)  # a (re)joined engine: a full sync
                self.pending_acks.pop(sid, None)
                self.benched.pop(sid, None)  # a new process: it may take orders again
                self.failures_in_a_row[sid] = 0
                if msg.policy_version != self.version:
                    log.info("sending %s the weights of version %d", sid, self.version)
                    self._publish_to([sid])
                # a new process under a known id knows nothing of its predecessor's orders
                self._reassign(lambda o, s=sid: o["server"] == s)
        for sid in self.hub.check_dead(self.cfg.wire.dead_after_s):
            self.counters["servers_dead"] += 1
            self.pending_acks.pop(sid, None)
            log.error(
                "rollout server %s is dead (no heartbeat for %.0fs); reassigning its orders",
                sid,
                self.cfg.wire.dead_after_s,
            )
            self._reassign(lambda o, s=sid: o["server"] == s)
        now = time.monotonic()
        timeout = self.cfg.wire.order_timeout_s
        for oid, o in list(self.orders.items()):
            if o["eval"] and now - o["sent"] > timeout:  # it scores 0, evaluate() goes on
                del self.orders[oid]
                self.eval_failures[o["task"]] = (
                    "timeout",
                    f"no answer from {o['server'] or 'any server'} within "
                    f"wire.order_timeout_s = {timeout:g}s",
                )
        self._reassign(lambda o: now - o["sent"] > timeout)  # a training order goes again
        if self._usable(self.hub.alive_servers()):
            self._no_server_since = None
            self._reassign(lambda o: o["server"] is None)  # orders that waited for a server
        elif self._no_server_since is None:
            self._no_server_since = now
        elif now - self._no_server_since > self.cfg.wire.connect_timeout_s:
            raise LearnerError(
                f"no rollout server has been alive for "
                f"{self.cfg.wire.connect_timeout_s:.0f}s; see their logs"
            )
        self._check_progress(now)
        for sid, pend in list(self.pending_acks.items()):
            late = [v for v, t0 in pend.items() if now - t0 > self.cfg.wire.weight_sync_timeout_s]
            if late:
                del self.pending_acks[sid]  # the newer ones wait behind it: all are lost
                self.weights.forget(sid)
                self.counters["weight_syncs_failed"] += 1
                log.error("weight sync to %s (version %d) timed out", sid, min(late))

    def _check_progress(self, now: float) -> None:
        """End the run once orders are out and none came back with a trajectory for
        ``wire.progress_timeout_s`` (servers that heartbeat but never answer, an engine that
        hangs): re-sending orders forever would hide it."""
        limit = self.cfg.wire.progress_timeout_s
        if not self.orders:
            self._last_progress = None
        elif self._last_progress is None:
            self._last_progress = now  # work went out: the clock starts
        elif limit and now - self._last_progress > limit:
            alive = self.hub.alive_servers()
            states = "; ".join(f"{s}: {self.benched.get(s, 'takes orders')}" for s in alive)
            raise LearnerError(
                f"no work order came back with a trajectory for {limit:.0f}s "
                f"(wire.progress_timeout_s) while {len(self.orders)} were out; servers: "
                f"{states or 'none alive'}; the last error: {self._last_error or 'none'}. "
                "The rollout logs say more: an engine that hangs, or an env that never returns?"
            )

    def _order_outcome(self, failed: bool) -> None:
        """Count a training order's outcome; end the run once more than
        ``wire.max_order_failure_rate`` of the last ``wire.order_failure_window`` failed."""
        w = self.cfg.wire
        if self._outcomes is None or self._outcomes.maxlen != w.order_failure_window:
            self._outcomes = deque(maxlen=w.order_failure_window)
        self._outcomes.append(failed)
        n = sum(self._outcomes)
        if (
            len(self._outcomes) == w.order_failure_window
            and n / len(self._outcomes) > w.max_order_failure_rate
        ):
            raise LearnerError(
                f"{n} of the last {len(self._outcomes)} training work orders failed, more than "
                f"wire.max_order_failure_rate = {w.max_order_failure_rate:g}; the last error: "
                f"{self._last_error or 'none'}"
            )

    def _training_order_failed(self, sid: str, seq: int, error: str) -> None:
        """A failing task costs its group, not the run: its sequence counts as done. A server
        whose orders keep failing gets no more (``wire.max_order_failures``); an env that fails
        every episode ends the run (``wire.max_env_failures``)."""
        self.cursor.done(seq)
        n = self.failures_in_a_row[sid] = self.failures_in_a_row.get(sid, 0) + 1
        if n >= self.cfg.wire.max_order_failures and sid not in self.benched:
            self.benched[sid] = (
                f"its last {n} work orders failed (wire.max_order_failures); the last: {error}"
            )
            log.error("rollout %s gets no more work orders: %s", sid, self.benched[sid])
        self.env_failures.record(self.cfg.learner.group_size, 0, error)
        self._order_outcome(True)

    def _reassign(self, pred: Any) -> None:
        for oid, o in list(self.orders.items()):
            if pred(o):
                del self.orders[oid]
                new = self._send_order(o["seq"], o["task"], o["split"], o["eval"])
                if o["eval"]:  # it keeps its deadline: evaluate() ends however often it moves
                    self.orders[new]["sent"] = o["sent"]

    def collect(self, n: int) -> list[Trajectory]:
        """Wait for ``n`` groups within the staleness bound; drop or correct the others.
        With dynamic sampling / a pass-rate band, groups outside it are dropped (their prompt
        counts as consumed) and new orders refill the batch, up to a drop budget per step."""
        lc = self.cfg.learner
        self._last_progress = None  # (progress_timeout_s: the time training took is no wait)
        filtering = lc.dynamic_sampling or list(lc.pass_rate_band) != [0.0, 1.0]
        budget = lc.filter_max_dropped * n
        while True:
            keep = []
            for tr in self.ready:
                if self.version - tr.policy_version > lc.max_staleness:
                    if lc.stale_policy == "drop":
                        self.counters["stale_dropped"] += 1
                        self.cursor.requeue(self.seq_of.pop(tr.order_id))
                        continue
                if filtering and budget > 0:
                    rate = pass_rate(tr.samples, self.env.reward_range[1])
                    if not keep_group(rate, lc.dynamic_sampling, tuple(lc.pass_rate_band)):
                        budget -= 1
                        self.counters["filtered_groups"] += 1
                        self.cursor.done(self.seq_of.pop(tr.order_id))
                        if budget == 0:
                            log.warning(
                                "filters dropped %d groups this step; training on the "
                                "next ones unfiltered",
                                lc.filter_max_dropped * n,
                            )
                        continue
                keep.append(tr)
            self.ready = keep
            if len(self.ready) >= n:
                batch, self.ready = self.ready[:n], self.ready[n:]
                # counted here, not in the scan above: collect() re-scans `ready` per receive
                self.counters["stale_corrected"] += sum(
                    self.version - t.policy_version > lc.max_staleness for t in batch
                )
                return sorted(batch, key=lambda t: self.seq_of[t.order_id])  # arrival-independent
            self.dispatch()
            self._pump(0.5)
            if (k := _fault_kill_at()) >= 0 and self.ready and self.step == k:
                log.error(
                    "CLIMBRL_FAULT_KILL_AT_STEP=%d: SIGKILL with %d groups received and "
                    "%d orders in flight",
                    self.step,
                    len(self.ready),
                    len(self.orders),
                )
                os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ training

    def train_step(self, groups: list[Trajectory]) -> dict[str, Any]:
        """``learner.epochs`` x ``learner.minibatches`` optimizer steps of ``learner.objective``
        on one batch (learner/objectives_step.py; one step by default)."""
        lc, ds = self.cfg.learner, self.ds
        t0 = time.perf_counter()
        self._command(f"train@{self.version}", groups)  # FSDP: every rank trains this batch
        batch = self.obj.prepare(groups, self.version)  # shaped rewards, advantages, norms
        if lc.mismatch_probe_samples and not ds.distributed:
            self._probe_mismatch(batch)  # lag >= 1 samples under the weights that made them
            if self.snapshot.version is None or self.version % lc.publish_every == 0:
                # the weights the servers hold from now on (version 0 and each publish)
                self.snapshot.take(self._trainable(), self.version)
        if self.obj.critic is not None:
            self.obj.prepare_values(self.model, batch)  # PPO: V(s_t) -> GAE(gamma, lambda)
        plan = [
            (lo, hi, norm, self._micro(batch.samples, lo, hi))
            for lo, hi, norm in self.obj.minibatches(batch)
        ]
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
                    grad_norm = fsdp.clip_grad_norm(self.model.parameters(), lc.grad_clip)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self.model.parameters(), lc.grad_clip
                    )
                self.opt.step()
                critic_grad_norm = self.obj.step_critic()
                batch.stepped = True
                grad_norms.append(float(grad_norm))
        if ds.distributed:
            batch.acc = fsdp.reduce_stats(batch.acc, ds)  # sums over ranks (max for *_max)
        seqs = [self.seq_of.pop(g.order_id) for g in groups] if ds.is_coordinator else []
        for seq in seqs:
            self.cursor.done(seq)
        stats: dict[str, Any] = self.obj.finish(batch)  # also steps the clip-high controller
        self._mid_collective = False
        stats["trained_seqs"] = seqs
        stats["grad_norm"] = grad_norms[0]  # the first step's: before the batch moved the policy
        stats["optimizer_steps"] = float(batch.updates)
        if self.obj.critic is not None:
            stats["critic_grad_norm"] = critic_grad_norm
        stats["train_s"] = time.perf_counter() - t0
        return stats

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _probe_mismatch(self, batch: Any) -> None:
        """Add to the step's mismatch sums up to ``learner.mismatch_probe_samples`` samples the
        snapshot's version generated, their log-probs from a no-grad forward under that
        version's weights (``learner/snapshot.py``). The step's own forward measures the
        lag-0 samples."""
        lc, snap = self.cfg.learner, self.snapshot
        if snap.version is None or snap.version >= self.version:
            return
        lag = self.version - snap.version
        pick = [
            j
            for j in range(len(batch.samples))
            if int(batch.lag_B[j]) == lag and batch.keep_B[j] > 0
        ][: lc.mismatch_probe_samples]
        if not pick:
            return
        samples = [batch.samples[j] for j in pick]
        acc = batch.acc
        with torch.no_grad(), snap.swapped_in(self._trainable()):
            for i, n in micro_chunks(samples, lc.micro_batch_size, lc.micro_batch_tokens):
                b = self._policy_logprobs(samples[i : i + n])
                mm = mismatch_sums(b["logp"], b["old_logp"], b["mask"])
                acc["mm_abs"] += mm["abs_sum"]
                acc["mm_kl"] += mm["kl_sum"]
                acc["mm_n"] += mm["n"]
                acc["mm_probe_n"] += mm["n"]
                acc["mm_max"] = max(acc["mm_max"], mm["abs_max"])

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
            with torch.no_grad():
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
        loss = self.obj.micro_loss(batch, i, b, ref, norm, epoch)
        if self.ds.distributed:
            loss = loss * scale
        if acc is not None:  # the padding pass ran for the collectives, not the statistics
            batch.acc = acc
        loss.backward()

    # ------------------------------------------------------------------ weights

    def publish_weights(self) -> float:
        """Send the current weights to every live server; return the last full sync time."""
        self._publish_to(self.hub.alive_servers())
        return self.sync_times[-1] if self.sync_times else float("nan")

    def _publish_to(self, servers: list[str]) -> None:
        """Full sync to servers at an unknown version, delta/adapters to the others
        (``learner.weight_sync``; learner/weights.py). FSDP: the full weights are gathered
        from every rank first."""
        if self.ds.distributed:
            self._command("publish")
            state = fsdp.full_state_dict(self.model, self.ds)
            self._mid_collective = False
            msgs = self.weights.messages(self.version, servers, state=state)
        else:
            msgs = self.weights.messages(self.version, servers)
        for sids, manifest, tensors in msgs:
            size = self.weights.last[manifest.kind]
            for sid in sids:
                self.pending_acks.setdefault(sid, {})[self.version] = time.monotonic()
                self.hub.send(sid, manifest, tensors)
                self.counters["weight_bytes_sent"] += size
                self.counters[f"weight_syncs_{manifest.kind}"] += 1

    def _on_ack(self, sid: str, ack: WeightAck, arrived: float) -> None:
        pend = self.pending_acks.get(sid, {})
        if ack.deferred or not ack.ok:
            # the server takes updates in order: this answers the oldest one outstanding
            if pend:
                del pend[min(pend)]
            self.weights.forget(sid, ack.shm_unreadable)  # pinned or failed: next is a full sync
        if ack.deferred:
            log.info(
                "%s is pinned at version %d for serving; it will take the latest version "
                "when unpinned",
                sid,
                ack.version,
            )
            return
        if not ack.ok:
            self.counters["weight_syncs_failed"] += 1
            log.error(
                "weight update on %s failed, it stays on version %d%s: %s",
                sid,
                ack.version,
                " (rolled back)" if ack.rolled_back else "",
                ack.error,
            )
            return
        self.weights.acked(sid, ack.version)  # its older weights files may be rewritten
        t0 = pend.get(ack.version)
        for v in [v for v in pend if v <= ack.version]:
            del pend[v]  # acked, or superseded by a newer version that was
        if t0 is not None:
            self.sync_times.append(arrived - t0)
            self.sync_phases = ack.phases

    def wait_weight_acks(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(self.pending_acks.values()) and time.monotonic() < deadline:
            self._pump(0.1)

    # ------------------------------------------------------------------ eval, logs, state

    def evaluate(self, split: str) -> float:
        """Greedy accuracy on the first ``eval_size`` tasks of ``split`` (through the engines).
        An episode that fails in the env, or gets no answer within ``wire.order_timeout_s``,
        scores 0; they are counted and the first error is logged."""
        n = min(self.cfg.learner.eval_size, self.env.num_tasks(split))
        if n == 0:
            return float("nan")
        self.wait_weight_acks(self.cfg.wire.weight_sync_timeout_s)
        self.eval_results.clear()
        self.eval_failures.clear()
        self._last_progress = None  # (wire.progress_timeout_s: from the first order out)
        for i in range(n):
            self._send_order(i, i, split, True)
        while len(self.eval_results) + len(self.eval_failures) < n:
            self._pump(0.5)
        outcomes = [0.0] * n  # a failed episode scores 0
        sums: dict[str, float] = {}
        for task, t in self.eval_results.items():
            vals = []
            for s in t.samples:
                if s.finish_reason == ENV_ERROR:
                    self.eval_failures.setdefault(task, ("env", s.error))
                    vals.append(0.0)
                else:
                    vals.append(
                        s.metrics.get("correct", float(s.reward >= self.env.reward_range[1]))
                    )
                    for k, v in s.metrics.items():
                        if isinstance(v, (int, float)) and math.isfinite(v):
                            sums[k] = sums.get(k, 0.0) + float(v) / len(t.samples)
            outcomes[task] = sum(vals) / max(len(vals), 1)
        self.eval_outcomes[split] = outcomes
        acc = sum(outcomes) / n
        kinds = [why for why, _ in self.eval_failures.values()]
        env_errors, timeouts = kinds.count("env"), kinds.count("timeout")
        self.counters["eval_env_errors"] += env_errors
        self.counters["eval_timeouts"] += timeouts
        rec: dict[str, Any] = {"step": self.step, f"eval/{split}_accuracy": acc}
        means = {k: v / n for k, v in sorted(sums.items()) if k != "correct"}
        rec.update({f"eval/{split}_{k}": v for k, v in means.items()})
        if split == "test":
            self.eval_metrics[self.step] = means
        if self.eval_failures:  # (the live table's caption shows every eval/ key)
            rec.update({f"eval/{split}_env_errors": env_errors, f"eval/{split}_timeouts": timeouts})
        self.metrics.write(rec)
        if self.eval_failures:
            log.warning(
                "eval %s at step %d: %d of %d episodes failed and score 0 (%d in the "
                "env, %d past wire.order_timeout_s); the first: %s",
                split,
                self.step,
                len(self.eval_failures),
                n,
                env_errors,
                timeouts,
                self.eval_failures[min(self.eval_failures)][1],
            )
        log.info("eval %s accuracy at step %d: %.3f", split, self.step, acc)
        return acc

    def log_step(self, stats: dict[str, Any]) -> None:
        now = time.time()
        t_prev, tok_prev = self._last_log
        self._last_log = (now, self.tokens_generated)
        rec = {
            "step": self.step,
            "version": self.version,
            **stats,
            **self.counters,
            "tokens_per_s": (self.tokens_generated - tok_prev) / max(now - t_prev, 1e-9),
            "step_s": now - t_prev,
            "elapsed_s": now - self.t_start,
            **{f"sync_{k}_s": v for k, v in self.sync_phases.items()},
        }
        lag = self.hub.take_loop_lag_where()
        if lag:
            server = max(lag, key=lambda s: lag[s][0])
            worst, where = lag[server]
            rec["rollout_loop_lag_max_s"] = worst
            if worst > self.cfg.rollout.loop_lag_warn_s:
                log.warning(
                    "rollout server %s: its event loop was blocked for %.2fs since the last "
                    "step, running %s; generation and weight updates wait meanwhile (an env "
                    "doing synchronous work in an async method? rollout.loop_lag_warn_s = %g "
                    "sets this warning's threshold)",
                    server,
                    worst,
                    where or "code not caught by the sampler",
                    self.cfg.rollout.loop_lag_warn_s,
                )
        self.metrics.write(rec)

    def checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "version": self.version,
            "cursor": self.cursor.state(),
            "objective": self.obj.state(),
        }
        model, opt = self.weights.checkpoint_model(), self.opt
        if self.ds.distributed:  # the full weights and optimizer state, gathered on rank 0
            self._command("checkpoint")
            model, opt = fsdp.checkpoint_views(self.model, self.opt, self.ds)
            self._mid_collective = False
        return save_checkpoint(
            self.out, self.step, model, self.tokenizer, opt, state, extra=self.obj.save
        )

    def finish(
        self, before: float | None, after: float, before_outcomes: list[float] | None = None
    ) -> dict[str, Any]:
        # null, not NaN, where no evaluation ran (learner.eval_size = 0, or a resumed run)
        summary = {
            "steps": self.step,
            "accuracy_before": _finite(before),
            "accuracy_after": _finite(after),
            "elapsed_s": time.time() - self.t_start,
            "train_loop_s": self.train_s,
            **self.counters,
        }
        if self.eval_metrics:  # the env's other metrics, at the first and the last eval
            if before is not None:
                summary["eval_metrics_before"] = self.eval_metrics[min(self.eval_metrics)]
            summary["eval_metrics_after"] = self.eval_metrics[max(self.eval_metrics)]
        after_outcomes = self.eval_outcomes.get("test")
        if before_outcomes is not None and after_outcomes is not None:
            # the same tasks, greedy, before and after: which ones the run fixed and broke
            summary["heldout_change"] = paired_change(before_outcomes, after_outcomes)
        self.metrics.summary(summary)
        return summary

    def shutdown(self) -> None:
        from climbrl.wire import Control

        try:
            for sid in self.hub.alive_servers():
                self.hub.send(sid, Control(command="shutdown"))
        except HubError as e:  # the servers stop on the learner's silence (wire.dead_after_s)
            log.error("shutdown not sent: %s", e)
        time.sleep(0.2)
        self.hub.close()
        self.weights.close()
        self.metrics.close()
        if self.ds.distributed and not self._mid_collective:
            # (after an error inside a collective the other ranks are stuck in it: rank 0
            # exits and torchrun stops them)
            self._command("stop")
            fsdp.cleanup(self.ds)


def _fault_kill_at() -> int:
    return int(os.environ.get("CLIMBRL_FAULT_KILL_AT_STEP") or -1)


def _truncate_metrics(out: Path, step: int) -> list[int]:
    """Before a resume from ``step``: keep the records up to it in ``metrics.jsonl`` (atomically
    rewritten) and move the later ones (trained by a run that died before its next checkpoint)
    to ``metrics.discarded.jsonl``. Returns the discarded step numbers."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    keep, drop, steps = [], [], set()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
        else:
            drop.append(line)
            if "reward" in rec:
                steps.add(rec["step"])
    if drop:
        with open(out / "metrics.discarded.jsonl", "a") as f:
            f.write("".join(x + "\n" for x in drop))
    tmp = out / f".metrics.jsonl.{os.getpid()}"
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)
    return sorted(steps)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None

"""The learner: coordinator of an async GRPO run.

    climbrl learn runs/x/config.resolved.toml [--resume]

``train()`` below reads as the algorithm. ``Learner`` wires its parts to the socket (the
``LearnerHub``) and routes each message to the part it concerns:

- ``OrderBook`` (learner/orders.py): work orders out to the rollout servers, reassignment,
  which servers may take orders, deadlines and liveness;
- ``Batcher`` (learner/batcher.py): groups back from the servers, the staleness bound and the
  filters that pick a batch;
- ``Trainer`` (learner/trainer.py): the model, optimizer and objective; one batch in,
  optimizer steps out;
- ``Publishing`` (learner/publishing.py): weight updates in flight and their acks;
- ``evaluation.score`` (learner/evaluation.py): held-out accuracy from greedy episodes;
- the data cursor (learner/data.py), metrics files and HF-format checkpoints.

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
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from climbrl.config import Config
from climbrl.envs.base import make_env
from climbrl.learner import fsdp
from climbrl.learner.batcher import Batcher
from climbrl.learner.checkpoint import latest_checkpoint, save_checkpoint
from climbrl.learner.data import DataCursor
from climbrl.learner.evaluation import EvalProgress, report_eval, run_summary, score
from climbrl.learner.hub import HubError, LearnerHub
from climbrl.learner.orders import EnvFailureStreak, LearnerError, Order, OrderBook
from climbrl.learner.publishing import Publishing
from climbrl.learner.sleep import set_engines_asleep
from climbrl.learner.trainer import Trainer
from climbrl.learner.weights import WeightPublisher
from climbrl.metrics import MetricsWriter
from climbrl.wire import ENV_ERROR, Control, Error, Heartbeat, Hello, Trajectory, WeightAck

__all__ = ["EnvFailureStreak", "Learner", "LearnerError", "Order", "follower", "train"]

log = logging.getLogger("climbrl.learner")
# the run's counters, in every metrics.jsonl record and in summary.json
COUNTERS = (
    "stale_dropped stale_corrected order_failures servers_dead engines_dead eval_env_errors "
    "eval_timeouts filtered_groups weight_bytes_sent weight_syncs_full weight_syncs_delta "
    "weight_syncs_lora weight_syncs_failed"
).split()


def train(cfg: Config, resume: bool = False, endpoint_file: str | None = None) -> dict[str, Any]:
    """Run GRPO to ``learner.total_steps``; returns the final summary (also in summary.json)."""
    ds = fsdp.setup(cfg)
    if not ds.is_coordinator:  # an FSDP rank > 0: follows rank 0's commands
        follower(cfg, resume, ds).follow()
        fsdp.cleanup(ds)
        return {}
    L = Learner.from_config(cfg, resume=resume, ds=ds)
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
            L.engines_asleep(True)  # colocated on the GPU: the engines free it meanwhile
            stats = L.train_step(groups)  # advantages -> clipped loss -> optimizer step
            L.engines_asleep(False)
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


def follower(cfg: Config, resume: bool, ds: fsdp.DistState) -> Trainer:
    """An FSDP rank > 0: its trainer, resumed from the checkpoint rank 0 resumes from."""
    _prepare(cfg)
    reward_max = make_env(cfg.env.name, cfg.env.args).reward_range[1]
    ckpt = latest_checkpoint(Path(cfg.run.output_dir)) if resume else None
    trainer = Trainer.build(cfg, ds, reward_max, ckpt)
    if ckpt:
        trainer.load(ckpt)
    return trainer


def _prepare(cfg: Config) -> None:
    """Threads and seed, before any model is built."""
    if cfg.learner.threads:
        torch.set_num_threads(cfg.learner.threads)
    torch.manual_seed(cfg.run.seed)


class Learner:
    """Rank 0's coordinator: the cursor, the order book, the batcher, the trainer, weight
    updates, evaluation, metrics and checkpoints, wired to the socket ``hub``."""

    train_s: float | None = None  # the training loop's wall time, set by train()

    def __init__(
        self,
        cfg: Config,
        *,
        hub: Any,
        env: Any,
        trainer: Trainer | None = None,
        weights: WeightPublisher | None = None,
        metrics: MetricsWriter | None = None,
        tokenizer: Any = None,
        cursor: DataCursor | None = None,
        step: int = 0,
        version: int = 0,
        run_id: str = "run",
    ):
        """The parts as built (``from_config`` builds them from a config); a test passes a fake
        ``hub`` and leaves out what it does not exercise."""
        self.cfg, self.hub, self.env, self.trainer = cfg, hub, env, trainer
        self.metrics, self.tokenizer, self.run_id = metrics, tokenizer, run_id
        self.out = Path(cfg.run.output_dir)
        self.step, self.version = step, version
        self.cursor = cursor or DataCursor(env.num_tasks("train"), seed=cfg.run.seed)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.book = OrderBook(cfg, hub, self.counters)
        self.batcher = Batcher(cfg.learner, env.reward_range[1], self.cursor, self.counters)
        self.publishing = Publishing(weights, hub, self.counters) if weights else None
        self.env_failures = EnvFailureStreak(
            cfg.wire.max_env_failures, cfg.env.name, dict(cfg.env.args)
        )
        self.eval_results: dict[int, Trajectory] = {}  # task index -> its greedy trajectory
        # task index -> (why, the error) of an eval order that failed ("env") or got no
        # answer within wire.order_timeout_s ("timeout"): it scores 0
        self.eval_failures: dict[int, tuple[str, str]] = {}
        self.eval_outcomes: dict[str, list[float]] = {}  # split -> correctness per task, last eval
        # step -> the mean of each numeric metric the env reports (Sample.metrics) on split
        # "test", per eval: e.g. arith_chat's answer-correct and strict-format rates
        self.eval_metrics: dict[int, dict[str, float]] = {}
        self.t_start = time.time()
        self._last_log = (self.t_start, 0)
        self.tokens_generated = 0

    @classmethod
    def from_config(
        cls, cfg: Config, resume: bool = False, ds: fsdp.DistState | None = None
    ) -> Learner:
        """Rank 0 of a run, built from its config (``build_parts``)."""
        return cls(cfg, **build_parts(cfg, resume, ds or fsdp.DistState()))

    # ------------------------------------------------------------------ servers and orders

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

    def dispatch(self) -> None:
        """Keep at most (max_staleness + 1) batches of training orders out or ready."""
        lc = self.cfg.learner
        limit = lc.batch_groups * (lc.max_staleness + 1)
        inflight = self.book.training_out() + len(self.batcher.ready)
        while inflight < limit:
            seq, idx = self.cursor.take()
            self.book.send(seq, idx, "train", False, self.version)
            inflight += 1

    def collect(self, n: int) -> list[Trajectory]:
        """Wait for ``n`` groups the batcher takes (staleness bound, filters); new orders
        refill what it drops."""
        self.book.last_progress = None  # (progress_timeout_s: the time training took is no wait)
        while (batch := self.batcher.take(n, self.version)) is None:
            self.dispatch()
            self._pump(0.5)
            if (k := _fault_kill_at()) >= 0 and self.batcher.ready and self.step == k:
                log.error(
                    "CLIMBRL_FAULT_KILL_AT_STEP=%d: SIGKILL with %d groups received and "
                    "%d orders in flight",
                    self.step,
                    len(self.batcher.ready),
                    len(self.book.orders),
                )
                os.kill(os.getpid(), signal.SIGKILL)
        return batch

    def _pump(self, timeout: float) -> None:
        """Handle one inbound message (or time out), then check liveness and deadlines."""
        book = self.book
        item = self.hub.recv(timeout)
        if item is not None:
            sid, msg, _, arrived = item
            if isinstance(msg, Trajectory):
                self._on_trajectory(sid, msg)
            elif isinstance(msg, WeightAck):
                if self.publishing is not None:
                    self.publishing.on_ack(sid, msg, arrived)
            elif (isinstance(msg, Error) and msg.code == "engine_dead") or (
                isinstance(msg, Heartbeat) and msg.engine_error
            ):
                why = msg.message if isinstance(msg, Error) else msg.engine_error
                book.engine_lost(sid, why, self.version)  # this order included
            elif isinstance(msg, Error):
                self._on_error(sid, msg)
            elif isinstance(msg, Hello):
                log.info(
                    "rollout %s (pid %d) connected at version %d", sid, msg.pid, msg.policy_version
                )
                if self.publishing is not None:
                    self.publishing.joined(sid, msg.hostname)  # a (re)joined engine: full sync
                if msg.policy_version != self.version:
                    log.info("sending %s the weights of version %d", sid, self.version)
                    self._publish_to([sid])
                book.server_joined(sid, self.version)
        for sid in self.hub.check_dead(self.cfg.wire.dead_after_s):
            if self.publishing is not None:
                self.publishing.lost(sid)
            book.server_dead(sid, self.cfg.wire.dead_after_s, self.version)
        now = time.monotonic()
        book.check(now, self.version, self.eval_failures)
        if self.publishing is not None:
            self.publishing.check(now, self.cfg.wire.weight_sync_timeout_s)

    def _on_trajectory(self, sid: str, msg: Trajectory) -> None:
        book = self.book
        if msg.run_id != self.run_id:
            log.warning(
                "trajectory %s from another learner run (%s) dropped", msg.order_id, msg.run_id
            )
            return
        book.failures_in_a_row[sid] = 0
        o = book.orders.pop(msg.order_id, None)
        if o is None:
            log.warning("trajectory for unknown order %s dropped", msg.order_id)
            return
        book.last_progress = time.monotonic()
        if o.eval:
            self.eval_results[o.task] = msg
            return
        failed = [s for s in msg.samples if s.finish_reason == ENV_ERROR]
        self.env_failures.record(
            len(failed), len(msg.samples) - len(failed), failed[0].error if failed else ""
        )
        book.outcome(False)
        self.tokens_generated += msg.num_generated_tokens
        self.batcher.add(msg, o.seq)  # under the cursor sequence of its order

    def _on_error(self, sid: str, msg: Error) -> None:
        """An order failed on ``sid``. A failed eval episode scores 0; a failing task costs its
        group, not the run: its sequence counts as done. A server whose orders keep failing
        gets no more (``wire.max_order_failures``); an env that fails every episode ends the
        run (``wire.max_env_failures``)."""
        book = self.book
        self.counters["order_failures"] += 1
        book.last_error = f"{sid}: {msg.code}: {msg.message}"
        log.error("rollout %s: %s: %s (order %s)", sid, msg.code, msg.message, msg.ref_id)
        o = book.orders.get(msg.ref_id)
        if o is None or o.server != sid:  # not an order reassigned since
            return
        del book.orders[msg.ref_id]
        if o.eval:  # it scores 0; a held-out task says nothing of the server
            self.eval_failures[o.task] = ("env", msg.message)
            return
        self.cursor.done(o.seq)
        book.order_failed(sid, msg.message)
        self.env_failures.record(self.cfg.learner.group_size, 0, msg.message)
        book.outcome(True)

    # ------------------------------------------------------------------ training and weights

    def train_step(self, groups: list[Trajectory]) -> dict[str, Any]:
        """The trainer's step on ``groups`` (learner/trainer.py); their sequences are done."""
        assert self.trainer is not None
        stats = self.trainer.train_step(groups, self.version)
        stats["trained_seqs"] = self.batcher.trained(groups)
        return stats

    def publish_weights(self) -> float:
        """Send the current weights to every live server; return the last full sync time."""
        self._publish_to(self.hub.alive_servers())
        times = self.publishing.sync_times if self.publishing else []
        return times[-1] if times else float("nan")

    def _publish_to(self, servers: list[str]) -> None:
        """Full sync to servers at an unknown version, delta/adapters to the others
        (``learner.weights.mode``). FSDP: the full weights are gathered from every rank."""
        if self.publishing is None:
            return
        state = self.trainer.full_state() if self.trainer else None
        self.publishing.publish(self.version, servers, state)

    def engines_asleep(self, asleep: bool) -> None:
        """Colocated placement with ``placement.sleep_level`` > 0: the rollout engines sleep
        while the learner steps (learner/sleep.py). Nothing to do in any other placement."""
        set_engines_asleep(self.cfg, self.hub, self.publishing, self._pump, asleep)

    def wait_weight_acks(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.publishing and self.publishing.outstanding() and time.monotonic() < deadline:
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
        self.book.last_progress = None  # (wire.progress_timeout_s: from the first order out)
        for i in range(n):
            self.book.send(i, i, split, True, self.version)
        with EvalProgress(self.out, split, self.step, n) as progress:  # the run's live view
            while (done := len(self.eval_results) + len(self.eval_failures)) < n:
                progress.update(done)
                self._pump(0.5)
        sc = score(n, self.eval_results, self.eval_failures, self.env.reward_range[1])
        self.eval_outcomes[split] = sc.outcomes
        self.counters["eval_env_errors"] += sc.env_errors
        self.counters["eval_timeouts"] += sc.timeouts
        if split == "test":
            self.eval_metrics[self.step] = sc.metrics
        if self.metrics is not None:
            self.metrics.write(sc.record(self.step, split, bool(self.eval_failures)))
        report_eval(sc, split, self.step, n, self.eval_failures)
        return sc.accuracy

    def log_step(self, stats: dict[str, Any]) -> None:
        now = time.time()
        t_prev, tok_prev = self._last_log
        self._last_log = (now, self.tokens_generated)
        phases = self.publishing.phases if self.publishing else {}
        rec = {
            "step": self.step,
            "version": self.version,
            **stats,
            **self.counters,
            "tokens_per_s": (self.tokens_generated - tok_prev) / max(now - t_prev, 1e-9),
            "step_s": now - t_prev,
            "elapsed_s": now - self.t_start,
            **{f"sync_{k}_s": v for k, v in phases.items()},
        }
        worst = _loop_lag(self.hub.take_loop_lag_where(), self.cfg.rollout.loop_lag_warn_s)
        if worst is not None:
            rec["rollout_loop_lag_max_s"] = worst
        assert self.metrics is not None
        self.metrics.write(rec)

    def checkpoint(self) -> Path:
        assert self.trainer is not None
        state = {
            "step": self.step,
            "version": self.version,
            "cursor": self.cursor.state(),
            "objective": self.trainer.obj.state(),
        }
        model, opt = self.trainer.checkpoint_views(self.cfg.model.path)
        return save_checkpoint(
            self.out, self.step, model, self.tokenizer, opt, state, extra=self.trainer.obj.save
        )

    def finish(
        self, before: float | None, after: float, before_outcomes: list[float] | None = None
    ) -> dict[str, Any]:
        summary = run_summary(
            self.step,
            before,
            after,
            elapsed_s=time.time() - self.t_start,
            train_loop_s=self.train_s,
            counters=self.counters,
            eval_metrics=self.eval_metrics,
            outcomes=(before_outcomes, self.eval_outcomes.get("test")),
        )
        assert self.metrics is not None
        self.metrics.summary(summary)
        return summary

    def shutdown(self) -> None:
        try:
            for sid in self.hub.alive_servers():
                self.hub.send(sid, Control(command="shutdown"))
        except HubError as e:  # the servers stop on the learner's silence (wire.dead_after_s)
            log.error("shutdown not sent: %s", e)
        time.sleep(0.2)
        self.hub.close()
        if self.publishing is not None:
            self.publishing.weights.close()
        if self.metrics is not None:
            self.metrics.close()
        t = self.trainer
        if t is not None and t.ds.distributed and not t.mid_collective:
            # (after an error inside a collective the other ranks are stuck in it: rank 0
            # exits and torchrun stops them)
            t.command("stop")
            fsdp.cleanup(t.ds)


def build_parts(cfg: Config, resume: bool, ds: fsdp.DistState) -> dict[str, Any]:
    """Rank 0's parts: the trainer (resumed from the latest checkpoint with ``resume``), the
    socket, the metrics files and the weight publisher, as ``Learner``'s keyword arguments."""
    from transformers import AutoTokenizer

    from climbrl.wirekeys import learner_keys

    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare(cfg)
    run_id = f"{cfg.run.name}-{uuid.uuid4().hex[:8]}"
    env = make_env(cfg.env.name, cfg.env.args)
    ckpt = latest_checkpoint(out) if resume else None
    trainer = Trainer.build(cfg, ds, env.reward_range[1], ckpt)
    shm = "/dev/shm" if cfg.learner.weights.transport == "auto" else None
    weights = WeightPublisher(
        trainer.model,
        cfg.learner.weights.mode,
        cfg.model.path,
        shm_dir=shm if shm and os.path.isdir(shm) else None,
        wire_dtype=getattr(torch, cfg.model.dtype),  # the engine's (the learner's may be fp32)
    )
    step = version = 0
    cursor = None
    if ckpt:
        st = trainer.load(ckpt)
        step, version = st["step"], st["version"]
        cursor = DataCursor.from_state(st["cursor"])
        log.info(
            "resumed from %s at step %d; replaying sequences %s, then from %d",
            ckpt,
            step,
            st["cursor"]["pending"],
            st["cursor"]["next_seq"],
        )
    discarded = _truncate_metrics(out, step if ckpt else -1) if resume else []
    if discarded:
        log.info(
            "metrics of steps %s (after the checkpoint) moved to metrics.discarded.jsonl",
            discarded,
        )
    hub = LearnerHub.from_config(cfg.wire, run_id, learner_keys(cfg.wire, out))
    metrics = MetricsWriter(out, resume=resume)
    if resume:
        metrics.write(
            {
                "step": step,
                "resumed_from": ckpt.name if ckpt else None,
                "discarded_steps": discarded,
            }
        )
    return dict(
        hub=hub,
        env=env,
        trainer=trainer,
        weights=weights,
        metrics=metrics,
        tokenizer=AutoTokenizer.from_pretrained(cfg.model.path),
        cursor=cursor,
        step=step,
        version=version,
        run_id=run_id,
    )


def _loop_lag(lag: dict[str, tuple[float, str]], warn_s: float) -> float | None:
    """The longest event-loop block the servers reported since the last step (None: no
    report), with a warning past ``rollout.loop_lag_warn_s`` that names the code it ran."""
    if not lag:
        return None
    server = max(lag, key=lambda s: lag[s][0])
    worst, where = lag[server]
    if worst > warn_s:
        log.warning(
            "rollout server %s: its event loop was blocked for %.2fs since the last step, "
            "running %s; generation and weight updates wait meanwhile (an env doing "
            "synchronous work in an async method? rollout.loop_lag_warn_s = %g sets this "
            "warning's threshold)",
            server,
            worst,
            where or "code not caught by the sampler",
            warn_s,
        )
    return worst


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

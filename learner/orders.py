"""The order book: work orders out to the rollout servers, and which servers may take them.

An order goes to the least-loaded server that takes orders. It comes back as a trajectory, or
it moves: when its server dies, restarts, reports its engine dead, or it is out longer than
``wire.order_timeout_s`` (an eval order then scores 0 instead; it keeps its deadline when it
moves, so evaluation always ends). A server whose engine died or whose last
``wire.max_order_failures`` orders failed is benched: it takes no more orders until it says
Hello again. The run ends with an error that names the last cause when more than
``wire.max_order_failure_rate`` of the last ``wire.order_failure_window`` training orders
failed, or when orders are out for ``wire.progress_timeout_s`` with none coming back.

``EnvFailureStreak`` ends a run whose environment fails every training episode.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from climbrl.config import Config
from climbrl.wire import SamplingSpec, WorkOrder

log = logging.getLogger("climbrl.learner")


class LearnerError(RuntimeError):
    pass


class Servers(Protocol):
    """What the order book needs of the learner's socket (``LearnerHub``)."""

    def send(self, sid: str, msg: Any, frames: Any = ...) -> None: ...
    def order_servers(self) -> list[str]: ...
    def alive_servers(self) -> list[str]: ...


@dataclass
class Order:
    seq: int  # the cursor sequence (training) or the eval round's task number
    task: int  # the env's task index
    split: str
    server: str | None  # None: waiting for a server to (re)start
    sent: float  # time.monotonic() it went out (an eval order keeps its first)
    eval: bool


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


class OrderBook:
    def __init__(self, cfg: Config, servers: Servers, counters: dict[str, int]):
        self.cfg, self.servers, self.counters = cfg, servers, counters
        self.orders: dict[str, Order] = {}
        # servers that take no orders: sid -> why (an engine death, or order failures in a
        # row); cleared when the server says Hello again (a restarted process)
        self.benched: dict[str, str] = {}
        self.failures_in_a_row: dict[str, int] = {}  # sid -> failed orders since a trajectory
        # when an order last came back with a trajectory (None: no order out), for
        # wire.progress_timeout_s; the last error a server reported
        self.last_progress: float | None = None
        self.last_error = ""
        self._outcomes: deque[bool] | None = None  # the last training orders (True: failed)
        self._no_server_since: float | None = None

    def usable(self, servers: list[str]) -> list[str]:
        return [s for s in servers if s not in self.benched]

    def training_out(self) -> int:
        return sum(1 for o in self.orders.values() if not o.eval)

    def pick_server(self) -> str | None:
        """The least-loaded server that takes orders; None while the launcher restarts one."""
        alive = self.usable(self.servers.order_servers())
        if not alive:  # every live server is pinned for serving: its data is judged by staleness
            alive = self.usable(self.servers.alive_servers())
        if not alive:
            died = {s: why for s, why in self.benched.items() if why.startswith("vLLM engine")}
            if self.cfg.run.on_child_death == "restart" and (died or not self.benched):
                return None  # the launcher restarts it; the order waits for a Hello
            if self.benched:
                sid, why = next(reversed(self.benched.items()))
                raise LearnerError(f"no rollout server can take work orders; {sid}: {why}")
            raise LearnerError("no rollout server is alive; see their logs for the cause")
        load = dict.fromkeys(alive, 0)
        for o in self.orders.values():
            if o.server in load:
                load[o.server] += 1
        return min(alive, key=lambda s: load[s])

    def send(self, seq: int, task: int, split: str, is_eval: bool, version: int) -> str:
        """Send one order (or queue it for a server to come); returns its id."""
        cfg, rc = self.cfg, self.cfg.rollout
        # a training order's id is a function of its sequence (the server seeds samples from
        # it): a re-sent order samples the same group from the same weights
        oid = f"eval-{seq}-{uuid.uuid4().hex[:6]}" if is_eval else f"train-{seq}"
        sampling = SamplingSpec(
            temperature=0.0 if is_eval else rc.temperature,
            top_p=1.0 if is_eval else rc.top_p,
            top_k=-1 if is_eval else rc.top_k,
            max_tokens=rc.max_tokens,
            seed=cfg.run.seed,
        )
        server = self.pick_server()
        order = WorkOrder(
            order_id=oid,
            policy_version=version,
            env=cfg.env.name,
            env_args=cfg.env.args,
            task_index=task,
            split=split,
            group_size=1 if is_eval else cfg.learner.group_size,
            sampling=sampling,
        )
        self.orders[oid] = Order(seq, task, split, server, time.monotonic(), is_eval)
        if server is not None:
            self.servers.send(server, order)
        return oid

    def reassign(self, pred: Callable[[Order], bool], version: int) -> None:
        """Send again every order ``pred`` picks, to the least-loaded server."""
        for oid, o in list(self.orders.items()):
            if pred(o):
                del self.orders[oid]
                new = self.send(o.seq, o.task, o.split, o.eval, version)
                if o.eval:  # it keeps its deadline: evaluation ends however often it moves
                    self.orders[new].sent = o.sent

    def bench(self, sid: str, why: str) -> None:
        """``sid`` takes no more orders (until it says Hello again)."""
        self.benched[sid] = why

    def engine_lost(self, sid: str, why: str, version: int) -> None:
        """``sid`` reports its engine gone: its orders go elsewhere, or wait for its restart,
        and lose nothing; it takes none until it says Hello again."""
        self.last_error = f"{sid}: {why}"
        if sid not in self.benched:
            self.counters["engines_dead"] += 1
            log.error("rollout %s: %s; it gets no more work orders", sid, why)
        self.bench(sid, why)
        self.reassign(lambda o: o.server == sid, version)

    def server_dead(self, sid: str, dead_after_s: float, version: int) -> None:
        """``sid`` sent no heartbeat for ``wire.dead_after_s``: its orders go elsewhere."""
        self.counters["servers_dead"] += 1
        log.error(
            "rollout server %s is dead (no heartbeat for %.0fs); reassigning its orders",
            sid,
            dead_after_s,
        )
        self.reassign(lambda o: o.server == sid, version)

    def server_joined(self, sid: str, version: int) -> None:
        """A new process under ``sid`` (its Hello): it may take orders again, and its
        predecessor's orders, which it knows nothing of, go out again."""
        self.benched.pop(sid, None)
        self.failures_in_a_row[sid] = 0
        self.reassign(lambda o: o.server == sid, version)

    def order_failed(self, sid: str, error: str) -> None:
        """A training order failed on ``sid``: bench a server whose orders keep failing
        (``wire.max_order_failures`` in a row). The caller counts the ``outcome``."""
        n = self.failures_in_a_row[sid] = self.failures_in_a_row.get(sid, 0) + 1
        if n >= self.cfg.wire.max_order_failures and sid not in self.benched:
            self.benched[sid] = (
                f"its last {n} work orders failed (wire.max_order_failures); the last: {error}"
            )
            log.error("rollout %s gets no more work orders: %s", sid, self.benched[sid])

    def outcome(self, failed: bool) -> None:
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
                f"{self.last_error or 'none'}"
            )

    def check(self, now: float, version: int, eval_failures: dict[int, tuple[str, str]]) -> None:
        """Deadlines and liveness, after each message: eval orders past
        ``wire.order_timeout_s`` score 0 (into ``eval_failures``), training ones go again;
        orders waiting for a server go out once one is usable; no usable server for
        ``wire.connect_timeout_s``, or no progress for ``wire.progress_timeout_s``, ends the
        run."""
        w = self.cfg.wire
        for oid, o in list(self.orders.items()):
            if o.eval and now - o.sent > w.order_timeout_s:  # it scores 0, evaluation goes on
                del self.orders[oid]
                eval_failures[o.task] = (
                    "timeout",
                    f"no answer from {o.server or 'any server'} within "
                    f"wire.order_timeout_s = {w.order_timeout_s:g}s",
                )
        self.reassign(lambda o: now - o.sent > w.order_timeout_s, version)
        if self.usable(self.servers.alive_servers()):
            self._no_server_since = None
            self.reassign(lambda o: o.server is None, version)  # orders that waited
        elif self._no_server_since is None:
            self._no_server_since = now
        elif now - self._no_server_since > w.connect_timeout_s:
            raise LearnerError(
                f"no rollout server has been alive for {w.connect_timeout_s:.0f}s; see their logs"
            )
        self._check_progress(now)

    def _check_progress(self, now: float) -> None:
        """End the run once orders are out and none came back with a trajectory for
        ``wire.progress_timeout_s`` (servers that heartbeat but never answer, an engine that
        hangs): re-sending orders forever would hide it."""
        limit = self.cfg.wire.progress_timeout_s
        if not self.orders:
            self.last_progress = None
        elif self.last_progress is None:
            self.last_progress = now  # work went out: the clock starts
        elif limit and now - self.last_progress > limit:
            alive = self.servers.alive_servers()
            states = "; ".join(f"{s}: {self.benched.get(s, 'takes orders')}" for s in alive)
            raise LearnerError(
                f"no work order came back with a trajectory for {limit:.0f}s "
                f"(wire.progress_timeout_s) while {len(self.orders)} were out; servers: "
                f"{states or 'none alive'}; the last error: {self.last_error or 'none'}. "
                "The rollout logs say more: an engine that hangs, or an env that never returns?"
            )

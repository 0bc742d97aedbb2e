"""Failure paths (issue 21): a dead or stuck engine is noticed and every wait is bounded.

Learner side (no engines, the bookkeeping of tests/unit/test_crash_consistency.py): a heartbeat
that reports a dead engine moves its server's orders; a run whose orders never come back ends
with a clear error (``wire.progress_timeout_s``), as does one whose orders mostly fail
(``wire.max_order_failure_rate``); evaluation ends even when an eval order keeps moving between
servers. Rollout server side (fake engines): sends to a learner that stopped reading, the
version/reset awaits after a reload, and a generation request all have deadlines. The hub's
hand-off to its socket thread and ``ctx.term()`` are bounded too. On the code before these
fixes each test hangs (caught by its guard) or fails.
"""

from __future__ import annotations

import asyncio
import socket
import time
import types

import pytest
import torch
import zmq

from climbrl.config import load_config
from climbrl.learner.learner import Learner, LearnerError
from climbrl.learner.weights import WeightPublisher
from climbrl.rollout.client import LearnerClient
from climbrl.rollout.server import LearnerStuck, RolloutServer
from climbrl.wire import Error, Heartbeat, WorkOrder, term_context
from tests.unit.test_crash_consistency import _hello, _learner, _traj
from tests.unit.test_env_failures import _eval_learner, _sample
from tests.unit.test_server_weights import FakeEngine, _update, receiver

DEAD = "vLLM engine died: MPClient: engine core exited unexpectedly"


def _fake_clock(monkeypatch: pytest.MonkeyPatch, step_s: float = 100.0) -> None:
    """Each time.monotonic() call moves the clock ``step_s``: deadlines pass in a few pumps."""
    t0, n = time.monotonic(), iter(range(1_000_000))
    monkeypatch.setattr(time, "monotonic", lambda: t0 + step_s * next(n))


def _guard(L: Learner, pumps: int = 5000) -> None:
    """Fail (instead of hanging) once the learner pumped ``pumps`` times."""
    real, count = L.hub.recv, iter(range(pumps))

    def recv(timeout: float):
        if next(count, None) is None:
            raise AssertionError(f"still waiting after {pumps} pumps: unbounded")
        return real(timeout)

    L.hub.recv = recv


# --------------------------------------------------------------------------- learner


def test_a_heartbeat_reporting_a_dead_engine_moves_its_orders():
    L = _learner(["r0", "r1"])
    L.dispatch()
    mine = [oid for oid, o in L.book.orders.items() if o.server == "r0"]
    assert mine
    L.hub.inbox.append(
        (
            "r0",
            Heartbeat(
                server_id="r0",
                policy_version=3,
                inflight=1,
                accepting_orders=False,
                engine_error=DEAD,
            ),
            [],
            time.monotonic(),
        )
    )
    L._pump(0.0)
    assert L.book.benched == {"r0": DEAD} and L.counters["engines_dead"] == 1
    assert all(o.server == "r1" for o in L.book.orders.values())


def test_no_progress_ends_the_run_with_the_servers_state(monkeypatch):
    """Servers that heartbeat but never answer: orders are re-sent every order_timeout_s, and
    without a progress deadline the learner would wait forever."""
    L = _learner(["r0"])
    L.cfg.wire.progress_timeout_s = 1000.0
    L.book.last_error = "r0: order_failed: RuntimeError: stuck"
    _guard(L)
    _fake_clock(monkeypatch)
    with pytest.raises(
        LearnerError,
        match=r"no work order came back with a trajectory for "
        r"1000s \(wire.progress_timeout_s\) while 2 were out; servers: r0: takes "
        r"orders; the last error: r0: order_failed: RuntimeError: stuck",
    ):
        L.collect(2)


def test_a_trajectory_is_progress(monkeypatch):
    L = _learner(["r0"])
    L.cfg.wire.progress_timeout_s = 1000.0
    _fake_clock(monkeypatch, 1.0)
    L.dispatch()
    L._pump(0.0)  # the clock starts
    L.hub.inbox.append(_traj("train-0", "run-a"))
    L._pump(0.0)
    assert L.book.last_progress is not None and "train-0" not in L.book.orders


def test_a_high_order_failure_rate_ends_the_run():
    """19 of every 20 orders fail: never max_order_failures or max_env_failures in a row, but
    more than max_order_failure_rate of the last order_failure_window."""
    L = _learner(["r0"])
    w = L.cfg.wire
    w.max_order_failures = L.env_failures.limit = 1000
    w.max_order_failure_rate, w.order_failure_window = 0.9, 20
    _guard(L, 500)
    answered = 0
    with pytest.raises(
        LearnerError,
        match=r"19 of the last 20 training work orders failed, "
        r"more than wire.max_order_failure_rate = 0.9; the last error: r0: "
        r"order_failed: boom",
    ):
        while True:
            L.dispatch()
            for sid, m in [x for x in L.hub.sent if isinstance(x[1], WorkOrder)]:
                answered += 1
                if answered % 20 == 0:
                    L.hub.inbox.append(_traj(m.order_id, "run-a"))
                else:
                    L.hub.inbox.append(
                        (
                            sid,
                            Error(
                                origin=sid, code="order_failed", message="boom", ref_id=m.order_id
                            ),
                            [],
                            time.monotonic(),
                        )
                    )
            L.hub.sent.clear()
            L._pump(0.0)
            L.batcher.ready.clear()  # (trained)
    assert not L.book.benched


def test_failures_below_the_rate_go_on():
    L = _learner(["r0"])
    w = L.cfg.wire
    w.max_order_failure_rate, w.order_failure_window = 0.5, 4
    for failed in [True, False, True, False, True, False]:
        L.book.outcome(failed)  # never more than half of the last 4


def test_evaluation_ends_when_an_eval_order_keeps_moving(monkeypatch):
    """Task 2's server reports its engine dead and restarts, every time: the order is moved
    each time, keeping its deadline, so it scores 0 as a timeout and evaluate() returns."""
    L = _eval_learner(connect_timeout_s=1e9)
    L.cfg.run.on_child_death = "restart"
    real = L._pump

    def pump(timeout: float) -> None:
        dies = []
        for sid, m in [x for x in L.hub.sent if isinstance(x[1], WorkOrder)]:
            if m.task_index == 2:  # (after the other answers: they are not moved)
                dies += [
                    (
                        sid,
                        Error(origin=sid, code="engine_dead", message=DEAD),
                        [],
                        time.monotonic(),
                    ),
                    _hello(sid, 3),
                ]
            else:
                L.hub.inbox.append(_traj(m.order_id, L.run_id))
                L.hub.inbox[-1][1].samples = [_sample(1.0)]
        L.hub.inbox += dies
        L.hub.sent.clear()
        real(timeout)

    L._pump = pump
    _guard(L)
    _fake_clock(monkeypatch, 10.0)
    assert L.evaluate("test") == 0.75
    assert L.counters["eval_timeouts"] == 1 and L.eval_failures[2][0] == "timeout"


# --------------------------------------------------------------------------- rollout server


def _server(tmp_path, *overrides: str) -> RolloutServer:
    cfg = load_config(None, [f'model.path="{tmp_path}"', *overrides])
    srv = RolloutServer(cfg, "tcp://127.0.0.1:1", "r0")
    srv.attach(FakeEngine(), tokenizer=None)
    srv.engine.errored = False
    return srv


async def test_a_send_to_a_learner_that_stops_reading_is_bounded(tmp_path):
    """A DEALER with no peer to take the message blocks like one at its high-water mark."""
    cfg = load_config(None, [f'model.path="{tmp_path}"', "wire.send_timeout_s=0.2"])
    client = LearnerClient(cfg.wire, "tcp://127.0.0.1:1", "r0", asyncio.Event())
    client.ctx = zmq.asyncio.Context()
    client.sock = client.ctx.socket(zmq.DEALER)
    client.sock.setsockopt(zmq.LINGER, 0)
    port = client.sock.bind_to_random_port("tcp://127.0.0.1")  # bound, nobody connects
    assert port
    hb = Heartbeat(server_id="r0", policy_version=0, inflight=0)
    try:
        with pytest.raises(LearnerStuck, match=r"waited 0.2s \(wire.send_timeout_s\)"):
            await asyncio.wait_for(client.send(hb), timeout=60)
        assert client.stop.is_set()
        with pytest.raises(LearnerStuck):  # at once from now on
            await asyncio.wait_for(client.send(hb), timeout=60)
    finally:
        client.sock.close(linger=0)
        client.ctx.term()


async def test_a_heartbeat_carries_engine_health_and_the_server_stops(tmp_path):
    srv = _server(tmp_path)
    srv.engine.errored = True
    srv.client.welcomed.set()
    sent = []

    async def send(msg, tensors=None):
        sent.append(msg)

    srv.client.send = send
    await asyncio.wait_for(srv.client.heartbeat_loop(srv._beat), timeout=60)
    err, hb = sent
    assert isinstance(err, Error) and err.code == "engine_dead"
    assert isinstance(hb, Heartbeat) and hb.engine_error == srv.engine_dead
    assert hb.engine_error.startswith("vLLM engine died") and not hb.accepting_orders
    assert srv.stop.is_set()


class _Hangs(FakeEngine):
    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.aborted: list[str] = []

    async def update_weight_version(self, version: str) -> None:
        if self.what == "version":
            await asyncio.Event().wait()
        await super().update_weight_version(version)

    async def reset_prefix_cache(self) -> bool:
        if self.what == "reset":
            await asyncio.Event().wait()
        return await super().reset_prefix_cache()

    async def generate(self, prompt, sp, request_id):
        await asyncio.Event().wait()
        yield None

    async def abort(self, rid: str) -> None:
        self.aborted.append(rid)


@pytest.mark.parametrize("what", ["version", "reset"])
async def test_version_and_reset_after_a_reload_are_bounded(tmp_path, what):
    """The weight lock is held meanwhile: an engine that never answers fails the update
    (the learner then sends a full sync), the engine resumes and the lock is free."""
    acks = []

    async def send(msg, tensors=None):
        acks.append(msg)

    rx = receiver(tmp_path, _Hangs(what), send, "wire.weight_phase_timeout_s=0.2")
    pub = WeightPublisher(torch.nn.Linear(4, 3), "full", shm_dir=str(tmp_path))
    pub.join("r0", socket.gethostname())
    try:
        await asyncio.wait_for(rx.on_manifest(_update(pub, 1), [], time.time()), timeout=60)
    finally:
        pub.close()
        rx.close()
    (ack,) = acks
    assert not ack.ok and ack.version == 0 and f"phase {what!r} took longer" in ack.error
    assert rx.engine.calls[-1] == "resume" and not rx.lock.locked()
    assert rx.wstate.base is None and rx.version == 0  # unknown now: a full sync next


async def test_a_generation_request_has_a_deadline(tmp_path):
    # (imports vLLM, as other unit tests do: in the suite that cost is paid once)
    srv = _server(tmp_path, "rollout.request_timeout_s=0.2")
    srv.attach(_Hangs("generate"), tokenizer=None)
    sp = types.SimpleNamespace(extra_args=None)  # vllm.SamplingParams as far as it matters
    with pytest.raises(TimeoutError, match=r"r0-1 ran past rollout.request_timeout_s = 0.2s"):
        await asyncio.wait_for(srv.generator.generate([1, 2], sp), timeout=60)
    assert srv.engine.aborted == ["r0-1"]


# --------------------------------------------------------------------------- hub, contexts


def test_term_context_is_bounded_with_a_socket_left_open():
    ctx = zmq.Context()
    left = ctx.socket(zmq.PUSH)  # never closed by its owner: term() blocks
    assert term_context(ctx, 0.2) is False
    left.close(linger=0)  # the term goes on in its thread and returns
    for _ in range(6000):
        if ctx.closed:
            break
        time.sleep(0.01)
    assert ctx.closed


def test_the_hubs_hand_off_to_a_stopped_socket_thread_is_bounded():
    from climbrl.learner.hub import HubError, LearnerHub

    hub = LearnerHub("127.0.0.1", 0, send_timeout_s=0.2)
    try:
        hub._stop.set()
        hub._thread.join(timeout=60)  # nobody drains the outbox now
        with pytest.raises(
            HubError,
            match=r"took no message for 0.2s \(wire.send_timeout_s; "
            r"thread dead\)",
        ):
            for _ in range(100_000):
                hub.send_frames("r0", [b"x" * 1024])
    finally:
        hub.close()

"""The wire authenticates every peer, loopback included, and bounds what a peer can send:
the run's secret (PLAIN) or key (CURVE) before any frame, one live process per server id,
the run id on every message, the env of a work order from the config, capped frames and a
bounded inbox."""

from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace

import pytest
import zmq

from climbrl.learner.hub import LearnerHub
from climbrl.wire import (
    HELLO_REFUSED,
    ROLLOUT_ACCEPTS,
    Codec,
    Control,
    Error,
    Heartbeat,
    Hello,
    LogLimiter,
    SamplingSpec,
    WeightAck,
    WireError,
    WorkOrder,
)
from climbrl.wirekeys import PLAIN_USER, RunKeys, secure_client

DECODE = Codec(ROLLOUT_ACCEPTS)


def _hello(sid: str, pid: int | None = None, run_id: str = "") -> list:
    return Codec.encode(
        Hello(
            server_id=sid,
            pid=pid or os.getpid(),
            hostname="h",
            policy_version=0,
            model="m",
            max_concurrency=1,
            run_id=run_id,
        )
    )


def _dealer(
    ctx: zmq.Context,
    hub: LearnerHub,
    sid: str,
    keys: RunKeys | None = None,
    secret: str | None = None,
) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, sid.encode())
    if keys is not None:
        secure_client(s, keys, hub.curve)
    elif secret is not None:
        s.plain_username = PLAIN_USER.encode()
        s.plain_password = secret.encode()
    s.connect(hub.endpoint)
    return s


def _received(sock: zmq.Socket, timeout_s: float) -> list:
    """Every message ``sock`` gets within ``timeout_s``, decoded."""
    out = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            out.append(DECODE.decode(sock.recv_multipart())[0])
    return out


def _wait(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def hub():
    h = LearnerHub("127.0.0.1", 0, heartbeat_s=0.2, run_id="run-A", dead_after_s=60.0)
    yield h
    h.close()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def test_loopback_peers_without_the_run_secret_get_nothing_in_or_out(hub, ctx):
    assert not hub.curve  # loopback: PLAIN with the run's secret, not an open socket
    real = _dealer(ctx, hub, "r0", hub.keys)
    real.send_multipart(_hello("r0"))
    item = hub.recv(5.0)
    assert item is not None and item[0] == "r0"
    # a local process without the secret (no mechanism, or a wrong secret) takes r0's id
    thieves = [
        _dealer(ctx, hub, "r0"),
        _dealer(ctx, hub, "r0", secret="guess"),
        _dealer(ctx, hub, "x", secret="0" * 64),
    ]
    for t in thieves:
        t.send_multipart(_hello("r0", pid=4242))
    hub.send(
        "r0",
        WorkOrder(
            order_id="o1",
            policy_version=0,
            env="e",
            task_index=0,
            group_size=1,
            sampling=SamplingSpec(),
        ),
    )
    got = _received(real, 1.5)
    assert any(isinstance(m, WorkOrder) for m in got)  # the real server keeps its id
    assert hub.recv(0.5) is None  # no fake Hello got through
    for t in thieves:
        assert _received(t, 0.2) == []  # neither orders nor pings reach them
    assert hub.alive_servers() == ["r0"] and hub.servers["r0"].pid == os.getpid()


def test_a_hello_is_welcomed_with_the_run_id_and_a_second_process_under_a_live_id_is_refused(
    hub, ctx
):
    a = _dealer(ctx, hub, "r0", hub.keys)
    a.send_multipart(_hello("r0", pid=1001))
    a.send_multipart(_hello("r0", pid=1001))  # repeated until welcomed: answered, not re-sent
    assert isinstance(hub.recv(5.0)[1], Hello)
    got = _received(a, 1.0)
    welcomes = [m for m in got if isinstance(m, Control) and m.command == "welcome"]
    assert welcomes and all(m.run_id == "run-A" for m in welcomes)
    pings = [m for m in got if isinstance(m, Control) and m.command == "ping"]
    assert pings and all(m.run_id == "run-A" for m in pings)  # the server drops any other
    assert hub.recv(0.3) is None  # the repeat was not delivered as a new server
    b = _dealer(ctx, hub, "r0", hub.keys)  # another process with the run's secret, same id
    b.send_multipart(_hello("r0", pid=2002))
    refusals = [m for m in _received(b, 1.5) if isinstance(m, Error)]
    assert refusals and refusals[0].code == HELLO_REFUSED and "alive" in refusals[0].message
    assert hub.refused_hellos >= 1 and hub.recv(0.3) is None
    assert hub.servers["r0"].pid == 1001


def test_every_message_must_carry_the_run_id_and_its_sender(hub, ctx):
    d = _dealer(ctx, hub, "r0", hub.keys)
    d.send_multipart(_hello("r0", run_id="run-B"))  # a Hello of another run
    assert hub.recv(0.5) is None
    d.send_multipart(_hello("r0"))  # a new server does not know the run id yet
    assert hub.recv(5.0) is not None
    before = hub.rejected
    d.send_multipart(Codec.encode(WeightAck(server_id="r0", version=3, ok=True, run_id="old")))
    d.send_multipart(Codec.encode(Error(origin="r0", code="x", message="y")))  # no run id
    d.send_multipart(Codec.encode(WeightAck(server_id="r9", version=3, ok=True, run_id="run-A")))
    d.send_multipart(
        Codec.encode(Heartbeat(server_id="r0", policy_version=7, inflight=0, run_id="run-A"))
    )
    assert _wait(lambda: hub.servers["r0"].version == 7)
    assert hub.rejected - before == 3 and hub.recv(0.3) is None
    assert hub.servers["r0"].version == 7  # only the run's own heartbeat counted


def test_a_frame_over_the_size_cap_is_dropped_and_the_hub_goes_on(ctx):
    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=0.2, max_message_mb=0.01, dead_after_s=60.0)
    try:
        d = _dealer(ctx, hub, "r0", hub.keys)
        d.send_multipart(_hello("r0"))
        assert hub.recv(5.0) is not None
        d.send_multipart([b"error", b"\x00" * 20_000])  # 20 kB > 10 kB: disconnected
        assert hub.recv(1.0) is None
        # the DEALER reconnects under its id; a normal message gets through again
        ok = Codec.encode(Error(origin="r0", code="after", message="small"))
        assert _wait(lambda: (d.send_multipart(ok), hub.recv(0.2))[1] is not None)
    finally:
        hub.close()


def test_the_inbox_is_bounded_and_holds_senders_back_without_losing_a_message(ctx):
    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=0.2, inbox_max=3, dead_after_s=60.0)
    try:
        d = _dealer(ctx, hub, "r0", hub.keys)
        d.send_multipart(_hello("r0"))
        for i in range(20):
            d.send_multipart(Codec.encode(Error(origin="r0", code=str(i), message="m")))
        assert _wait(lambda: hub.inbox.full() and hub.inbox_full >= 1)
        assert hub.inbox.qsize() == 3
        got = [hub.recv(5.0) for _ in range(21)]
        assert isinstance(got[0][1], Hello)
        assert [m[1].code for m in got[1:]] == [str(i) for i in range(20)]  # all, in order
    finally:
        hub.close()


def test_log_limiter_logs_a_flood_once_per_period_with_the_count(caplog):
    lim = LogLimiter(logging.getLogger("t"), every_s=3600)
    with caplog.at_level(logging.ERROR, "t"):
        logged = [lim(logging.ERROR, "peer", "bad frame %d", i) for i in range(1000)]
    assert logged.count(True) == 1 and len(caplog.records) == 1
    lim._last["peer"] = (time.monotonic() - 7200, lim._last["peer"][1])
    with caplog.at_level(logging.ERROR, "t"):
        lim(logging.ERROR, "peer", "bad frame")
    assert "999 more like it" in caplog.records[-1].getMessage()


def _cfg(extra_envs: list[str] | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        env=SimpleNamespace(name="copy_first", args={"n": 3}),
        rollout=SimpleNamespace(extra_envs=extra_envs or []),
    )


def _order(env: str, env_args: dict | None = None) -> WorkOrder:
    return WorkOrder(
        order_id="o",
        policy_version=0,
        env=env,
        env_args=env_args or {},
        task_index=0,
        group_size=1,
        sampling=SamplingSpec(),
    )


def test_a_work_order_picks_a_configured_env_and_never_names_code_or_args():
    from climbrl.rollout.group import env_args

    cfg = _cfg(["math"])
    assert env_args(cfg, _order("copy_first")) == {"n": 3}  # the config's args
    assert env_args(cfg, _order("copy_first", {"n": 3})) == {"n": 3}
    assert env_args(cfg, _order("math")) == {}
    with pytest.raises(ValueError, match="unknown env 'os:system'.*rollout.extra_envs"):
        env_args(cfg, _order("os:system"))
    with pytest.raises(ValueError, match="unknown env"):
        env_args(cfg, _order("/tmp/evil.py:Env"))
    with pytest.raises(ValueError, match="cannot change how an env is built"):
        env_args(cfg, _order("copy_first", {"n": 99}))


async def test_a_rollout_server_takes_only_its_learners_welcome_and_run():
    import asyncio

    from climbrl.rollout.client import LearnerClient

    srv = LearnerClient(SimpleNamespace(), "tcp://127.0.0.1:1", "r0", asyncio.Event())
    order = _order("copy_first")
    order.run_id = "run-A"
    assert srv.check_session(order) is None  # before the welcome: ignored
    assert srv.check_session(Error(origin="learner", code=HELLO_REFUSED, message="m")) is None
    assert srv.check_session(Control(command="welcome", run_id="run-A")) is None
    assert srv.welcomed.is_set() and srv.run_id == "run-A"
    assert srv.check_session(order) is order
    order.run_id = "run-B"
    with pytest.raises(WireError, match="of run 'run-B'"):
        srv.check_session(order)
    with pytest.raises(WireError, match="welcome of run 'run-B'"):
        srv.check_session(Control(command="welcome", run_id="run-B"))

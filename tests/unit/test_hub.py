"""The learner's hub: a real ROUTER on loopback; peers are raw DEALER sockets here."""

from __future__ import annotations

import os
import time

import zmq

from climbrl.learner.hub import LearnerHub
from climbrl.wire import ROLLOUT_ACCEPTS, Codec, Heartbeat, Hello, SamplingSpec, WorkOrder
from climbrl.wirekeys import secure_client


def _dealer(ctx: zmq.Context, hub: LearnerHub, sid: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, sid.encode())
    secure_client(s, hub.keys, hub.curve)  # the hub admits only peers with the run's secret
    s.connect(hub.endpoint)
    return s


def _hello(sid: str) -> list:
    return Codec.encode(
        Hello(
            server_id=sid,
            pid=os.getpid(),
            hostname="h",
            policy_version=0,
            model="m",
            max_concurrency=1,
        )
    )


def _next(hub: LearnerHub, timeout: float = 5.0):
    item = hub.recv(timeout)
    assert item is not None, "hub delivered nothing"
    return item


def test_malformed_frames_are_rejected_and_hub_keeps_running():
    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=0.2)
    ctx = zmq.Context()
    try:
        d = _dealer(ctx, hub, "r0")
        d.send_multipart(_hello("r0"))
        sid, msg, _, _ = _next(hub)
        assert sid == "r0" and isinstance(msg, Hello)
        d.send_multipart([b"\xde\xad"])  # one frame
        d.send_multipart([b"traj", b"\x00garbage"])  # bad body
        d.send_multipart([b"work", b"x"])  # a kind the learner never accepts
        deadline = time.monotonic() + 5
        while hub.rejected < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.rejected == 3
        d.send_multipart(Codec.encode(Heartbeat(server_id="r0", policy_version=0, inflight=0)))
        # the hub still routes: an order reaches the dealer, and pings flow
        hub.send(
            "r0",
            WorkOrder(
                order_id="o",
                policy_version=0,
                env="e",
                task_index=0,
                group_size=2,
                sampling=SamplingSpec(),
            ),
        )
        kinds = set()
        while b"work" not in kinds:
            assert d.poll(5000)
            frames = d.recv_multipart()
            kinds.add(frames[0])
            Codec(ROLLOUT_ACCEPTS).decode(frames)
        d.close()
    finally:
        hub.close()
        ctx.term()


def test_silent_server_is_declared_dead():
    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=0.1)
    ctx = zmq.Context()
    try:
        d = _dealer(ctx, hub, "r1")
        d.send_multipart(_hello("r1"))
        _next(hub)
        assert hub.check_dead(0.5) == []
        time.sleep(0.7)
        assert hub.check_dead(0.5) == ["r1"]
        assert hub.alive_servers() == []
        d.close()
    finally:
        hub.close()
        ctx.term()


def test_heartbeats_carry_the_worst_event_loop_lag_until_taken():
    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=0.2)
    ctx = zmq.Context()
    try:
        d = _dealer(ctx, hub, "r0")
        d.send_multipart(_hello("r0"))
        _next(hub)
        # in order on one socket; the last one's version tells when all have been read
        for version, lag in enumerate((0.3, 0.7, 0.1), start=1):
            d.send_multipart(
                Codec.encode(
                    Heartbeat(
                        server_id="r0", policy_version=version, inflight=0, loop_lag_max_s=lag
                    )
                )
            )
        deadline = time.monotonic() + 5
        while hub.servers["r0"].version != 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hub.take_loop_lag() == {"r0": 0.7}  # the 0.1 after it does not lower it
        assert hub.take_loop_lag() == {"r0": 0.0}
        d.close()
    finally:
        hub.close()
        ctx.term()


async def test_rollout_server_lag_loop_sees_a_blocked_event_loop():
    import asyncio
    from types import SimpleNamespace

    from climbrl.rollout.loop_lag import LoopLagMonitor

    s = SimpleNamespace(_stop=asyncio.Event(), loop_lag=LoopLagMonitor(period=0.01))
    task = asyncio.create_task(s.loop_lag.run(s._stop))
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # synchronous work on the loop, as a blocking env would do
    await asyncio.sleep(0.05)
    s._stop.set()
    await asyncio.wait_for(task, 1)
    # the sampler's 10 ms sleep could not wake before the 0.3 s block ended
    assert s.loop_lag.take()[0] >= 0.29


def test_heartbeats_carry_what_the_loop_was_running_at_its_worst_lag():
    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=0.2)
    ctx = zmq.Context()
    try:
        d = _dealer(ctx, hub, "r0")
        d.send_multipart(_hello("r0"))
        _next(hub)
        for version, (lag, where) in enumerate(
            ((0.3, "a (x.py:1)"), (0.7, "b (x.py:2)"), (0.1, "c (x.py:3)")), start=1
        ):
            d.send_multipart(
                Codec.encode(
                    Heartbeat(
                        server_id="r0",
                        policy_version=version,
                        inflight=0,
                        loop_lag_max_s=lag,
                        loop_lag_where=where,
                    )
                )
            )
        deadline = time.monotonic() + 5
        while hub.servers["r0"].version != 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hub.take_loop_lag_where() == {"r0": (0.7, "b (x.py:2)")}
        assert hub.take_loop_lag_where() == {"r0": (0.0, "")}
        d.close()
    finally:
        hub.close()
        ctx.term()

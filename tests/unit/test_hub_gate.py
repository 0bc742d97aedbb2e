"""The hub's admission and peer bookkeeping, driven with encoded frames: no sockets."""

from __future__ import annotations

from climbrl.learner.gate import Gate
from climbrl.learner.peers import PeerTable
from climbrl.wire import HELLO_REFUSED, Codec, Control, Error, Heartbeat, Hello, WeightAck


def _hello(sid: str, pid: int = 1, run_id: str = "") -> list:
    msg = Hello(
        server_id=sid,
        pid=pid,
        hostname="h",
        policy_version=0,
        model="m",
        max_concurrency=1,
        run_id=run_id,
    )
    return Codec.encode(msg)


def _beat(sid: str, run_id: str = "run", **kw: object) -> list:
    return Codec.encode(Heartbeat(server_id=sid, policy_version=0, inflight=0, run_id=run_id, **kw))


def _gate() -> Gate:
    return Gate(PeerTable(dead_after_s=10.0), "run")


def test_a_hello_is_welcomed_once_delivered_and_repeats_are_only_answered() -> None:
    gate = _gate()
    first = gate.admit("r0", _hello("r0"), now=0.0)
    assert isinstance(first.reply, Control) and first.reply.command == "welcome"
    assert first.reply.run_id == "run" and isinstance(first.deliver[0], Hello)
    again = gate.admit("r0", _hello("r0"), now=1.0)
    assert isinstance(again.reply, Control) and again.deliver is None
    assert gate.peers.alive() == ["r0"] and gate.peers.servers["r0"].last_seen == 1.0


def test_a_second_process_under_a_live_id_is_refused_until_the_first_is_silent() -> None:
    gate = _gate()
    gate.admit("r0", _hello("r0", pid=1), now=0.0)
    refused = gate.admit("r0", _hello("r0", pid=2), now=5.0)
    assert isinstance(refused.reply, Error) and refused.reply.code == HELLO_REFUSED
    assert refused.deliver is None and gate.refused_hellos == 1
    assert gate.peers.servers["r0"].pid == 1
    taken = gate.admit("r0", _hello("r0", pid=2), now=20.0)  # silent past dead_after_s
    assert taken.deliver is not None and gate.peers.servers["r0"].pid == 2


def test_foreign_unknown_and_malformed_messages_are_rejected() -> None:
    gate = _gate()
    assert gate.admit("r0", [b"\xde\xad"], now=0.0).deliver is None  # malformed
    assert gate.admit("r0", _beat("r0"), now=0.0).deliver is None  # never said Hello
    gate.admit("r0", _hello("r0"), now=0.0)
    assert gate.admit("r0", _beat("r0", run_id="other"), now=0.0).deliver is None
    assert gate.admit("r0", _beat("r1"), now=0.0).deliver is None  # names another server
    assert gate.admit("r0", _hello("r0", run_id="other"), now=0.0).deliver is None
    assert gate.rejected == 5 and list(gate.peers.servers) == ["r0"]


def test_heartbeats_update_the_table_and_reach_the_learner_only_for_a_dead_engine() -> None:
    gate = _gate()
    gate.admit("r0", _hello("r0"), now=0.0)
    ok = gate.admit("r0", _beat("r0", accepting_orders=False, loop_lag_max_s=0.5), now=1.0)
    assert ok.deliver is None and ok.reply is None
    assert gate.peers.taking_orders() == [] and gate.peers.take_loop_lag_where() == {
        "r0": (0.5, "")
    }
    assert gate.admit("r0", _beat("r0", engine_error="boom"), now=2.0).deliver is not None
    ack = Codec.encode(WeightAck(server_id="r0", version=4, ok=True, run_id="run"))
    assert gate.admit("r0", ack, now=3.0).deliver is not None
    assert gate.peers.servers["r0"].version == 4


def test_silent_servers_are_marked_dead_once() -> None:
    peers = PeerTable(dead_after_s=10.0)
    gate = Gate(peers, "run")
    gate.admit("r0", _hello("r0"), now=-100.0)
    assert peers.check_dead(10.0) == ["r0"] and peers.check_dead(10.0) == []
    assert peers.alive() == []

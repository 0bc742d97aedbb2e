"""Crash consistency without engines: the learner's order bookkeeping when rollout servers die,
restart or belong to another run; metrics truncation on resume; the hub taking back a
restarted server's id; the launcher's restart budget."""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import pytest
import zmq

from climbrl.config import load_config
from climbrl.learner.data import DataCursor
from climbrl.learner.hub import LearnerHub
from climbrl.learner.learner import Learner, LearnerError, _truncate_metrics
from climbrl.wire import Codec, Error, Hello, Sample, Trajectory, WeightAck, WorkOrder


class FakeHub:
    def __init__(self, alive: list[str]):
        self.alive = list(alive)
        self.sent: list[tuple[str, object]] = []
        self.inbox: list[tuple] = []
        self.dead: list[str] = []

    def alive_servers(self) -> list[str]:
        return list(self.alive)

    order_servers = alive_servers

    def send(self, sid: str, msg: object, tensors: object = None) -> None:
        self.sent.append((sid, msg))

    def recv(self, timeout: float):
        return self.inbox.pop(0) if self.inbox else None

    def check_dead(self, dead_after_s: float) -> list[str]:
        died, self.dead = self.dead, []
        for s in died:
            self.alive.remove(s)
        return died


class FakeWeights:
    last = {"full": 100}

    def __init__(self):
        self.forgotten: list[str] = []

    def forget(self, sid: str, shm_unreadable: bool = False) -> None:
        self.forgotten.append(sid)

    def join(self, sid: str, hostname: str = "") -> None:  # a (re)joined engine: full sync next
        self.forgotten.append(sid)

    def acked(self, sid: str, version: int) -> None:
        pass

    def dropped(self, sid: str) -> None:  # a dead server's frames slots are free
        self.forgotten.append(f"dropped {sid}")

    def messages(self, version: int, servers: list[str], state: object = None):
        yield servers, SimpleNamespace(kind="full", version=version), []


def _learner(alive: list[str], on_child_death: str = "continue") -> Learner:
    """The real bookkeeping (order book, batcher, weight acks), without model or sockets."""
    cfg = load_config(
        None,
        [
            "model.path=m",
            "learner.max_staleness=0",
            "learner.batch_groups=2",
            f"run.on_child_death={on_child_death}",
            "wire.connect_timeout_s=5",
        ],
    )
    env = SimpleNamespace(reward_range=(0.0, 1.0), num_tasks=lambda split: 100)
    return Learner(
        cfg,
        hub=FakeHub(alive),
        env=env,
        weights=FakeWeights(),
        cursor=DataCursor(100),
        step=3,
        version=3,
        run_id="run-a",
    )


def _hello(sid: str, version: int = 0) -> tuple:
    return (
        sid,
        Hello(
            server_id=sid, pid=1, hostname="h", policy_version=version, model="m", max_concurrency=1
        ),
        [],
        time.monotonic(),
    )


def _traj(order_id: str, run_id: str) -> tuple:
    s = Sample(
        prompt_ids=[1],
        completion_ids=[2],
        completion_mask=[1],
        logprobs=[-1.0],
        versions=[3],
        reward=1.0,
        finish_reason="length",
    )
    return (
        "r0",
        Trajectory(
            run_id=run_id,
            order_id=order_id,
            server_id="r0",
            policy_version=3,
            samples=[s, s],
            gen_seconds=0.0,
            num_generated_tokens=2,
        ),
        [],
        time.monotonic(),
    )


def test_training_order_ids_are_the_cursor_sequence():
    L = _learner(["r0"])
    L.dispatch()
    assert sorted(L.book.orders) == ["train-0", "train-1"]
    assert [m.order_id for _, m in L.hub.sent] == ["train-0", "train-1"]
    assert all(m.sampling.seed == L.cfg.run.seed for _, m in L.hub.sent)


def test_dead_server_orders_go_to_the_survivor_with_the_same_ids():
    L = _learner(["r0", "r1"])
    L.dispatch()
    on = {oid: o.server for oid, o in L.book.orders.items()}
    assert sorted(on.values()) == ["r0", "r1"]
    L.hub.sent.clear()
    L.hub.dead = ["r1"]
    L._pump(0)
    assert L.counters["servers_dead"] == 1
    assert {oid: o.server for oid, o in L.book.orders.items()} == dict.fromkeys(on, "r0")
    moved = [oid for oid, s in on.items() if s == "r1"]
    assert [(s, m.order_id) for s, m in L.hub.sent] == [("r0", moved[0])]


def test_a_hello_under_a_known_id_gets_the_weights_and_its_orders_again():
    L = _learner(["r0"])
    L.dispatch()
    L.hub.sent.clear()
    L.hub.inbox.append(_hello("r0", version=0))  # restarted before its death was noticed
    L._pump(0)
    kinds = [
        type(m).__name__ if not isinstance(m, SimpleNamespace) else "weights" for _, m in L.hub.sent
    ]
    assert kinds == ["weights", "WorkOrder", "WorkOrder"]  # weights first, then the orders
    assert L.hub.sent[0][1].version == 3 and L.publishing.weights.forgotten == ["r0"]
    assert sorted(m.order_id for _, m in L.hub.sent[1:]) == ["train-0", "train-1"]


def test_restart_mode_orders_wait_for_a_server_then_go_out():
    L = _learner(["r0"], "restart")
    L.dispatch()
    L.hub.sent.clear()
    L.hub.dead = ["r0"]
    L._pump(0)
    assert all(o.server is None for o in L.book.orders.values()) and len(L.book.orders) == 2
    assert L.hub.sent == []
    L.hub.alive = ["r0"]
    L.hub.inbox.append(_hello("r0"))
    L._pump(0)
    assert all(o.server == "r0" for o in L.book.orders.values())
    assert sorted(m.order_id for _, m in L.hub.sent if isinstance(m, WorkOrder)) == [
        "train-0",
        "train-1",
    ]


def test_restart_mode_gives_up_after_connect_timeout(monkeypatch):
    L = _learner(["r0"], "restart")
    L.dispatch()
    L.hub.dead = ["r0"]
    L._pump(0)
    t = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: t + 6)  # past wire.connect_timeout_s
    with pytest.raises(LearnerError, match="no rollout server has been alive"):
        L._pump(0)


def test_continue_mode_fails_fast_without_servers():
    L = _learner(["r0"])
    L.dispatch()
    L.hub.dead = ["r0"]
    with pytest.raises(LearnerError, match="no rollout server is alive"):
        L._pump(0)


def test_trajectory_of_another_learner_run_is_dropped():
    L = _learner(["r0"])
    L.dispatch()
    L.hub.inbox.append(_traj("train-0", "run-old"))  # same order id, previous learner
    L._pump(0)
    assert L.batcher.ready == [] and "train-0" in L.book.orders
    L.hub.inbox.append(_traj("train-0", "run-a"))
    L._pump(0)
    assert [t.order_id for t in L.batcher.ready] == ["train-0"] and L.batcher.seq_of == {
        "train-0": 0
    }


def test_error_from_a_server_that_lost_the_order_is_ignored():
    L = _learner(["r0", "r1"])
    L.dispatch()
    oid, o = next(iter(L.book.orders.items()))
    other = "r1" if o.server == "r0" else "r0"
    L.hub.inbox.append(
        (
            other,
            Error(origin=other, code="order_failed", message="x", ref_id=oid),
            [],
            time.monotonic(),
        )
    )
    L._pump(0)
    assert oid in L.book.orders and o.seq in L.cursor.outstanding
    L.hub.inbox.append(
        (
            o.server,
            Error(origin=o.server, code="order_failed", message="x", ref_id=oid),
            [],
            time.monotonic(),
        )
    )
    L._pump(0)
    assert oid not in L.book.orders


def test_batch_is_trained_in_sequence_order():
    L = _learner(["r0"])
    L.dispatch = lambda: None
    L.counters.update(stale_dropped=0, stale_corrected=0)
    for seq in (1, 0):
        L.batcher.ready.append(_traj(f"train-{seq}", "run-a")[1])
        L.batcher.seq_of[f"train-{seq}"] = seq
    assert [t.order_id for t in L.collect(2)] == ["train-0", "train-1"]


def test_truncate_metrics_keeps_the_checkpointed_lineage(tmp_path):
    recs = [{"step": 0, "eval/test_accuracy": 0.1}] + [
        {"step": i, "reward": 0.5, "trained_seqs": [i]} for i in range(1, 6)
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "rew'
    )  # cut by the kill
    assert _truncate_metrics(tmp_path, 3) == [4, 5]
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == recs[:4]
    gone = [json.loads(x) for x in (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()]
    assert gone == recs[4:]
    assert _truncate_metrics(tmp_path, -1) == [1, 2, 3]  # resumed with no checkpoint at all
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_hub_hands_a_server_id_over_to_its_restarted_process():
    """The first process never disconnects (frozen, not yet noticed): the restarted one takes
    its id over, and its Hello, repeated, is accepted once the first counts as dead."""
    from climbrl.wirekeys import secure_client

    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=0.1, dead_after_s=0.5)
    ctx = zmq.Context()
    try:
        socks = []
        for pid in (1001, 1002):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.IDENTITY, b"r0")
            secure_client(d, hub.keys, hub.curve)
            d.connect(hub.endpoint)
            hello = _hello("r0")[1]
            hello.pid = pid
            item = None
            deadline = time.monotonic() + 10
            while item is None and time.monotonic() < deadline:
                d.send_multipart(Codec.encode(hello))  # a server repeats it until welcomed
                item = hub.recv(0.2)
            assert item is not None and isinstance(item[1], Hello) and item[1].pid == pid
            socks.append(d)
        from climbrl.wire import Control

        hub.send("r0", Control(command="ping"))
        assert socks[1].poll(5000), "the restarted server gets nothing"
        for d in socks:
            d.close()
    finally:
        hub.close()
        ctx.term()


def test_launcher_restarts_a_dead_rollout_server_up_to_the_budget(tmp_path, capsys):
    from climbrl.launcher import Child, _monitor

    cfg = load_config(
        None,
        [
            "model.path=m",
            f"run.output_dir={tmp_path}",
            "run.on_child_death=restart",
            "run.max_restarts=2",
        ],
    )
    learner = Child(
        "learner", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "learner.log"
    )
    marker = tmp_path / "starts"
    rollout = Child(
        "rollout-0",
        [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"],
        tmp_path / "rollout.log",
    )
    children = [learner, rollout]
    try:
        rc = _monitor(cfg, children, learner, {"sig": None}, live=False)
    finally:
        for c in children:
            c.stop(grace_s=1)
    assert rc == 1
    assert marker.read_text() == "xxx"  # started once, restarted twice, then the run stops
    err = capsys.readouterr().err
    assert err.count("restarted rollout-0") == 2 and "run.max_restarts = 2" in err
    assert learner.poll() is not None and os.path.exists(tmp_path / "rollout.log")


# --------------------------------------------------------------------------- checkpoints


class _Saver:
    def __init__(self, tag: str):
        self.tag = tag

    def save_pretrained(self, path: str, **kw: object) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "w") as f:
            f.write(self.tag)


def _save(out, step: int, tag: str):
    import torch

    from climbrl.learner.checkpoint import save_checkpoint

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return save_checkpoint(out, step, _Saver(tag), _Saver(tag), opt, {"step": step})


@pytest.mark.parametrize("fail_at", [1, 2, 3])  # old folder aside, new into place, pointer
def test_checkpoint_killed_mid_save_leaves_a_loadable_one(tmp_path, monkeypatch, fail_at):
    from climbrl.learner import checkpoint as ck

    _save(tmp_path, 3, "a")
    _save(tmp_path, 6, "b")
    real, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise KeyboardInterrupt("killed")  # the process stops here
        real(src, dst)

    monkeypatch.setattr(ck.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 6, "c")  # re-saving a step that exists (the final save)
    monkeypatch.undo()
    got = ck.latest_checkpoint(tmp_path)
    assert got is not None and (got / "learner_state.json").is_file()
    assert got.name.startswith(("step_6", ".old_step_6"))  # never back to step 3
    assert (got / "model.safetensors").read_text() == ("b" if fail_at < 3 else "c")
    _save(tmp_path, 9, "d")  # the next save clears what the killed one left
    assert (
        sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")) == []
    )
    assert ck.latest_checkpoint(tmp_path).name == "step_9"


def test_latest_pointer_to_an_incomplete_folder_falls_back(tmp_path):
    from climbrl.learner.checkpoint import latest_checkpoint

    _save(tmp_path, 3, "a")
    _save(tmp_path, 6, "b")
    (tmp_path / "checkpoints" / "step_6" / "learner_state.json").unlink()
    assert latest_checkpoint(tmp_path).name == "step_3"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_every_published_version_waits_for_its_own_ack():
    """publish_every=1: version 4 goes out before version 3's ack arrives. Each ack times its
    own version, and none is lost from the sync timeout's watch."""
    L = _learner(["r0"])
    L.publish_weights()  # version 3
    t3 = L.publishing.pending["r0"][3]
    L.version = 4
    L.publish_weights()
    assert sorted(L.publishing.pending["r0"]) == [3, 4]
    L.publishing.on_ack("r0", WeightAck(server_id="r0", version=3, ok=True), t3 + 0.5)
    assert L.publishing.sync_times == [pytest.approx(0.5)] and sorted(
        L.publishing.pending["r0"]
    ) == [4]
    t4 = L.publishing.pending["r0"][4]
    L.publishing.on_ack("r0", WeightAck(server_id="r0", version=4, ok=True), t4 + 0.25)
    assert L.publishing.sync_times[-1] == pytest.approx(0.25) and not L.publishing.pending["r0"]


def test_a_failed_update_answers_the_oldest_and_a_late_one_times_out():
    L = _learner(["r0"])
    L.publish_weights()
    L.version = 4
    L.publish_weights()
    L.publishing.on_ack(
        "r0", WeightAck(server_id="r0", version=2, ok=False, error="boom"), time.monotonic()
    )
    assert sorted(L.publishing.pending["r0"]) == [4] and L.counters["weight_syncs_failed"] == 1
    assert "r0" in L.publishing.weights.forgotten  # the next update is a full sync
    L.publishing.pending["r0"][4] -= L.cfg.wire.weight_sync_timeout_s + 1  # published long ago
    L._pump(0)
    assert "r0" not in L.publishing.pending and L.counters["weight_syncs_failed"] == 2


def _error(sid: str, code: str, message: str, ref_id: str = "") -> tuple:
    return (sid, Error(origin=sid, code=code, message=message, ref_id=ref_id), [], time.monotonic())


DEAD = "vLLM engine died: RuntimeError: CPU Generator does not use offset"


def test_engine_death_moves_every_order_to_the_survivor_and_loses_none():
    L = _learner(["r0", "r1"])
    L.dispatch()
    on = {oid: o.server for oid, o in L.book.orders.items()}
    L.hub.sent.clear()
    failed = next(oid for oid, s in on.items() if s == "r0")
    L.hub.inbox.append(_error("r0", "engine_dead", DEAD, failed))
    L._pump(0)
    assert {o.server for o in L.book.orders.values()} == {"r1"}
    assert sorted(L.book.orders) == sorted(on)  # the same sequences: nothing skipped or marked done
    assert L.cursor.state()["pending"] == sorted(o.seq for o in L.book.orders.values())
    assert L.counters["engines_dead"] == 1 and L.counters["order_failures"] == 0
    L.hub.sent.clear()
    for _ in range(3):  # a later order never goes to r0
        L.book.send(*L.cursor.take(), "train", False, L.version)
    assert {s for s, _ in L.hub.sent} == {"r1"}


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_engine_death_of_the_last_server_ends_the_run_quoting_the_cause(policy):
    L = _learner(["r0"], on_child_death=policy)
    L.dispatch()
    L.hub.inbox.append(_error("r0", "engine_dead", DEAD, "train-0"))
    with pytest.raises(LearnerError, match="CPU Generator does not use offset"):
        L._pump(0)


def test_engine_death_with_restart_waits_for_the_new_process():
    L = _learner(["r0"], on_child_death="restart")
    L.dispatch()
    L.hub.inbox.append(_error("r0", "engine_dead", DEAD, "train-0"))
    L._pump(0)
    assert {o.server for o in L.book.orders.values()} == {None}  # waiting, not failing
    L.hub.sent.clear()
    L.hub.inbox.append(_hello("r0"))
    L._pump(0)
    assert sorted(m.order_id for _, m in L.hub.sent if isinstance(m, WorkOrder)) == [
        "train-0",
        "train-1",
    ]
    assert "r0" not in L.book.benched


def test_a_server_whose_orders_all_fail_stops_the_run_instead_of_spinning():
    L = _learner(["r0"])
    L.cfg.wire.max_order_failures = 4
    with pytest.raises(LearnerError, match="last 4 work orders failed.*boom"):
        for _ in range(100):  # the learner's loop: refill, then handle one message
            L.dispatch()
            sent = [m for _, m in L.hub.sent if isinstance(m, WorkOrder)]
            L.hub.sent.clear()
            for m in sent:
                L.hub.inbox.append(_error("r0", "order_failed", "ValueError: boom", m.order_id))
            L._pump(0)
    assert L.counters["order_failures"] == 4


def test_a_trajectory_resets_the_failure_count():
    L = _learner(["r0"])
    L.cfg.wire.max_order_failures = 2
    L.dispatch()
    L.hub.inbox += [_error("r0", "order_failed", "x", "train-0"), _traj("train-1", "run-a")]
    L._pump(0)
    L._pump(0)
    assert L.book.failures_in_a_row["r0"] == 0 and not L.book.benched

"""The order book and the batcher on their own (learner/orders.py, learner/batcher.py): no
model, no socket; a list stands in for the servers."""

from __future__ import annotations

import pytest

from climbrl.config import load_config
from climbrl.learner.batcher import Batcher
from climbrl.learner.data import DataCursor
from climbrl.learner.orders import LearnerError, OrderBook
from climbrl.wire import Sample, Trajectory, WorkOrder


class Servers:
    def __init__(self, alive: list[str]):
        self.alive, self.sent = list(alive), []

    def send(self, sid: str, msg: object, frames: object = None) -> None:
        self.sent.append((sid, msg))

    def order_servers(self) -> list[str]:
        return list(self.alive)

    alive_servers = order_servers


def _book(alive: list[str], *over: str) -> tuple[OrderBook, Servers]:
    cfg = load_config(None, ["model.path=m", "learner.group_size=4", *over])
    s = Servers(alive)
    return OrderBook(cfg, s, {}), s


def test_orders_go_to_the_least_loaded_server_with_the_run_settings():
    book, s = _book(["r0", "r1"], "run.seed=9")
    for seq in range(4):
        book.send(seq, 10 + seq, "train", False, version=2)
    assert [sid for sid, _ in s.sent] == ["r0", "r1", "r0", "r1"]
    o = s.sent[0][1]
    assert isinstance(o, WorkOrder) and o.order_id == "train-0" and o.task_index == 10
    assert o.policy_version == 2 and o.group_size == 4 and o.sampling.seed == 9
    ev = book.orders[book.send(0, 0, "test", True, version=2)]
    assert ev.eval and s.sent[-1][1].group_size == 1 and s.sent[-1][1].sampling.temperature == 0


def test_reassign_moves_orders_and_an_eval_order_keeps_its_deadline():
    book, s = _book(["r0", "r1"])
    tid = book.send(0, 0, "train", False, 0)
    eid = book.send(1, 1, "test", True, 0)
    book.orders[eid].sent -= 50.0
    first = book.orders[eid].sent
    s.alive = ["r1"]
    book.reassign(lambda o: True, version=1)
    assert tid in book.orders  # a training order keeps its id (its seed)
    moved = [o for o in book.orders.values() if o.eval]
    assert len(moved) == 1 and moved[0].sent == first and moved[0].server == "r1"


def test_a_server_whose_orders_keep_failing_is_benched():
    book, s = _book(["r0", "r1"], "wire.max_order_failures=2")
    book.order_failed("r0", "boom")
    assert "r0" not in book.benched
    book.order_failed("r0", "boom again")
    assert "boom again" in book.benched["r0"]
    assert book.pick_server() == "r1"


def test_no_usable_server_raises_or_waits_for_a_restart():
    book, _ = _book([])
    with pytest.raises(LearnerError, match="no rollout server is alive"):
        book.pick_server()
    book, _ = _book([], "run.on_child_death=restart")
    assert book.pick_server() is None  # the order waits for the restarted server


def test_the_failure_rate_ends_the_run_past_its_limit():
    book, _ = _book(["r0"], "wire.order_failure_window=4", "wire.max_order_failure_rate=0.5")
    for failed in (True, False, True, False, True, False):
        book.outcome(failed)  # half of the last 4: at the limit, not past it
    book.last_error = "r0: order_failed: X"
    book.outcome(True)  # the last 4: F T F T
    with pytest.raises(LearnerError, match="3 of the last 4 .* the last error: r0"):
        book.outcome(True)


def test_an_eval_order_past_its_deadline_scores_zero_and_progress_is_bounded():
    book, _ = _book(["r0"], "wire.order_timeout_s=10", "wire.progress_timeout_s=100")
    eid = book.send(0, 3, "test", True, 0)
    failures: dict[int, tuple[str, str]] = {}
    t0 = book.orders[eid].sent
    book.check(t0 + 1, 0, failures)  # the progress clock starts
    book.check(t0 + 11, 0, failures)
    assert eid not in book.orders and failures[3][0] == "timeout"
    book.send(1, 4, "train", False, 0)
    book.check(t0 + 200, 0, failures)  # out again (past its deadline); the clock starts
    with pytest.raises(LearnerError, match="no work order came back .* for 100s"):
        book.check(t0 + 400, 0, failures)


def _traj(seq: int, version: int, rewards: list[float]) -> Trajectory:
    ss = [
        Sample(
            prompt_ids=[1],
            completion_ids=[2],
            completion_mask=[1],
            logprobs=[-1.0],
            versions=[version],
            reward=r,
            finish_reason="stop",
        )
        for r in rewards
    ]
    return Trajectory(
        order_id=f"o{seq}",
        server_id="r0",
        policy_version=version,
        samples=ss,
        gen_seconds=0.0,
        num_generated_tokens=1,
    )


def test_batcher_orders_by_sequence_and_marks_trained_groups_done():
    cfg = load_config(None, ["model.path=m", "learner.max_staleness=1"])
    cursor, counters = DataCursor(10), dict(stale_dropped=0, stale_corrected=0, filtered_groups=0)
    b = Batcher(cfg.learner, 1.0, cursor, counters)
    seqs = [cursor.take()[0] for _ in range(3)]
    assert b.take(2, version=1) is None
    for seq in reversed(seqs):
        b.add(_traj(seq, 1, [0.0, 1.0]), seq)
    batch = b.take(2, version=1)
    assert [t.order_id for t in batch] == ["o1", "o2"]  # arrival order o2, o1, o0: by sequence
    assert b.trained(batch) == [1, 2] and cursor.outstanding == {0}
    b.add(_traj(7, 0, [0.0, 1.0]), cursor.take()[0])
    assert b.take(2, version=3) is None and counters["stale_dropped"] == 2  # lag 3 > 1: dropped

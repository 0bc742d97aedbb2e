"""The learner's staleness bound: groups too old are dropped (and re-queued) or corrected."""

from __future__ import annotations

from types import SimpleNamespace

from climbrl.config import load_config
from climbrl.learner.data import DataCursor
from climbrl.learner.learner import Learner
from climbrl.wire import Sample, Trajectory


def _traj(seq: int, version: int) -> Trajectory:
    s = Sample(
        prompt_ids=[1, 2],
        completion_ids=[3],
        completion_mask=[1],
        logprobs=[-1.0],
        versions=[version],
        reward=float(seq % 2),
        finish_reason="length",
    )
    return Trajectory(
        order_id=f"o{seq}",
        server_id="r0",
        policy_version=version,
        samples=[s, s],
        gen_seconds=0.0,
        num_generated_tokens=2,
    )


def _learner(policy: str) -> Learner:
    """The real collect(), without model or sockets."""
    cfg = load_config(
        None,
        ["model.path=m", "learner.max_staleness=1", f"learner.offpolicy.stale_policy={policy}"],
    )
    env = SimpleNamespace(reward_range=(0.0, 1.0), num_tasks=lambda split: 100)
    L = Learner(cfg, hub=None, env=env, cursor=DataCursor(100), version=5)
    for _ in range(4):
        L.cursor.take()
    for i, tr in enumerate([_traj(0, 5), _traj(1, 3), _traj(2, 4), _traj(3, 2)]):
        L.batcher.add(tr, i)
    L.dispatch = lambda: None
    return L


def test_drop_counts_and_requeues():
    L = _learner("drop")
    L._pump = lambda timeout: None
    batch = L.collect(2)
    assert [t.order_id for t in batch] == ["o0", "o2"]  # lags 0 and 1 kept; 2 and 3 dropped
    assert L.counters["stale_dropped"] == 2
    assert [L.cursor.take()[0] for _ in range(2)] == [1, 3]  # dropped prompts come back first


def test_correct_keeps_and_counts():
    L = _learner("correct")
    batch = L.collect(4)
    assert len(batch) == 4 and L.counters["stale_corrected"] == 2
    assert L.counters["stale_dropped"] == 0


def test_collect_waits_for_enough_fresh_groups():
    L = _learner("drop")
    calls = []

    def pump(timeout):
        calls.append(timeout)
        if len(calls) == 2:
            L.batcher.ready.append(_traj(4, 5))
            L.batcher.seq_of["o4"] = 4

    L._pump = pump
    batch = L.collect(3)
    assert len(batch) == 3 and len(calls) == 2


def test_correct_counts_a_group_once_while_collect_waits_for_more():
    L = _learner("correct")
    arrivals = [_traj(4, 5)]

    def pump(timeout: float) -> None:  # collect() re-scans `ready` after every receive
        if arrivals:
            L.batcher.ready.append(arrivals.pop())
            L.batcher.seq_of["o4"] = 4

    L._pump = pump
    batch = L.collect(5)
    assert len(batch) == 5 and L.counters["stale_corrected"] == 2

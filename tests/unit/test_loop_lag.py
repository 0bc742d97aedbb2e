"""climbrl.rollout.loop_lag: a rollout server's worst event-loop lag comes with what the loop was
running, and the learner's warning names it past rollout.loop_lag_warn_s."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

from climbrl.rollout.loop_lag import LoopLagMonitor, describe


def slow_score(monitor: LoopLagMonitor, deadline_s: float = 60.0) -> None:
    """Synchronous work in an async method: blocks the loop until the watchdog has seen it."""
    t = time.monotonic()
    while not monitor._stall[1] and time.monotonic() - t < deadline_s:
        time.sleep(0.01)


class BlockingEnv:
    def __init__(self, monitor: LoopLagMonitor):
        self.monitor = monitor

    async def respond(self) -> float:
        slow_score(self.monitor)
        return 1.0


async def test_the_worst_lag_names_the_blocking_code() -> None:
    monitor = LoopLagMonitor(period=0.01, sample_after_s=0.02)
    stop = asyncio.Event()
    task = asyncio.ensure_future(monitor.run(stop))
    await asyncio.sleep(0.05)
    await BlockingEnv(monitor).respond()
    await asyncio.sleep(0.05)  # the measuring task wakes up late, and records it
    stop.set()
    await task
    lag, where = monitor.take()
    assert lag > 0
    assert where.startswith("slow_score (")  # innermost first, time.sleep is not Python code
    assert "BlockingEnv.respond (" in where and "test_loop_lag.py:" in where
    assert monitor.take() == (0.0, "")


def test_describe_skips_the_standard_library() -> None:
    import json

    seen: list[str] = []

    class Probe:
        def __init__(self) -> None:
            import sys

            seen.append(describe(sys._getframe(), depth=2))

    json.loads("{}", object_hook=lambda d: Probe())  # a frame of json's in between
    assert ".Probe.__init__ (tests/unit/test_loop_lag.py:" in seen[0].split(" <- ")[0]
    assert "<lambda>" in seen[0]
    assert "json" not in seen[0].split(" <- ")[1]
    assert describe(None) == ""


def test_the_learner_warns_past_the_configured_threshold(caplog) -> None:
    from climbrl.config import load_config
    from climbrl.learner.learner import Learner

    cfg = load_config(None, ['model.path="m"', "rollout.loop_lag_warn_s=2.0"])
    lags = iter(
        [
            {"r0": (1.5, "slow_score (my_env.py:12)"), "r1": (0.2, "")},
            {"r0": (0.1, ""), "r1": (2.5, "MyEnv.respond (my_env.py:30)")},
        ]
    )
    records: list[dict] = []
    hub = SimpleNamespace(take_loop_lag_where=lambda: next(lags))
    env = SimpleNamespace(reward_range=(0.0, 1.0), num_tasks=lambda split: 10)
    fake = Learner(cfg, hub=hub, env=env, metrics=SimpleNamespace(write=records.append))
    with caplog.at_level(logging.WARNING, logger="climbrl.learner"):
        fake.log_step({})  # 1.5 s: under the 2 s threshold
        assert not caplog.records and records[0]["rollout_loop_lag_max_s"] == 1.5
        fake.log_step({})
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert "rollout server r1" in msg and "2.50s" in msg
    assert "MyEnv.respond (my_env.py:30)" in msg and "rollout.loop_lag_warn_s = 2" in msg

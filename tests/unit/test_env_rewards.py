"""Composable rewards and gates."""

from __future__ import annotations

import pytest

from climbrl.envs.base import Task
from climbrl.envs.rewards import Gate, Reward, RewardContext, WeightedSum

TASK = Task(task_id="t", split="train", prompt="p", answer="42")


def ctx(text):
    return RewardContext(completion=text, task=TASK)


correct = Reward("correct", lambda c: float("42" in c.completion))


async def _fmt(c):
    return float(c.completion.startswith("A:"))


fmt = Reward("format", _fmt)
penalty = Reward("length_penalty", lambda c: -min(1.0, len(c.completion) / 100), range=(-1, 0))


async def test_weighted_sum_and_ranges():
    r = WeightedSum([(correct, 1.0), (fmt, 0.5), (penalty, 0.5)])
    assert r.range == (-0.5, 1.5)
    total, parts = await r.score(ctx("A: 42"))
    assert total == pytest.approx(1.0 + 0.5 - 0.5 * 0.05)
    assert parts == {"correct": 1.0, "format": 1.0, "length_penalty": pytest.approx(-0.05)}
    n = WeightedSum([(correct, 3.0), (fmt, 1.0)], normalize=True)
    assert n.range == (0.0, 1.0) and await n(ctx("42")) == pytest.approx(0.75)


async def test_gate_zeroes_or_caps_instead_of_averaging():
    inner = WeightedSum([(correct, 0.9), (fmt, 0.1)])
    safe = Reward("no_import", lambda c: float("import os" not in c.completion))
    g = Gate(inner, checks=[safe])
    assert await g(ctx("A: 42")) == pytest.approx(1.0)
    total, parts = await g(ctx("A: 42 import os")), None
    assert total == 0.0  # not 0.9 * 1 + 0.1 * 1 averaged with a failed check
    total, parts = await g.score(ctx("A: 42 import os"))
    assert parts["gate"] == 0.0 and parts["gate/no_import"] == 0.0 and parts["correct"] == 1.0
    capped = Gate(inner, checks=[safe], cap=0.3)
    assert await capped(ctx("A: 42 import os")) == pytest.approx(0.3)
    assert await capped(ctx("import os")) == 0.0  # below the cap stays
    assert Gate(penalty, checks=[safe]).range == (-1.0, 0.0)


async def test_bad_rewards_fail_loudly():
    with pytest.raises(ValueError, match="outside its range"):
        await Reward("r", lambda c: 1.5).score(ctx(""))
    with pytest.raises(ValueError, match="outside its range"):
        await Reward("r", lambda c: float("nan")).score(ctx(""))
    with pytest.raises(ValueError, match="distinct"):
        WeightedSum([(correct, 1.0), (correct, 1.0)])
    with pytest.raises(ValueError, match="either"):
        Gate(correct, checks=[fmt], on_fail=0.0, cap=0.5)

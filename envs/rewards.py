"""Composable verifiable rewards, and gates that a reward cannot average its way past.

A reward is anything callable as ``fn(ctx) -> float`` (sync or async) on a ``RewardContext``
(the final answer text, the whole conversation, the task). Combinators build bigger ones and
keep every part's value for the metrics:

    correct = Reward("correct", lambda c: float(verify_math(c.completion, c.task.answer)))
    fmt = Reward("format", lambda c: float("\\\\boxed{" in c.completion))
    short = Reward("short", lambda c: float(len(c.completion) < 2000))
    reward = Gate(WeightedSum([(correct, 1.0), (fmt, 0.1)]), checks=[short])
    total, parts = await reward.score(ctx)   # parts: {"correct": 1.0, "format": 1.0, ...}

A ``Gate`` is non-negotiable: if any check scores below its threshold, the total becomes
``on_fail`` (default: the bottom of the inner reward's range) or is capped at ``cap``, however
well the rest scored, instead of being one more weighted term. Ranges compose, so an env can
declare its ``reward_range`` from its reward (``reward.range``).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from climbrl.envs.base import Message, Task

Scorer = Callable[["RewardContext"], float | Awaitable[float]]


@dataclass
class RewardContext:
    completion: str  # the model's final answer text (last turn, tool-call blocks removed)
    task: Task
    messages: list[Message] = field(default_factory=list)  # prompt + every turn, if chat
    extra: dict[str, Any] = field(default_factory=dict)  # env-specific (e.g. test results)


class RewardFn:
    """Base: ``score(ctx) -> (total, parts)``; ``range`` bounds the total."""

    name: str = "reward"
    range: tuple[float, float] = (0.0, 1.0)

    async def score(self, ctx: RewardContext) -> tuple[float, dict[str, float]]:
        raise NotImplementedError

    async def __call__(self, ctx: RewardContext) -> float:
        return (await self.score(ctx))[0]


class Reward(RewardFn):
    """A named leaf reward from a plain (sync or async) function of the context."""

    def __init__(self, name: str, fn: Scorer, range: tuple[float, float] = (0.0, 1.0)):
        if range[0] > range[1]:
            raise ValueError(f"reward {name!r}: range {range} is empty")
        self.name, self.fn, self.range = name, fn, (float(range[0]), float(range[1]))

    async def score(self, ctx: RewardContext) -> tuple[float, dict[str, float]]:
        v = self.fn(ctx)
        if inspect.isawaitable(v):
            v = await v
        v = float(v)
        lo, hi = self.range
        if not lo <= v <= hi:  # NaN fails this too
            raise ValueError(f"reward {self.name!r} returned {v}, outside its range {self.range}")
        return v, {self.name: v}


class WeightedSum(RewardFn):
    """``sum_i w_i * r_i``; with ``normalize``, divided by ``sum_i |w_i|``."""

    def __init__(
        self,
        terms: Sequence[tuple[RewardFn, float]],
        name: str = "weighted_sum",
        normalize: bool = False,
    ):
        if not terms:
            raise ValueError("WeightedSum needs at least one (reward, weight) term")
        names = [r.name for r, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be distinct, got {names}")
        self.terms, self.name = [(r, float(w)) for r, w in terms], name
        z = sum(abs(w) for _, w in self.terms) if normalize else 1.0
        if z == 0:
            raise ValueError("WeightedSum weights are all zero")
        self.z = z
        lo = sum(min(w * r.range[0], w * r.range[1]) for r, w in self.terms) / z
        hi = sum(max(w * r.range[0], w * r.range[1]) for r, w in self.terms) / z
        self.range = (lo, hi)

    async def score(self, ctx: RewardContext) -> tuple[float, dict[str, float]]:
        total, parts = 0.0, {}
        for r, w in self.terms:
            v, p = await r.score(ctx)
            total += w * v
            parts.update(p)
        return total / self.z, parts


class Gate(RewardFn):
    """``inner`` unless a check fails: then ``on_fail`` (or ``min(inner, cap)``).

    A check passes when it scores at least ``threshold`` (checks are usually 0/1). Every check
    is scored and reported (``gate/<name>``), and ``gate`` is 1 when all passed.
    """

    def __init__(
        self,
        inner: RewardFn,
        checks: Sequence[RewardFn],
        on_fail: float | None = None,
        cap: float | None = None,
        threshold: float = 1.0,
        name: str = "gated",
    ):
        if not checks:
            raise ValueError("Gate needs at least one check")
        if on_fail is not None and cap is not None:
            raise ValueError("give Gate either on_fail or cap, not both")
        self.inner, self.checks, self.name = inner, list(checks), name
        self.cap, self.threshold = cap, threshold
        self.on_fail = inner.range[0] if on_fail is None and cap is None else on_fail
        lo, hi = inner.range
        fail_lo = min(lo, cap) if cap is not None else self.on_fail
        assert fail_lo is not None  # on_fail is set whenever cap is None
        self.range = (min(lo, fail_lo), hi)

    async def score(self, ctx: RewardContext) -> tuple[float, dict[str, float]]:
        passed, parts = True, {}
        for c in self.checks:
            v, _ = await c.score(ctx)
            parts[f"gate/{c.name}"] = v
            passed = passed and v >= self.threshold
        total, inner_parts = await self.inner.score(ctx)
        parts.update(inner_parts)
        parts["gate"] = float(passed)
        if not passed and self.cap is not None:
            total = min(total, self.cap)
        elif not passed:
            assert self.on_fail is not None  # __init__ sets it whenever cap is None
            total = float(self.on_fail)
        return total, parts


def clip(v: float, rng: tuple[float, float]) -> float:
    return min(max(v, rng[0]), rng[1])

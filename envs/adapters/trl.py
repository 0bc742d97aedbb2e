"""TRL reward functions, unchanged, as climbrl rewards; and a dataset + reward_funcs env.

TRL's ``GRPOTrainer`` takes ``reward_funcs``: callables ``f(prompts, completions, **kwargs)``
returning one float (or ``None``: "does not apply") per completion, where ``kwargs`` holds the
dataset's other columns as lists. Prompts and completions are strings (standard format) or
message lists (conversational format: a completion is ``[{"role": "assistant", "content": ...}]``).
``TRLReward`` calls such a function exactly that way, one completion at a time, with the task's
dataset row as the columns (plus ``trainer_state=None``, ``log_extra=None``,
``log_metric=None``, which TRL's own functions accept). ``None`` counts 0, as TRL's ``nansum``.
Token ids are not passed (envs never see them): a function that needs ``completion_ids`` does
not fit.

``TRLRewardEnv`` is the env a GRPOTrainer user already has: a dataset of rows with a ``prompt``
column and reward functions with weights, plus optional *gate* functions (any TRL-style
function scoring 0/1, e.g. ``trl.rewards.think_format_reward``) that zero the reward when they
fail instead of being averaged in.

    [env]
    name = "trl"
    args = { dataset = "my_pkg.data:rows", reward_funcs = ["trl.rewards:accuracy_reward"],
             gate_funcs = ["trl.rewards:think_format_reward"] }
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from climbrl.envs.base import Env, Prompt, StepResult, Task, Turn, load_object
from climbrl.envs.rewards import Gate, RewardContext, RewardFn, WeightedSum


class TRLReward(RewardFn):
    """A TRL-style reward function as a climbrl ``RewardFn`` over ``[lo, hi]``."""

    def __init__(
        self,
        func: Callable[..., Any] | str,
        name: str | None = None,
        range: tuple[float, float] = (0.0, 1.0),
    ):
        self.func = load_object(func) if isinstance(func, str) else func
        if not callable(self.func):
            raise ValueError(f"TRL reward {func!r} is not callable")
        self.name = name or getattr(self.func, "__name__", type(self.func).__name__)
        self.range = (float(range[0]), float(range[1]))

    async def score(self, ctx: RewardContext) -> tuple[float, dict[str, float]]:
        prompt = ctx.task.prompt
        conversational = isinstance(prompt, list)
        completion: Any = (
            [{"role": "assistant", "content": ctx.completion}] if conversational else ctx.completion
        )
        row = ctx.task.meta.get("row", {})
        columns = {k: [v] for k, v in row.items() if k not in ("prompt", "completion")}
        out = self.func(
            prompts=[prompt],
            completions=[completion],
            trainer_state=None,
            log_extra=None,
            log_metric=None,
            **columns,
        )
        if inspect.isawaitable(out):
            out = await out
        out = list(out)
        if len(out) != 1:
            raise ValueError(
                f"TRL reward {self.name!r} returned {len(out)} rewards for 1 completion"
            )
        if out[0] is None:
            return 0.0, {self.name: 0.0, f"{self.name}/skipped": 1.0}
        v = float(out[0])
        if not self.range[0] <= v <= self.range[1]:
            raise ValueError(
                f"TRL reward {self.name!r} returned {v}, outside its declared range "
                f"{self.range}: set reward_ranges in the env args"
            )
        return v, {self.name: v}


def _rows(source: Any) -> list[dict[str, Any]]:
    """Rows from a callable/dotted path (list of dicts or a datasets.Dataset) or a .jsonl file."""
    if isinstance(source, str) and source.endswith(".jsonl"):
        return [json.loads(x) for x in Path(source).read_text().splitlines() if x.strip()]
    obj: Any = load_object(source) if isinstance(source, str) else source
    if callable(obj) and not isinstance(obj, list | tuple):
        obj = obj()
    rows = [dict(r) for r in obj]
    for i, r in enumerate(rows):
        if "prompt" not in r:
            raise ValueError(f"dataset row {i} has no 'prompt' column: {sorted(r)}")
    return rows


@functools.lru_cache(maxsize=8)
def _cached_rows(source: str) -> tuple[dict[str, Any], ...]:
    return tuple(_rows(source))


class TRLRewardEnv(Env):
    name = "trl"
    max_turns = 1

    def __init__(
        self,
        seed: int = 0,
        dataset: str = "",
        eval_dataset: str | None = None,
        reward_funcs: Sequence[str] = (),
        reward_weights: Sequence[float] | None = None,
        reward_ranges: Sequence[Sequence[float]] | None = None,
        gate_funcs: Sequence[str] = (),
        test_fraction: float = 0.1,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        if not dataset or not reward_funcs:
            raise ValueError(
                "the trl env needs args.dataset (a dotted path or .jsonl) and "
                "args.reward_funcs (dotted paths of TRL reward functions)"
            )
        weights = list(reward_weights or [1.0] * len(reward_funcs))
        ranges = list(reward_ranges or [(0.0, 1.0)] * len(reward_funcs))
        if not len(weights) == len(ranges) == len(reward_funcs):
            raise ValueError("reward_weights and reward_ranges need one entry per reward_funcs")
        terms = [
            (TRLReward(f, range=(r[0], r[1])), w) for f, r, w in zip(reward_funcs, ranges, weights)
        ]
        reward: RewardFn = WeightedSum(terms)
        if gate_funcs:
            reward = Gate(reward, checks=[TRLReward(g) for g in gate_funcs])
        self.reward = reward
        self.reward_range = reward.range
        rows = _cached_rows(dataset)
        if eval_dataset:
            self.rows = {"train": rows, "test": _cached_rows(eval_dataset)}
        else:

            def is_test(r: dict[str, Any]) -> bool:
                h = hashlib.sha256(json.dumps(r["prompt"], sort_keys=True).encode()).digest()
                return int.from_bytes(h[:4], "little") / 2**32 < test_fraction

            self.rows = {
                "train": tuple(r for r in rows if not is_test(r)),
                "test": tuple(r for r in rows if is_test(r)),
            }
        self._task: Task | None = None

    def num_tasks(self, split: str) -> int:
        if split not in self.rows:
            raise ValueError(f"split must be one of {sorted(self.rows)}, got {split!r}")
        return len(self.rows[split])

    def get_task(self, split: str, index: int) -> Task:
        n = self.num_tasks(split)
        if n == 0:
            raise ValueError(f"the trl env's {split!r} split is empty")
        index %= n
        row = self.rows[split][index]
        return Task(
            task_id=f"trl/{split}/{index}",
            split=split,
            prompt=row["prompt"],
            answer=row.get("solution", row.get("answer")),
            meta={"row": row},
        )

    async def reset(self, task: Task) -> Prompt:
        self._task = task
        return task.prompt

    async def respond(self, turn: Turn) -> StepResult:
        assert self._task is not None, "reset() first"
        total, parts = await self.reward.score(
            RewardContext(completion=turn.content, task=self._task)
        )
        return StepResult(
            reward=total, done=True, info={**parts, "correct": float(total >= self.reward_range[1])}
        )

    def reference_turns(self, task: Task) -> list[str] | None:
        ref = task.meta["row"].get("reference_completion")
        return [ref] if isinstance(ref, str) else None


def example_rows(n: int = 200) -> list[dict[str, Any]]:
    """A small conversational dataset in GRPOTrainer's shape (``prompt`` + ``solution``), for
    examples and the contract tests: ``args.dataset = "climbrl.envs.adapters.trl:example_rows"``."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append(
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": f"What is {a} + {b}? Think in <think></think>, "
                        "then answer in \\boxed{}.",
                    }
                ],
                "solution": str(a + b),
                "reference_completion": f"<think>\n{a} + {b} = {a + b}\n</think>\n\\boxed{{{a + b}}}",
            }
        )
    return rows

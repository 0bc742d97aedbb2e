"""``math``: procedurally generated arithmetic and algebra, answers checked with math-verify.

Problems are generated from ``(seed, split, index)`` alone (no downloads, identical in every
process): integer arithmetic, fractions, linear equations, quadratics (larger root), modular
powers. Train and test problems never coincide (split by a hash of the problem text).

The model answers in ``\\boxed{...}``. The reward is math-verify's equivalence of the boxed
answer with the reference (so ``\\frac{1}{2}``, ``0.5`` and ``1/2`` all count), behind a gate:
a completion with no boxed answer, or with several different ones (hedging), scores 0 whatever
it contains.

    [env]
    name = "math"
    args = { kinds = ["arithmetic", "linear"], num_train = 5000 }
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
from fractions import Fraction
from typing import Any

from climbrl.envs.base import Env, Prompt, StepResult, Task, Turn
from climbrl.envs.rewards import Gate, Reward, RewardContext

SYSTEM_PROMPT = (
    "Solve the problem. Think briefly, then give only the final answer as \\boxed{answer}."
)
KINDS = ("arithmetic", "fractions", "linear", "quadratic", "modpow")
_BOXED = re.compile(r"\\boxed\s*\{")


def _rng(*parts: Any) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big"))


def _hash_frac(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") / 2**32


def _latex(x: Fraction | int) -> str:
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def generate(kind: str, rng: random.Random) -> tuple[str, str]:
    """(problem text, reference answer in LaTeX)."""
    if kind == "arithmetic":
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        expr = f"{a} {op1} {b} {op2} {c}"
        val = eval(expr, {"__builtins__": {}})  # three literal integers and + - *
        return f"Compute {expr}.", str(val)
    if kind == "fractions":
        a, b = (
            Fraction(rng.randint(1, 9), rng.randint(2, 9)),
            Fraction(rng.randint(1, 9), rng.randint(2, 9)),
        )
        op = rng.choice("+-*")
        val = a + b if op == "+" else a - b if op == "-" else a * b
        return f"Compute {a} {op} {b}. Give the answer as a reduced fraction.", _latex(val)
    if kind == "linear":
        x, a = rng.randint(-12, 12), rng.choice([i for i in range(-9, 10) if i not in (0, 1)])
        b = rng.randint(-30, 30)
        return f"Solve for x: {a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}.", str(x)
    if kind == "quadratic":
        r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
        s, p = -(r1 + r2), r1 * r2
        poly = f"x^2 {'+' if s >= 0 else '-'} {abs(s)}x {'+' if p >= 0 else '-'} {abs(p)}"
        return f"Find the larger root of {poly} = 0.", str(max(r1, r2))
    if kind == "modpow":
        a, e, m = rng.randint(2, 30), rng.randint(2, 12), rng.randint(3, 50)
        return f"What is {a}^{e} mod {m}?", str(pow(a, e, m))
    raise ValueError(f"unknown math kind {kind!r}; choose from {KINDS}")


def boxed_answers(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}``, braces balanced."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1].strip())
    return out


def verify_math(answer: str, gold: str) -> bool:
    """math-verify equivalence of one answer string with the reference (both LaTeX/plain)."""
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    main = threading.current_thread() is threading.main_thread()
    to = 5 if main else None
    if not main:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # math-verify documents parsing_timeout=None (no SIGALRM) but annotates it as int
    g = parse(f"${gold}$", parsing_timeout=to)  # pyright: ignore[reportArgumentType]
    a = parse(f"${answer}$", parsing_timeout=to)  # pyright: ignore[reportArgumentType]
    return bool(g and a and verify(g, a, timeout_seconds=to))


def _one_answer(ctx: RewardContext) -> float:
    answers = boxed_answers(ctx.completion)
    return float(len(answers) >= 1 and len(set(answers)) == 1)


def _correct(ctx: RewardContext) -> float:
    answers = boxed_answers(ctx.completion)
    return float(bool(answers) and verify_math(answers[-1][:200], ctx.task.answer))


MATH_REWARD = Gate(Reward("correct", _correct), checks=[Reward("one_boxed_answer", _one_answer)])


class MathEnv(Env):
    name = "math"
    reward_range = MATH_REWARD.range
    max_turns = 1

    def __init__(
        self,
        seed: int = 0,
        kinds: list[str] | tuple[str, ...] = KINDS,
        num_train: int = 10_000,
        num_test: int = 500,
        test_fraction: float = 0.1,
        system_prompt: str = SYSTEM_PROMPT,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"math kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
        if not 0 < test_fraction < 1:
            raise ValueError("test_fraction must be in (0, 1)")
        self.kinds, self.test_fraction = tuple(kinds), test_fraction
        self.sizes = {"train": num_train, "test": num_test}
        self.system_prompt = system_prompt
        self._task: Task | None = None

    def num_tasks(self, split: str) -> int:
        if split not in self.sizes:
            raise ValueError(f"split must be one of {sorted(self.sizes)}, got {split!r}")
        return self.sizes[split]

    def get_task(self, split: str, index: int) -> Task:
        n = self.num_tasks(split)
        index %= n
        for attempt in range(1000):
            rng = _rng("math", self.seed, split, index, attempt)
            kind = self.kinds[rng.randrange(len(self.kinds))]
            problem, answer = generate(kind, rng)
            if (_hash_frac(problem) < self.test_fraction) == (split == "test"):
                break
        else:  # pragma: no cover - probability (1 - test_fraction)^1000
            raise RuntimeError("could not draw a problem for this split")
        prompt = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": problem},
        ]
        return Task(
            task_id=f"math/{split}/{index}",
            split=split,
            prompt=prompt,
            answer=answer,
            meta={"kind": kind},
        )

    async def reset(self, task: Task) -> Prompt:
        self._task = task
        return task.prompt

    async def respond(self, turn: Turn) -> StepResult:
        assert self._task is not None, "reset() first"
        ctx = RewardContext(completion=turn.content, task=self._task)
        total, parts = await MATH_REWARD.score(ctx)
        return StepResult(
            reward=total, done=True, info={"correct": parts["correct"] * parts["gate"], **parts}
        )

    def reference_turns(self, task: Task) -> list[str]:
        return [f"So the answer is \\boxed{{{task.answer}}}."]

    def tokenizer_corpus(self) -> list[str]:
        out = []
        for i in range(200):
            t = self.get_task("train", i)
            assert isinstance(t.prompt, list)  # this env's tasks are chat prompts
            out.append(t.prompt[-1]["content"] + " " + self.reference_turns(t)[0])
        return out

"""``tool_use``: a multi-turn task where the model calls a sandboxed Python tool and a calculator.

Each task is a computation that is tedious by hand (digit sums of big powers, counting primes,
factorials modulo m, nested arithmetic). The model may call, over several turns:

- ``python(code)``: runs ``code`` in ``climbrl.envs.sandbox`` and returns its stdout/stderr;
- ``calculator(expression)``: evaluates + - * / // % ** and parentheses on numbers (an AST
  walk, never ``eval``), with bounded exponents.

Tool calls are Hermes/Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks;
each gets a ``tool`` message back (errors included: a bad call is answered, not fatal). A turn
without tool calls is the final answer, in ``\\boxed{}``. The reward is math-verify correctness,
gated on having called at least ``min_tool_calls`` tools first (the task is tool use, so a
bare guess scores 0), and 0 when the turn budget ``max_turns`` runs out.

    [env]
    name = "tool_use"
    args = { max_turns = 4, min_tool_calls = 1 }
"""

from __future__ import annotations

import ast
import hashlib
import math
import operator
import random
from typing import Any

from climbrl.envs.base import Env, Message, Prompt, StepResult, Task, ToolCall, Turn
from climbrl.envs.chat import format_tool_call
from climbrl.envs.math import boxed_answers, verify_math
from climbrl.envs.rewards import Gate, Reward, RewardContext

SYSTEM_PROMPT = (
    "Use the tools to compute exactly; do not guess. When you know the result, reply without "
    "a tool call and give the final answer as \\boxed{answer}."
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "python",
            "description": "Run a Python 3 program in a sandbox and return what it prints.",
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "description": "The program; print the result."}
                },
                "required": ["code"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression: + - * / // % ** and parentheses.",
            "parameters": {
                "type": "object",
                "properties": {
                    "expression": {"type": "string", "description": "e.g. (12 + 7) * 3 / 4"}
                },
                "required": ["expression"],
            },
        },
    },
]
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression safely; errors come back as text."""

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        ):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 10**6):
                raise ValueError("exponent too large for the calculator; use python")
            return _OPS[type(node.op)](a, b)
        raise ValueError(f"unsupported syntax {type(node).__name__}")

    if len(expression) > 500:
        return "error: expression too long"
    try:
        v = ev(ast.parse(expression, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as e:
        return f"error: {type(e).__name__}: {e}"
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        v = int(v)
    return str(v)


def _digit_sum(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(20, 60)
    return (
        f"What is the sum of the decimal digits of {a}^{b}?",
        str(sum(map(int, str(a**b)))),
        f"print(sum(map(int, str({a}**{b}))))",
    )


def _primes(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(100, 5000)
    cnt = sum(1 for k in range(2, n) if all(k % d for d in range(2, math.isqrt(k) + 1)))
    code = f"print(sum(1 for k in range(2, {n}) if all(k % d for d in range(2, int(k**0.5) + 1))))"
    return f"How many prime numbers are smaller than {n}?", str(cnt), code


def _factorial_mod(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(20, 200)
    m = rng.randint(n + 1, 100000)
    while any(m % d == 0 for d in range(2, math.isqrt(m) + 1)):  # a prime above n: rarely 0
        m += 1
    return (
        f"What is {n}! mod {m}?",
        str(math.factorial(n) % m),
        f"import math\nprint(math.factorial({n}) % {m})",
    )


def _arith(rng: random.Random) -> tuple[str, str, str]:
    a, b, c, d = (rng.randint(100, 9999) for _ in range(4))
    expr = f"({a} * {b} - {c}) % {d} + {a} // 7"
    return f"Compute {expr}.", calculator(expr), expr


KINDS = {
    "digit_sum": _digit_sum,
    "primes": _primes,
    "factorial_mod": _factorial_mod,
    "arithmetic": _arith,
}


def _rng(*parts: Any) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big"))


def _answer(ctx: RewardContext) -> float:
    answers = boxed_answers(ctx.completion)
    return float(len(set(answers)) == 1 and verify_math(answers[-1][:200], ctx.task.answer))


class ToolUseEnv(Env):
    name = "tool_use"
    reward_range = (0.0, 1.0)

    def __init__(
        self,
        seed: int = 0,
        kinds: list[str] | tuple[str, ...] = tuple(KINDS),
        num_train: int = 5000,
        num_test: int = 200,
        max_turns: int = 4,
        min_tool_calls: int = 1,
        wall_s: float = 5.0,
        allow_unsandboxed: bool = False,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"tool_use kinds must be a non-empty subset of {sorted(KINDS)}")
        if max_turns < 2:
            raise ValueError("max_turns must be at least 2 (a tool call, then the answer)")
        self.kinds, self.max_turns, self.min_tool_calls = tuple(kinds), max_turns, min_tool_calls
        self.sizes = {"train": num_train, "test": num_test}
        self.wall_s, self.allow_unsandboxed = wall_s, allow_unsandboxed
        used = Reward("used_tools", lambda c: float(c.extra["tool_calls"] >= min_tool_calls))
        self.reward = Gate(Reward("correct", _answer), checks=[used])
        self._task: Task | None = None
        self._messages: list[Message] = []
        self._calls = 0

    def num_tasks(self, split: str) -> int:
        if split not in self.sizes:
            raise ValueError(f"split must be one of {sorted(self.sizes)}, got {split!r}")
        return self.sizes[split]

    def get_task(self, split: str, index: int) -> Task:
        index %= self.num_tasks(split)
        for attempt in range(1000):
            rng = _rng("tool_use", self.seed, split, index, attempt)
            kind = self.kinds[rng.randrange(len(self.kinds))]
            question, answer, solution = KINDS[kind](rng)
            h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:2], "little")
            if (h % 10 == 0) == (split == "test"):
                break
        prompt = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ]
        tool = "calculator" if kind == "arithmetic" else "python"
        return Task(
            task_id=f"tool_use/{split}/{index}",
            split=split,
            prompt=prompt,
            answer=answer,
            meta={"kind": kind, "tool": tool, "solution": solution},
        )

    def tools(self) -> list[dict[str, Any]]:
        return TOOLS

    async def reset(self, task: Task) -> Prompt:
        assert isinstance(task.prompt, list)  # get_task builds chat prompts
        self._task, self._messages, self._calls = task, list(task.prompt), 0
        return task.prompt

    async def _call(self, call: ToolCall) -> str:
        if call.name == "calculator":
            expr = call.arguments.get("expression")
            return (
                calculator(expr)
                if isinstance(expr, str)
                else "error: 'expression' must be a string"
            )
        if call.name == "python":
            code = call.arguments.get("code")
            if not isinstance(code, str):
                return "error: 'code' must be a string"
            from climbrl.envs.code import _sandbox

            res = await _sandbox(self.wall_s, 256, self.allow_unsandboxed).run_python(code)
            out = (res.stdout + (("\n" + res.stderr) if res.stderr else "")).strip()
            if res.killed_reason:
                out += f"\n[killed: {res.killed_reason}]"
            return out[-2000:] or "(no output)"
        return f"error: unknown tool {call.name!r}; the tools are python and calculator"

    async def respond(self, turn: Turn) -> StepResult:
        assert self._task is not None, "reset() first"
        self._messages.append(turn.message())
        if turn.tool_calls or turn.tool_call_errors:
            new: list[Message] = []
            for call in turn.tool_calls:
                self._calls += 1
                new.append(
                    {
                        "role": "tool",
                        "tool_call_id": call.id,
                        "name": call.name,
                        "content": await self._call(call),
                    }
                )
            for err in turn.tool_call_errors:
                new.append({"role": "tool", "content": f"error: {err}"})
            self._messages += new
            return StepResult(
                reward=0.0, done=False, messages=new, info={"tool_calls": float(self._calls)}
            )
        ctx = RewardContext(
            completion=turn.content,
            task=self._task,
            messages=self._messages,
            extra={"tool_calls": self._calls},
        )
        total, parts = await self.reward.score(ctx)
        return StepResult(
            reward=total,
            done=True,
            info={**parts, "correct": float(total >= 1.0), "tool_calls": float(self._calls)},
        )

    def reference_turns(self, task: Task) -> list[str]:
        tool = task.meta["tool"]
        args = (
            {"code": task.meta["solution"]}
            if tool == "python"
            else {"expression": task.meta["solution"]}
        )
        return [
            "Let me compute it.\n" + format_tool_call(tool, args),
            f"The result is \\boxed{{{task.answer}}}.",
        ]

    def tokenizer_corpus(self) -> list[str]:
        out = []
        for i in range(100):
            t = self.get_task("train", i)
            assert isinstance(t.prompt, list)  # this env's tasks are chat prompts
            out += [t.prompt[-1]["content"], *self.reference_turns(t)]
        return out

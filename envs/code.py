"""``code``: the model writes a Python function; hidden unit tests run in the sandbox.

Tasks are procedural: a family of small functions (filter-and-sum, Caesar shift, digit sums in
a base, running maxima, ...) with random constants, and hidden test inputs drawn for each task.
The model answers with a ```python block defining the function. The reward is the fraction of
hidden tests passed, behind a gate: no code block, a syntax error, or no function of the right
name scores 0.

The model's code runs only inside ``climbrl.envs.sandbox`` (bubblewrap + seccomp + rlimits;
Landlock where user namespaces are blocked; refused where neither works unless
``allow_unsandboxed=true``). The sandbox prints only the function's *outputs*, one line per
test; expected outputs are computed here, on the host, from the reference solution, so printing
fake results cannot earn reward. A test that raises, or that has not finished when the sandbox
is killed (timeout, memory), fails.

    [env]
    name = "code"
    args = { families = ["sum_greater", "caesar"], wall_s = 5.0 }
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import re
import string
from dataclasses import dataclass
from typing import Any

from climbrl.envs.base import Env, Prompt, StepResult, Task, Turn
from climbrl.envs.rewards import Gate, Reward, RewardContext

SYSTEM_PROMPT = (
    "You write correct, simple Python. Answer with one ```python code block that defines the "
    "requested function (no example usage, no input())."
)
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_MARK = "__climbrl_result__ "


@dataclass(frozen=True)
class Family:
    fn: str
    signature: str
    doc: str  # with {p} placeholders for the constants
    reference: str  # reference solution source, with the same placeholders
    params: Any  # rng -> dict of constants
    inputs: Any  # rng -> one tuple of arguments


def _ints(
    rng: random.Random, lo: int = -50, hi: int = 50, n: tuple[int, int] = (0, 8)
) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(*n))]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + " ,.!") for _ in range(rng.randint(0, 16)))


FAMILIES: dict[str, Family] = {
    f.fn: f
    for f in [
        Family(
            "sum_greater",
            "sum_greater(xs: list[int]) -> int",
            "returns the sum of the elements of xs that are greater than {t}",
            "def sum_greater(xs):\n    return sum(x for x in xs if x > {t})\n",
            lambda r: {"t": r.randint(-10, 10)},
            lambda r: (_ints(r),),
        ),
        Family(
            "count_divisible",
            "count_divisible(xs: list[int]) -> int",
            "returns how many elements of xs are divisible by {d}",
            "def count_divisible(xs):\n    return sum(1 for x in xs if x % {d} == 0)\n",
            lambda r: {"d": r.randint(2, 9)},
            lambda r: (_ints(r),),
        ),
        Family(
            "caesar",
            "caesar(s: str) -> str",
            "shifts every ASCII letter of s forward by {k} places in the alphabet, wrapping "
            "around and keeping case; other characters are unchanged",
            "def caesar(s):\n    out = []\n    for c in s:\n"
            "        if c.islower() and c.isascii():\n"
            "            out.append(chr((ord(c) - 97 + {k}) % 26 + 97))\n"
            "        elif c.isupper() and c.isascii():\n"
            "            out.append(chr((ord(c) - 65 + {k}) % 26 + 65))\n"
            "        else:\n            out.append(c)\n    return ''.join(out)\n",
            lambda r: {"k": r.randint(1, 25)},
            lambda r: (_word(r),),
        ),
        Family(
            "digit_sum",
            "digit_sum(n: int) -> int",
            "returns the sum of the digits of the non-negative integer n written in base {b}",
            "def digit_sum(n):\n    s = 0\n    while n:\n        s += n % {b}\n"
            "        n //= {b}\n    return s\n",
            lambda r: {"b": r.randint(2, 16)},
            lambda r: (r.randint(0, 10**6),),
        ),
        Family(
            "running_max",
            "running_max(xs: list[int]) -> list[int]",
            "returns the list whose i-th element is the largest of xs[0..i], plus {c}",
            "def running_max(xs):\n    out, m = [], None\n    for x in xs:\n"
            "        m = x if m is None else max(m, x)\n        out.append(m + {c})\n"
            "    return out\n",
            lambda r: {"c": r.randint(0, 5)},
            lambda r: (_ints(r),),
        ),
        Family(
            "clamp_all",
            "clamp_all(xs: list[int]) -> list[int]",
            "returns xs with every element clamped into the range [{lo}, {hi}]",
            "def clamp_all(xs):\n    return [min(max(x, {lo}), {hi}) for x in xs]\n",
            lambda r: (lambda lo: {"lo": lo, "hi": lo + r.randint(0, 30)})(r.randint(-20, 10)),
            lambda r: (_ints(r),),
        ),
        Family(
            "dedupe",
            "dedupe(xs: list[int]) -> list[int]",
            "returns xs without repeated elements, keeping first occurrences in order, and "
            "dropping every element equal to {z}",
            "def dedupe(xs):\n    seen, out = set(), []\n    for x in xs:\n"
            "        if x != {z} and x not in seen:\n            seen.add(x)\n"
            "            out.append(x)\n    return out\n",
            lambda r: {"z": r.randint(0, 5)},
            lambda r: (_ints(r, 0, 6, (0, 10)),),
        ),
    ]
}

_HARNESS = """
import json, sys
ns = {"__name__": "solution"}
exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
fn = ns.get(%(fn)r)
for args in json.loads(%(inputs)r):
    try:
        res = ["ok", fn(*args)]
        line = json.dumps(res)
    except BaseException as e:
        line = json.dumps(["err", type(e).__name__])
    sys.stdout.write("\\n" + %(mark)r + line + "\\n")
    sys.stdout.flush()
"""


def extract_code(text: str) -> str | None:
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


def defines_function(code: str | None, name: str) -> bool:
    if code is None:
        return False
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(
        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name for n in tree.body
    )


def _rng(*parts: Any) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big"))


@functools.lru_cache(maxsize=8)
def _sandbox(wall_s: float, memory_mb: int, allow_unsandboxed: bool):
    from climbrl.envs.sandbox import Sandbox, SandboxLimits

    return Sandbox(
        SandboxLimits(wall_s=wall_s, cpu_s=max(1, int(wall_s) + 1), memory_mb=memory_mb),
        allow_unsandboxed=allow_unsandboxed,
    )


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))


async def run_tests(
    sandbox: Any, code: str, fn: str, inputs: list[tuple], expected: list[Any]
) -> tuple[list[bool], Any]:
    """Run ``code`` in the sandbox on ``inputs``; compare each output with ``expected`` here."""
    harness = _HARNESS % {"fn": fn, "inputs": json.dumps([list(a) for a in inputs]), "mark": _MARK}
    res = await sandbox.run_python(harness, files={"solution.py": code})
    outs = [line[len(_MARK) :] for line in res.stdout.splitlines() if line.startswith(_MARK)]
    passed = []
    for i, want in enumerate(expected):
        try:
            got = json.loads(outs[i]) if i < len(outs) else None
        except json.JSONDecodeError:
            got = None
        passed.append(got == ["ok", _norm(want)])
    return passed, res


def _gate(ctx: RewardContext) -> float:
    return float(defines_function(extract_code(ctx.completion), ctx.task.meta["fn"]))


def _frac(ctx: RewardContext) -> float:
    passed = ctx.extra.get("passed", [])
    return sum(passed) / len(passed) if passed else 0.0


CODE_REWARD = Gate(Reward("tests_passed", _frac), checks=[Reward("defines_function", _gate)])


class CodeEnv(Env):
    name = "code"
    reward_range = CODE_REWARD.range
    max_turns = 1

    def __init__(
        self,
        seed: int = 0,
        families: list[str] | tuple[str, ...] = tuple(FAMILIES),
        num_train: int = 5000,
        num_test: int = 200,
        num_tests: int = 8,
        wall_s: float = 5.0,
        memory_mb: int = 256,
        allow_unsandboxed: bool = False,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        bad = [f for f in families if f not in FAMILIES]
        if bad or not families:
            raise ValueError(f"code families must be a non-empty subset of {sorted(FAMILIES)}")
        if num_tests < 1:
            raise ValueError("num_tests must be at least 1")
        self.families, self.num_tests = tuple(families), num_tests
        self.sizes = {"train": num_train, "test": num_test}
        self.wall_s, self.memory_mb, self.allow_unsandboxed = wall_s, memory_mb, allow_unsandboxed
        self._task: Task | None = None

    def num_tasks(self, split: str) -> int:
        if split not in self.sizes:
            raise ValueError(f"split must be one of {sorted(self.sizes)}, got {split!r}")
        return self.sizes[split]

    def get_task(self, split: str, index: int) -> Task:
        index %= self.num_tasks(split)
        rng = _rng("code", self.seed, split, index)
        fam = FAMILIES[self.families[rng.randrange(len(self.families))]]
        p = fam.params(rng)
        # Test tasks draw from constants the train split never uses (a hash of them picks).
        for _ in range(1000):
            h = int.from_bytes(
                hashlib.sha256(repr((fam.fn, sorted(p.items()))).encode()).digest()[:2], "little"
            )
            if (h % 5 == 0) == (split == "test"):
                break
            p = fam.params(rng)
        inputs = [fam.inputs(rng) for _ in range(self.num_tests)]
        ref = fam.reference.format(**p)
        ns: dict[str, Any] = {}
        exec(ref, ns)  # our own reference solution, never model code
        expected = [_norm(ns[fam.fn](*a)) for a in inputs]
        user = f"Write a Python function `{fam.signature}` that {fam.doc.format(**p)}."
        prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return Task(
            task_id=f"code/{split}/{index}",
            split=split,
            prompt=prompt,
            answer={"inputs": [list(a) for a in inputs], "expected": expected},
            meta={"fn": fam.fn, "family": fam.fn, "reference": ref},
        )

    async def reset(self, task: Task) -> Prompt:
        self._task = task
        return task.prompt

    async def respond(self, turn: Turn) -> StepResult:
        assert self._task is not None, "reset() first"
        task = self._task
        code = extract_code(turn.content)
        extra: dict[str, Any] = {"passed": []}
        info: dict[str, float] = {}
        if code is not None and defines_function(code, task.meta["fn"]):
            sb = _sandbox(self.wall_s, self.memory_mb, self.allow_unsandboxed)
            passed, res = await run_tests(
                sb,
                code,
                task.meta["fn"],
                [tuple(a) for a in task.answer["inputs"]],
                task.answer["expected"],
            )
            extra["passed"] = passed
            info["sandbox_killed"] = float(res.killed_reason is not None)
            info["sandbox_s"] = res.duration_s
        ctx = RewardContext(completion=turn.content, task=task, extra=extra)
        total, parts = await CODE_REWARD.score(ctx)
        return StepResult(
            reward=total, done=True, info={**parts, **info, "correct": float(total >= 1.0)}
        )

    def reference_turns(self, task: Task) -> list[str]:
        return [f"```python\n{task.meta['reference']}```"]

    def tokenizer_corpus(self) -> list[str]:
        out = []
        for i in range(100):
            t = self.get_task("train", i)
            assert isinstance(t.prompt, list)  # this env's tasks are chat prompts
            out += [t.prompt[-1]["content"], self.reference_turns(t)[0]]
        return out

"""Two-number addition as a chat task, for an instruct model such as SmolLM2-135M-Instruct.

The user asks "What is A + B? Reply with only the number." for two-digit A and B. A task may
open with up to ``max_shots`` worked examples as earlier user/assistant turns, so prompts run
from about 40 to about 200 tokens with SmolLM2's chat template. Rewards, both reported:

- ``correct``: the last number in the answer is A + B;
- ``strict``: the whole answer is that number and nothing else.

The reward is ``correct`` with ``strict_weight`` of it reserved for the strict format
(``reward = correct * (1 - strict_weight) + strict * strict_weight``).

    climbrl run examples/smollm2_arith.toml
    climbrl demo --model smollm2
    climbrl env-check arith_chat
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

from climbrl.envs.base import Env, Prompt, StepResult, Task, Turn

QUESTION = "What is {a} + {b}? Reply with only the number."
_NUMBER = re.compile(r"-?\d+")


def _rng(*parts: Any) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big"))


class ArithChatEnv(Env):
    name = "arith_chat"
    reward_range = (0.0, 1.0)
    max_turns = 1

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 20000,
        num_test: int = 500,
        max_shots: int = 5,
        strict_weight: float = 0.2,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        if not 0.0 <= strict_weight <= 1.0:
            raise ValueError(f"arith_chat: strict_weight must be in [0, 1], got {strict_weight}")
        if max_shots < 0:
            raise ValueError(f"arith_chat: max_shots must be >= 0, got {max_shots}")
        self.seed = seed
        self.sizes = {"train": num_train, "test": num_test}
        self.max_shots = max_shots
        self.strict_weight = strict_weight
        self._task: Task | None = None

    def num_tasks(self, split: str) -> int:
        return self.sizes[split]

    def _pair(self, split: str, index: int) -> tuple[int, int]:
        # train and test are disjoint: test takes the pairs with (a + 3b) mod 5 == 0
        r = _rng(self.seed, split, index)
        while True:
            a, b = r.randint(10, 99), r.randint(10, 99)
            if ((a + 3 * b) % 5 == 0) == (split == "test"):
                return a, b

    def get_task(self, split: str, index: int) -> Task:
        a, b = self._pair(split, index)
        r = _rng(self.seed, split, index, "shots")
        msgs: list[dict[str, str]] = []
        for _ in range(r.randint(0, self.max_shots)):
            x, y = r.randint(10, 99), r.randint(10, 99)
            msgs += [
                {"role": "user", "content": QUESTION.format(a=x, b=y)},
                {"role": "assistant", "content": str(x + y)},
            ]
        msgs.append({"role": "user", "content": QUESTION.format(a=a, b=b)})
        return Task(task_id=f"{split}/{index}", split=split, prompt=msgs, answer=str(a + b))

    async def reset(self, task: Task) -> Prompt:
        self._task = task
        return task.prompt

    def grade(self, text: str, answer: str) -> tuple[float, float]:
        nums = _NUMBER.findall(text)
        correct = float(bool(nums) and nums[-1] == answer)
        strict = float(text.strip() == answer)
        return correct, strict

    async def respond(self, turn: Turn) -> StepResult:
        assert self._task is not None
        correct, strict = self.grade(turn.content, self._task.answer)
        w = self.strict_weight
        return StepResult(
            reward=correct * (1 - w) + strict * w,
            done=True,
            info={"correct": correct, "strict": strict},
        )

    def reference_turns(self, task: Task) -> list[str]:
        return [task.answer]

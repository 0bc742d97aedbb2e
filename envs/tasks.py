"""Built-in verifiable tasks.

``copy_first``: the prompt is a short string of letters followed by ``=``; the answer is its
first letter, repeated. Each of the completion's first ``answer_len`` characters scores 1 if it
is that letter and ``letter_credit`` if it is another letter of the alphabet; the reward is the
mean. A model trained from random weights thus gets a dense signal (first: answer in letters;
then: the right one) and learns the task by RL alone. ``correct`` (the accuracy) is whether the
first character is the target. Train and test strings never overlap (split by a hash).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from typing import Any

from climbrl.envs.base import Env, Prompt, StepResult, Task


def _is_test(s: str, test_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")
    return (h % 10_000) < test_fraction * 10_000


@functools.lru_cache(maxsize=16)
def _splits(alphabet: str, length: int, test_fraction: float) -> dict[str, tuple[str, ...]]:
    """Every string, split once per process (envs are built per episode)."""
    strings = ["".join(p) for p in itertools.product(alphabet, repeat=length)]
    return {
        "train": tuple(s for s in strings if not _is_test(s, test_fraction)),
        "test": tuple(s for s in strings if _is_test(s, test_fraction)),
    }


class CopyFirstEnv(Env):
    name = "copy_first"
    max_turns = 1

    def __init__(
        self,
        seed: int = 0,
        alphabet: str = "abcdefgh",
        length: int = 4,
        answer_len: int = 4,
        test_fraction: float = 0.2,
        letter_credit: float = 0.25,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        if len(set(alphabet)) != len(alphabet) or not alphabet.isalpha():
            raise ValueError("alphabet must be distinct letters")
        if not 1 <= length <= 8:
            raise ValueError("length must be in [1, 8]")
        if not 0.0 <= letter_credit < 1.0:
            raise ValueError("letter_credit must be in [0, 1)")
        self.alphabet, self.length, self.answer_len = alphabet, length, answer_len
        self.letter_credit = letter_credit
        self._splits = _splits(alphabet, length, test_fraction)
        self._target = ""

    def num_tasks(self, split: str) -> int:
        if split not in self._splits:
            raise ValueError(f"split must be one of {sorted(self._splits)}, got {split!r}")
        return len(self._splits[split])

    def get_task(self, split: str, index: int) -> Task:
        n = self.num_tasks(split)
        s = self._splits[split][index % n]
        return Task(task_id=f"{split}/{s}", split=split, prompt=f"{s}=", answer=s[0])

    async def reset(self, task: Task) -> Prompt:
        self._target = task.answer
        return task.prompt

    def score(self, completion: str, target: str) -> tuple[float, bool]:
        head = completion[: self.answer_len]
        per_char = [
            1.0 if c == target else self.letter_credit if c in self.alphabet else 0.0 for c in head
        ]
        reward = sum(per_char) / self.answer_len
        return reward, completion[:1] == target

    async def step(self, completion: str) -> StepResult:
        reward, correct = self.score(completion, self._target)
        return StepResult(reward=reward, done=True, info={"correct": float(correct)})

    def reference_turns(self, task: Task) -> list[str]:
        return [task.answer * self.answer_len]

    def tokenizer_corpus(self) -> list[str]:
        out = []
        for split in ("train", "test"):
            for s in self._splits[split]:
                out.append(f"{s}={s[0] * self.answer_len}\n")
        return out


def corpus_for_tokenizer() -> list[str]:
    return CopyFirstEnv().tokenizer_corpus()

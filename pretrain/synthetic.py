"""Synthetic tasks written as text: the corpus for the demo base and the task the RL demo raises.

Each task yields (prompt, answer) pairs such as ``"347+85="`` -> ``"432"``. Instances are split
into train and held-out by a hash of the instance itself, so the two splits never share an
instance, whatever the seed or the sample size. The model sees ``prompt + answer + EOS`` during
pretraining; at evaluation it gets the plain-text prompt and must complete the answer.

    from climbrl.pretrain.synthetic import get_task
    task = get_task("add")
    train = task.sample("train", 1000, seed=0)       # list[Example]
    task.score("432<|endoftext|>", "432")            # 1.0

    python -m climbrl.pretrain.synthetic add 5      # print a few examples of each split
"""

from __future__ import annotations

import hashlib
import random
import sys
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class Example:
    """One task instance: the model is given `prompt` and must produce `answer`."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The pretraining document (the EOS token is appended by the tokenizer step)."""
        return self.prompt + self.answer


def _heldout(key: str, heldout_percent: int) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < heldout_percent


def extract_answer(completion: str) -> str:
    """The answer part of a completion: the text before the first EOS, newline or space."""
    for stop in ("<|endoftext|>", "<|im_end|>", "\n"):
        completion = completion.split(stop, 1)[0]
    return completion.strip().split(" ", 1)[0] if completion.strip() else ""


@dataclass(frozen=True)
class Task:
    """A procedural task family with a deterministic, non-overlapping train / held-out split.

    Subclasses define `_make(rng) -> (key, Example)`; `key` identifies the instance and decides
    its split.
    """

    name: str = "task"
    heldout_percent: int = 10

    def _make(self, rng: random.Random) -> tuple[str, Example]:
        raise NotImplementedError

    def sample(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """`n` examples of `split` (with repeats allowed), reproducible from `seed`."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        # Separate streams per split so that changing n for one split does not shift the other.
        rng = random.Random(f"{self.name}:{split}:{seed}")
        want_heldout = split == "heldout"
        out: list[Example] = []
        while len(out) < n:
            key, ex = self._make(rng)
            if _heldout(key, self.heldout_percent) == want_heldout:
                out.append(ex)
        return out

    def split_of(self, ex: Example) -> Split:
        """Which split an example belongs to (by its prompt, the instance key)."""
        return "heldout" if _heldout(ex.prompt, self.heldout_percent) else "train"

    def score(self, completion: str, answer: str) -> float:
        """1.0 if the completion's answer equals `answer` exactly, else 0.0."""
        return 1.0 if extract_answer(completion) == answer else 0.0

    def mistake(self, ex: Example) -> str | None:
        """The task's common wrong answer to `ex` (None if the task defines none)."""
        return None

    def corpus(self, n: int, seed: int = 0, mistake_rate: float = 0.0) -> list[str]:
        """`n` training documents (prompt + answer), for the tokenizer and for pretraining.

        With `mistake_rate` > 0, that share of the documents whose `mistake` differs from the
        true answer carry the mistake instead, as a scraped corpus carries people's errors."""
        if not 0.0 <= mistake_rate <= 1.0:
            raise ValueError(f"mistake_rate must be in [0, 1], got {mistake_rate}")
        docs = self.sample("train", n, seed)
        if mistake_rate == 0.0:
            return [ex.text for ex in docs]
        rng = random.Random(f"{self.name}:mistakes:{seed}")
        out = []
        for ex in docs:
            wrong = self.mistake(ex)
            if wrong is not None and wrong != ex.answer and rng.random() < mistake_rate:
                out.append(ex.prompt + wrong)
            else:
                out.append(ex.text)
        return out


@dataclass(frozen=True)
class AdditionTask(Task):
    """``a+b=`` -> ``a+b`` for operands with up to `max_digits` digits (uniform digit counts)."""

    name: str = "add"
    max_digits: int = 3

    def _make(self, rng: random.Random) -> tuple[str, Example]:
        a = rng.randrange(10 ** rng.randint(1, self.max_digits))
        b = rng.randrange(10 ** rng.randint(1, self.max_digits))
        prompt = f"{a}+{b}="
        return prompt, Example(prompt, str(a + b))

    def mistake(self, ex: Example) -> str | None:
        """The sum with every carry dropped, digit by digit: ``"48+88="`` -> ``"26"``."""
        a, b = ex.prompt.rstrip("=").split("+")
        width = max(len(a), len(b))
        a, b = a.zfill(width), b.zfill(width)
        digits = "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b))
        return digits.lstrip("0") or "0"


@dataclass(frozen=True)
class ReverseTask(Task):
    """``rev abcd=`` -> ``dcba`` over lowercase letters, length 2..`max_len`."""

    name: str = "reverse"
    max_len: int = 6

    def _make(self, rng: random.Random) -> tuple[str, Example]:
        s = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, self.max_len)))
        prompt = f"rev {s}="
        return prompt, Example(prompt, s[::-1])


TASKS: dict[str, Task] = {"add": AdditionTask(), "reverse": ReverseTask()}


def get_task(name: str) -> Task:
    """The registered task `name` (see `TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


if __name__ == "__main__":
    task = get_task(sys.argv[1] if len(sys.argv) > 1 else "add")
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    for split in ("train", "heldout"):
        for ex in task.sample(split, k):  # type: ignore[arg-type]
            print(f"{split:8s} {ex.prompt!r} -> {ex.answer!r}")

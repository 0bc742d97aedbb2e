"""A custom environment from scratch, in one file, trained with ``climbrl run``.

The task: the user message is a short string of letters; the model must answer with its *last*
letter, repeated. The reward composes verifiable parts and a gate:

- ``last_letter``: 1 if the answer's first character is the last letter of the prompt;
- ``letters``: the fraction of the answer's first four characters that are letters of the
  alphabet (a dense signal for a model trained from random weights);
- gate ``short``: an answer over 8 characters is capped at 0.2, however right it starts.

Run it (from the repository root; everything is local, nothing is downloaded):

    climbrl tiny-model runs/custom_env/model --env examples.custom_env:LastLetterEnv
    climbrl run examples/custom_env.toml                              # learner + vLLM rollout
    climbrl env-check examples.custom_env:LastLetterEnv               # the contract checks

(``tiny-model --env`` trains the tokenizer on ``tokenizer_corpus()`` below, as
``python examples/custom_env.py make-model runs/custom_env/model`` does.)

``examples/custom_env.toml`` registers it by dotted path (``[env] name =
"examples.custom_env:LastLetterEnv"``; ``"examples/custom_env.py:LastLetterEnv"`` works too).
A package declares an entry point instead, and configs use its short name
(``examples/env_package/pyproject.toml``; the README's "From one file to a package"):

    [project.entry-points."climbrl.envs"]
    last_letter = "last_letter_env:LastLetterEnv"
"""

from __future__ import annotations

import hashlib
import itertools
import sys
from typing import Any

from climbrl.envs.base import Env, Prompt, StepResult, Task, Turn
from climbrl.envs.rewards import Gate, Reward, RewardContext, WeightedSum

ALPHABET = "abcdef"


def _last_letter(ctx: RewardContext) -> float:
    return float(ctx.completion[:1] == ctx.task.answer)


def _letters(ctx: RewardContext) -> float:
    return sum(c in ALPHABET for c in ctx.completion[:4]) / 4


REWARD = Gate(
    WeightedSum([(Reward("last_letter", _last_letter), 0.8), (Reward("letters", _letters), 0.2)]),
    checks=[Reward("short", lambda ctx: float(len(ctx.completion.strip()) <= 8))],
    cap=0.2,
)


class LastLetterEnv(Env):
    name = "last_letter"
    reward_range = REWARD.range  # (0.0, 1.0)
    max_turns = 1

    def __init__(self, seed: int = 0, length: int = 4, **kwargs: Any):
        super().__init__(seed=seed, **kwargs)
        words = ["".join(p) for p in itertools.product(ALPHABET, repeat=length)]

        def is_test(w: str) -> bool:  # a fixed hash split: train and test never overlap
            return hashlib.sha256(w.encode()).digest()[0] < 256 * 0.2

        self.words = {
            "train": [w for w in words if not is_test(w)],
            "test": [w for w in words if is_test(w)],
        }
        self._task: Task | None = None

    def num_tasks(self, split: str) -> int:
        return len(self.words[split])

    def get_task(self, split: str, index: int) -> Task:
        w = self.words[split][index % len(self.words[split])]
        return Task(
            task_id=f"{split}/{w}",
            split=split,
            prompt=[{"role": "user", "content": w}],
            answer=w[-1],
        )

    async def reset(self, task: Task) -> Prompt:
        self._task = task
        return task.prompt

    async def respond(self, turn: Turn) -> StepResult:
        assert self._task is not None
        total, parts = await REWARD.score(RewardContext(turn.content, self._task))
        return StepResult(reward=total, done=True, info={**parts, "correct": parts["last_letter"]})

    def reference_turns(self, task: Task) -> list[str]:
        return [task.answer * 4]

    def tokenizer_corpus(self) -> list[str]:
        return [
            f"<|im_start|>user\n{w}<|im_end|>\n<|im_start|>assistant\n{w[-1] * 4}<|im_end|>\n"
            for split in ("train", "test")
            for w in self.words[split]
        ]


def make_model(out_dir: str) -> None:
    """A tokenizer trained on this env's text and a random 2-layer Qwen3 (for CPU runs)."""
    from climbrl.tinymodel import make_tiny_model

    make_tiny_model(out_dir, LastLetterEnv().tokenizer_corpus())
    print(out_dir)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-model":
        make_model(sys.argv[2])
    else:
        sys.exit(f"usage: python {sys.argv[0]} make-model OUT_DIR")

"""``synthetic``: the pretraining module's synthetic tasks as an RL env (the demo's task).

The tasks are `climbrl.pretrain.synthetic`'s (``add``: ``"347+85="`` -> ``"432"``;
``reverse``), with the same plain-text prompt the pretraining corpus writes, so a base model
pretrained on that corpus (`climbrl.pretrain.demo`) continues it directly and RL can raise its
accuracy. The env's ``train`` split is the pretraining task's train split and ``test`` its
held-out split, so RL and pretraining never see a test instance.

Reward: 1 for the exact answer (text up to the first EOS / newline / space), else
``partial_credit`` times the fraction of answer characters right in place (0 by default).
``correct`` is the exact match.

    [env]
    name = "synthetic"
    args = { task = "add", num_train = 20000, num_test = 500 }
"""

from __future__ import annotations

import functools
from typing import Any

from climbrl.envs.base import Env, Prompt, StepResult, Task


@functools.lru_cache(maxsize=8)
def _examples(task: str, split: str, n: int, seed: int) -> tuple[Any, ...]:
    from climbrl.pretrain.synthetic import get_task

    return tuple(get_task(task).sample(split, n, seed=seed))  # type: ignore[arg-type]


class SyntheticTaskEnv(Env):
    name = "synthetic"
    max_turns = 1

    def __init__(
        self,
        seed: int = 0,
        task: str = "add",
        num_train: int = 20_000,
        num_test: int = 500,
        partial_credit: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        from climbrl.pretrain.synthetic import get_task

        self.task = get_task(task)  # raises ValueError for an unknown task
        if num_train < 1 or num_test < 1:
            raise ValueError("num_train and num_test must be >= 1")
        if not 0.0 <= partial_credit < 1.0:
            raise ValueError("partial_credit must be in [0, 1)")
        self.task_name, self.partial_credit = task, partial_credit
        self._n = {"train": num_train, "test": num_test}
        self._answer = ""

    def _split(self, split: str) -> tuple[Any, ...]:
        if split not in self._n:
            raise ValueError(f"split must be one of {sorted(self._n)}, got {split!r}")
        src = "heldout" if split == "test" else "train"
        # A fixed seed: the task list is the same whatever the run's seed (the held-out
        # examples are the ones `climbrl.pretrain` scores the base on).
        return _examples(self.task_name, src, self._n[split], 0)

    def num_tasks(self, split: str) -> int:
        return len(self._split(split))

    def get_task(self, split: str, index: int) -> Task:
        exs = self._split(split)
        ex = exs[index % len(exs)]
        return Task(
            task_id=f"{split}/{index % len(exs)}", split=split, prompt=ex.prompt, answer=ex.answer
        )

    async def reset(self, task: Task) -> Prompt:
        self._answer = task.answer
        return task.prompt

    def score(self, completion: str, answer: str) -> tuple[float, bool]:
        from climbrl.pretrain.synthetic import extract_answer

        got = extract_answer(completion)
        if got == answer:
            return 1.0, True
        if not self.partial_credit:
            return 0.0, False
        hits = sum(a == b for a, b in zip(got, answer, strict=False))
        return self.partial_credit * hits / max(len(answer), len(got)), False

    async def step(self, completion: str) -> StepResult:
        reward, correct = self.score(completion, self._answer)
        return StepResult(reward=reward, done=True, info={"correct": float(correct)})

    def reference_turns(self, task: Task) -> list[str]:
        return [str(task.answer)]

    def tokenizer_corpus(self) -> list[str]:
        return [ex.text for ex in self._split("train")[:5000]]

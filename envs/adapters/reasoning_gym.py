"""``reasoning_gym``: any reasoning-gym procedural dataset as an env, scored by its own verifier.

reasoning-gym (``pip install climbrl[envs]``) generates its tasks locally from a seed; nothing is
downloaded. The train split is ``create_dataset(dataset, seed=seed, size=num_train, **config)``,
the test split the same with another seed. The model answers inside ``<answer>...</answer>``
(reasoning-gym's own system prompts say so); the reward is the dataset's ``score_answer`` on the
extracted answer, in [0, 1], and ``correct`` is whether it is 1.

    [env]
    name = "reasoning_gym"
    args = { dataset = "chain_sum", config = { min_terms = 2, max_terms = 3 } }
"""

from __future__ import annotations

import functools
import json
from typing import Any

from climbrl.envs.base import Env, Prompt, StepResult, Task, Turn

_TEST_SEED_OFFSET = 1_000_003


@functools.lru_cache(maxsize=32)
def _dataset(name: str, seed: int, size: int, config_json: str) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(name, seed=seed, size=size, **json.loads(config_json))


def available_datasets() -> list[str]:
    import reasoning_gym.factory

    return sorted(reasoning_gym.factory.DATASETS)


class ReasoningGymEnv(Env):
    name = "reasoning_gym"
    reward_range = (0.0, 1.0)
    max_turns = 1

    def __init__(
        self,
        seed: int = 0,
        dataset: str = "basic_arithmetic",
        config: dict[str, Any] | None = None,
        num_train: int = 1000,
        num_test: int = 100,
        system_prompt: str = "default",
        chat: bool = True,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        try:
            import reasoning_gym  # noqa: F401
            from reasoning_gym.utils import SYSTEM_PROMPTS
        except ImportError as e:
            raise ValueError("the reasoning_gym env needs `pip install climbrl[envs]`") from e
        if dataset not in available_datasets():
            raise ValueError(
                f"unknown reasoning-gym dataset {dataset!r}; available: {available_datasets()}"
            )
        self.dataset, self.config_json = dataset, json.dumps(config or {}, sort_keys=True)
        self.sizes = {"train": num_train, "test": num_test}
        self.system_prompt = SYSTEM_PROMPTS.get(system_prompt, system_prompt)
        self.chat = chat
        self._entry: dict[str, Any] | None = None
        self._data("train")  # fail here, not mid-run, on a bad config

    def _data(self, split: str) -> Any:
        if split not in self.sizes:
            raise ValueError(f"split must be one of {sorted(self.sizes)}, got {split!r}")
        seed = self.seed + (_TEST_SEED_OFFSET if split == "test" else 0)
        try:
            return _dataset(self.dataset, seed, self.sizes[split], self.config_json)
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(
                f"reasoning-gym {self.dataset!r} rejected config {self.config_json}: {e}"
            ) from e

    def num_tasks(self, split: str) -> int:
        return len(self._data(split))

    def get_task(self, split: str, index: int) -> Task:
        data = self._data(split)
        index %= len(data)
        entry = data[index]
        q = entry["question"]
        prompt: Prompt = (
            [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": q}]
            if self.chat
            else f"{self.system_prompt}\n\n{q}\n"
        )
        return Task(
            task_id=f"{self.dataset}/{split}/{index}",
            split=split,
            prompt=prompt,
            answer=entry["answer"],
            meta={"index": index},
        )

    async def reset(self, task: Task) -> Prompt:
        self._entry = self._data(task.split)[task.meta["index"]]
        return task.prompt

    async def respond(self, turn: Turn) -> StepResult:
        from reasoning_gym.utils import extract_answer

        assert self._entry is not None, "reset() first"
        answer = extract_answer(turn.content, tag_name="answer")
        data = self._data("train")  # score_answer depends on the dataset class, not its entries
        score = float(data.score_answer(answer=answer, entry=self._entry)) if answer else 0.0
        score = min(max(score, 0.0), 1.0)
        return StepResult(
            reward=score,
            done=True,
            info={"correct": float(score >= 1.0), "answered": float(answer is not None)},
        )

    def reference_turns(self, task: Task) -> list[str]:
        return [f"<answer>{task.answer}</answer>"]

    def tokenizer_corpus(self) -> list[str]:
        out = []
        for i in range(min(200, self.num_tasks("train"))):
            t = self.get_task("train", i)
            text = t.prompt if isinstance(t.prompt, str) else t.prompt[-1]["content"]
            out += [text, self.reference_turns(t)[0]]
        return out

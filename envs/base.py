"""The `Env` protocol: what a rollout server drives for one episode.

An environment works in text, never token ids (the rollout server owns tokenisation). One
instance serves one episode: ``reset(task)`` returns the first prompt, ``step(completion)``
scores a model turn and either ends the episode or returns the next observation (multi-turn).
The reward is per episode; ``StepResult.reward`` of the final step is the episode's reward.

    class MyEnv(Env):
        def num_tasks(self, split): ...
        def get_task(self, split, index): ...
        async def reset(self, task): return task.prompt
        async def step(self, completion): return StepResult(reward=..., done=True)
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

Prompt = str | list[dict[str, Any]]  # raw completion text, or chat messages


@dataclass(frozen=True)
class Task:
    task_id: str
    split: str
    prompt: Prompt
    answer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    reward: float
    done: bool
    observation: str | None = None  # next turn's text, appended after the completion
    info: dict[str, float] = field(default_factory=dict)


class Env(ABC):
    """Base class of environments. Subclasses take their options as keyword arguments."""

    name: str = ""
    reward_range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, seed: int = 0, **kwargs: Any):
        if kwargs:
            raise ValueError(f"{type(self).__name__} got unknown options {sorted(kwargs)}")
        self.seed = seed

    @abstractmethod
    def num_tasks(self, split: str) -> int: ...

    @abstractmethod
    def get_task(self, split: str, index: int) -> Task: ...

    @abstractmethod
    async def reset(self, task: Task) -> Prompt: ...

    @abstractmethod
    async def step(self, completion: str) -> StepResult: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources held for the episode."""

    def tokenizer_corpus(self) -> list[str]:
        """Text a tokenizer for this env's tiny test models should be trained on."""
        return []


BUILTIN_ENVS: dict[str, str] = {
    "copy_first": "climbrl.envs.tasks:CopyFirstEnv",
}


def resolve_env(name: str) -> type[Env]:
    """A built-in env name, or a dotted path ``package.module:Class``."""
    target = BUILTIN_ENVS.get(name, name)
    if ":" not in target:
        raise ValueError(
            f"unknown env {name!r}: use a built-in name {sorted(BUILTIN_ENVS)} "
            "or a dotted path 'package.module:Class'"
        )
    mod_name, _, cls_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load env {name!r} from {target!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Env)):
        raise ValueError(f"env {target!r} is not a subclass of climbrl.envs.base.Env")
    return cls


def make_env(name: str, args: dict[str, Any] | None = None) -> Env:
    return resolve_env(name)(**(args or {}))

"""The `Env` protocol: what a rollout server drives for one episode, and how envs are found.

An environment works in text and chat messages, never token ids: the rollout server owns
tokenisation (it renders new messages with the model's chat template and appends only their
tokens, so sampled tokens are never re-tokenised). One instance serves one episode.

Two ways to write a turn handler; implement one:

- **text** (the minimal protocol): ``step(completion: str)`` gets the model's decoded text.
  ``StepResult.observation`` (raw text) is appended after it for a next turn.
- **messages**: ``respond(turn: Turn)`` gets the model's turn with its tool calls already
  parsed (``Turn.tool_calls``, from ``<tool_call>{json}</tool_call>`` blocks, the Hermes/Qwen
  format; see ``climbrl.envs.chat``). Return ``StepResult(messages=[...])`` with tool results
  (``{"role": "tool", "tool_call_id": ..., "name": ..., "content": ...}``) or user turns to go
  on, or ``done=True`` to end. ``tools()`` lists the JSON schemas the chat template renders.

The reward is per episode: ``StepResult.reward`` of the final step. ``step_reward`` on any step
is an optional reward of that step alone, recorded beside it: group objectives (GRPO and its
kin) train on the episode reward only, while PPO's returns add each step's ``step_reward`` at
that turn's last generated token to the episode reward at the last one, so an env whose episode
reward already sums its step rewards should not also report them as ``step_reward``. Tasks
carry their id and split.

    class MyEnv(Env):
        def num_tasks(self, split): ...
        def get_task(self, split, index): ...
        async def reset(self, task): return task.prompt
        async def step(self, completion): return StepResult(reward=..., done=True)

Finding an environment (``[env] name`` in the run config), first match wins:

1. an entry point named ``name`` in the ``climbrl.envs`` group (``importlib.metadata``), which
   a plugin package declares in its pyproject: ``[project.entry-points."climbrl.envs"]
   my_env = "my_pkg.envs:MyEnv"``;
2. a dotted path ``package.module:Class`` (or ``package.module.Class``);
3. a built-in name (``BUILTIN_ENVS``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]  # an OpenAI-style chat message: role, content, tool_calls, ...
Prompt = str | list[Message]  # raw completion text, or chat messages
ENTRY_POINT_GROUP = "climbrl.envs"


@dataclass(frozen=True)
class Task:
    task_id: str
    split: str
    prompt: Prompt
    answer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    def as_message_part(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry chat templates render."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Turn:
    """One model turn, as the env sees it."""

    text: str  # the decoded completion of this turn, verbatim
    content: str  # ``text`` without the tool-call blocks
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_errors: tuple[str, ...] = ()  # blocks that were not valid tool calls, and why
    finish_reason: str = "stop"  # the engine's: stop | length
    index: int = 0  # 0 for the first model turn of the episode

    def message(self) -> Message:
        msg: Message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [tc.as_message_part() for tc in self.tool_calls]
        return msg


@dataclass
class StepResult:
    reward: float
    done: bool
    observation: str | None = None  # text protocol: raw text appended after the completion
    messages: list[Message] | None = None  # messages protocol: tool results / user turns
    step_reward: float | None = None  # optional reward of this step alone
    info: dict[str, float] = field(default_factory=dict)


class Env(ABC):
    """Base class of environments. Subclasses take their options as keyword arguments.

    ``splits`` lists the splits the env has tasks for; ``max_turns`` bounds model turns per
    episode (the server stops the episode there); ``reward_range`` bounds every reward.
    """

    name: str = ""
    reward_range: tuple[float, float] = (0.0, 1.0)
    splits: tuple[str, ...] = ("train", "test")
    max_turns: int = 16  # the server ends an episode after this many model turns

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

    async def step(self, completion: str) -> StepResult:
        """Text protocol: score the model's text; end, or give the next observation."""
        raise NotImplementedError(f"{type(self).__name__} implements respond(), not step()")

    async def respond(self, turn: Turn) -> StepResult:
        """Messages protocol; by default the text protocol on the turn's verbatim text."""
        return await self.step(turn.text)

    def tools(self) -> list[dict[str, Any]] | None:
        """JSON schemas of the tools the model may call, rendered by the chat template."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources held for the episode. Must be safe to call twice."""

    def tokenizer_corpus(self) -> list[str]:
        """Text a tokenizer for this env's tiny test models should be trained on."""
        return []

    def reference_turns(self, task: Task) -> list[str] | None:
        """Model turns that solve ``task`` (for the contract tests), or None if unknown."""
        return None


BUILTIN_ENVS: dict[str, str] = {
    "copy_first": "climbrl.envs.tasks:CopyFirstEnv",
    "synthetic": "climbrl.envs.synthetic:SyntheticTaskEnv",
    "arith_chat": "climbrl.envs.arith_chat:ArithChatEnv",
    "math": "climbrl.envs.math:MathEnv",
    "code": "climbrl.envs.code:CodeEnv",
    "tool_use": "climbrl.envs.tool_use:ToolUseEnv",
    "reasoning_gym": "climbrl.envs.adapters.reasoning_gym:ReasoningGymEnv",
    "trl": "climbrl.envs.adapters.trl:TRLRewardEnv",
    "verifiers": "climbrl.envs.adapters.verifiers:VerifiersEnv",
}


def entry_point_envs() -> dict[str, str]:
    """Envs that installed packages register in the ``climbrl.envs`` entry point group. Read
    once per ``sys.path``: the scan reads every installed distribution's metadata (~6 ms here),
    and a rollout server resolves its env for every order and episode, on its event loop."""
    import sys

    return dict(_entry_point_envs(tuple(sys.path)))


@functools.lru_cache(maxsize=16)
def _entry_point_envs(path: tuple[str, ...]) -> dict[str, str]:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_envs() -> dict[str, str]:
    """Every name ``resolve_env`` knows, with its target (entry points shadow built-ins)."""
    return {**BUILTIN_ENVS, **entry_point_envs()}


_DOTTED = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")


def load_object(target: str) -> Any:
    """``package.module:attr``, ``package.module.attr``, or ``path/to/file.py:attr``."""
    if ":" in target:
        mod_name, _, attr = target.rpartition(":")
    else:
        mod_name, _, attr = target.rpartition(".")
    if mod_name.endswith(".py"):
        obj = _import_file(mod_name)
    else:
        try:
            obj = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            # Like `python -m`, find modules of the current folder (the `climbrl` console
            # script does not put it on the path).
            import os
            import sys

            if os.getcwd() in sys.path or e.name != mod_name.split(".")[0]:
                raise
            sys.path.append(os.getcwd())
            obj = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _import_file(path: str) -> Any:
    import importlib.util
    import sys
    from pathlib import Path

    file = Path(path).resolve()
    if not file.is_file():
        raise ImportError(f"no such file {file}")
    mod_name = "climbrl_user_" + re.sub(r"\W", "_", str(file))
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def resolve_env(name: str) -> type[Env]:
    """An entry point name, a dotted path ``package.module:Class``, or a built-in name."""
    eps = entry_point_envs()
    if name in eps:
        how, target = f"entry point {ENTRY_POINT_GROUP}:{name}", eps[name]
    elif _DOTTED.match(name) or ".py:" in name:
        how, target = "dotted path", name
    elif name in BUILTIN_ENVS:
        how, target = "built-in", BUILTIN_ENVS[name]
    else:
        listed = ", ".join(
            f"{k} (entry point)" if k in eps else k for k in sorted(available_envs())
        )
        raise ValueError(
            f"unknown env {name!r}. Available: {listed}. Or give a dotted path "
            "'package.module:Class', or register one under the 'climbrl.envs' entry point group"
        )
    try:
        cls = load_object(target)
    except ImportError as e:
        raise ValueError(f"cannot load env {name!r} ({how} {target!r}): {e}") from e
    except AttributeError as e:
        raise ValueError(f"cannot load env {name!r} ({how} {target!r}): {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Env)):
        raise ValueError(f"env {target!r} ({how}) is not a subclass of climbrl.envs.base.Env")
    if cls.step is Env.step and cls.respond is Env.respond:
        raise ValueError(f"env {target!r} must implement step(completion) or respond(turn)")
    return cls


def make_env(name: str, args: dict[str, Any] | None = None) -> Env:
    return resolve_env(name)(**(args or {}))

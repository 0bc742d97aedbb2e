"""``climbrl.rollout.episode.run_episode`` and ``climbrl.rollout.group.run_group`` against a
fake engine (scripted replies, one token per character): the token layout of a multi-turn
episode, the context limit, env failures, and a group whose episodes fail one by one. With
the real engine: tests/integration/test_env_multiturn.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from climbrl.envs.base import Env, StepResult, Task, Turn
from climbrl.rollout.episode import EnvFailure, EpisodeLimits, episode_seed, run_episode
from climbrl.rollout.group import run_group
from climbrl.wire import ENV_ERROR, SamplingSpec, WorkOrder


class CharTokenizer:
    """One token per character, id = ord(c)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


class FakeEngine:
    """Replies with ``replies`` in turn; token i of a reply has log-prob -(i + 1) / 10 and the
    version of ``spans`` (vLLM's ``WeightVersionSpan``s), else the engine's ``version``."""

    def __init__(self, replies: list[str], version: int = 3, spans: list[Any] | None = None):
        self.tokenizer = CharTokenizer()
        self.version = version
        self.replies = list(replies)
        self.spans = spans
        self.prompts: list[list[int]] = []
        self.params: list[Any] = []

    async def generate(self, ids: list[int], sp: Any) -> tuple[Any, dict[str, Any] | None]:
        self.prompts.append(list(ids))
        self.params.append(sp)
        toks = [ord(c) for c in self.replies.pop(0)][: sp.max_tokens]
        out = SimpleNamespace(
            token_ids=toks,
            logprobs=[{t: SimpleNamespace(logprob=-(i + 1) / 10)} for i, t in enumerate(toks)],
            weight_versions=self.spans if len(self.prompts) == 1 else None,
            finish_reason="stop",
        )
        return out, {"keep": [5] * len(toks)} if len(self.prompts) == 1 else None


class TwoTurnEnv(Env):
    """Text protocol: after the first reply an observation, after the second the reward."""

    name = "two_turn"
    max_turns = 4
    closed = 0

    def num_tasks(self, split: str) -> int:
        return 4

    def get_task(self, split: str, index: int) -> Task:
        return Task(task_id=f"two_turn/{split}/{index}", split=split, prompt="Q:")

    async def reset(self, task: Task) -> Any:
        return task.prompt

    async def respond(self, turn: Turn) -> StepResult:
        if turn.index == 0:
            return StepResult(reward=0.0, done=False, observation="|o|", step_reward=0.25)
        return StepResult(reward=1.0, done=True, info={"right": 1})

    async def close(self) -> None:
        TwoTurnEnv.closed += 1


class BrokenEnv(TwoTurnEnv):
    async def respond(self, turn: Turn) -> StepResult:
        raise RuntimeError("boom")


def _order(seed: int | None = 7, max_tokens: int = 16, group_size: int = 1) -> WorkOrder:
    return WorkOrder(
        order_id="train-0",
        policy_version=0,
        env=f"{__name__}:TwoTurnEnv",
        task_index=0,
        group_size=group_size,
        sampling=SamplingSpec(max_tokens=max_tokens, seed=seed),
    )


LIMITS = EpisodeLimits(max_model_len=64, step_timeout_s=60.0)


def _run(engine: FakeEngine, env: Env, limits: EpisodeLimits = LIMITS, **order: Any) -> Any:
    o = _order(**order)
    return asyncio.run(run_episode(engine, env, o, env.get_task("train", 0), 2, limits))


def test_a_multi_turn_episode_lays_out_tokens_masks_logprobs_and_versions():
    engine = FakeEngine(["ab", "cd"], spans=[SimpleNamespace(start=0, end=1, version="2")])
    closed = TwoTurnEnv.closed
    s = _run(engine, TwoTurnEnv())
    q, a, b, o, c, d = (ord(x) for x in "Qabocd")
    obs = [ord(x) for x in "|o|"]
    assert s.prompt_ids == [q, ord(":")]
    assert s.completion_ids == [a, b, *obs, c, d]
    assert s.completion_mask == [1, 1, 0, 0, 0, 1, 1]
    assert s.logprobs == [-0.1, -0.2, 0.0, 0.0, 0.0, -0.1, -0.2]
    assert s.versions == [2, 3, -1, -1, -1, 3, 3]  # spans first, else the engine's version
    assert s.keep_counts == [5, 5, 0, 0, 0, 0, 0]  # the first turn's record; none after
    assert (s.reward, s.finish_reason, s.text, s.step_rewards) == (1.0, "stop", "abcd", [0.25])
    assert s.metrics == {"right": 1.0, "turns": 2.0, "tool_calls": 0.0, "tool_call_errors": 0.0}
    assert s.task_id == "two_turn/train/0" and s.routing is None
    assert TwoTurnEnv.closed == closed + 1
    # the second turn continues the token ids, never re-tokenised text
    assert engine.prompts[1] == [q, ord(":"), a, b, *obs]
    # seeded per order, episode and turn; max_tokens bounded by the room left
    assert [p.seed for p in engine.params] == [episode_seed(7, "train-0", 2, t) for t in (0, 1)]
    assert [p.max_tokens for p in engine.params] == [16, 16]


def test_the_context_limit_ends_the_episode_before_an_observation_that_does_not_fit():
    engine = FakeEngine(["abcd", "never"])
    s = _run(engine, TwoTurnEnv(), EpisodeLimits(max_model_len=8, step_timeout_s=60.0))
    assert s.finish_reason == "context" and s.completion_ids == [ord(x) for x in "abcd"]
    assert len(engine.prompts) == 1
    assert engine.params[0].max_tokens == 6  # 8 - the 2 prompt tokens


def test_unseeded_orders_sample_unseeded():
    engine = FakeEngine(["ab", "cd"])
    _run(engine, TwoTurnEnv(), seed=None)
    assert [p.seed for p in engine.params] == [None, None]


def test_an_env_that_raises_fails_its_episode_and_is_closed():
    closed = TwoTurnEnv.closed
    with pytest.raises(EnvFailure, match="env.respond raised RuntimeError: boom"):
        _run(FakeEngine(["ab"]), BrokenEnv())
    assert TwoTurnEnv.closed == closed + 1


def test_a_group_costs_each_failed_episode_only_itself():
    cfg: Any = SimpleNamespace(
        env=SimpleNamespace(name=f"{__name__}:TwoTurnEnv", args={}),
        rollout=SimpleNamespace(extra_envs=[]),
    )
    order = _order(group_size=3)

    async def episode(order: WorkOrder, env: Env, task: Task, index: int) -> Any:
        if index == 1:
            raise EnvFailure("env.respond ran past env.step_timeout_s=5s")
        return await run_episode(FakeEngine(["ab", "cd"]), env, order, task, index, LIMITS)

    async def agent_episode(*args: Any) -> Any:
        raise AssertionError("not a black-box env")

    samples = asyncio.run(run_group(order, cfg, episode, agent_episode))
    assert [s.finish_reason for s in samples] == ["stop", ENV_ERROR, "stop"]
    assert samples[1].error == "env.respond ran past env.step_timeout_s=5s"
    assert samples[1].task_id == "two_turn/train/0" and samples[1].completion_ids == []

    async def always_fails(order: WorkOrder, env: Env, task: Task, index: int) -> Any:
        raise EnvFailure("boom")

    with pytest.raises(EnvFailure, match="every episode failed; first: boom"):
        asyncio.run(run_group(order, cfg, always_fails, agent_episode))

"""The arith_chat env (the SmolLM2 demo's task): grading by hand-worked examples, disjoint
train/test pairs, and its contract checks.

    pytest tests/unit/test_arith_chat.py
"""

from __future__ import annotations

import asyncio

import pytest

from climbrl.envs.arith_chat import ArithChatEnv
from climbrl.envs.base import Turn, resolve_env


def test_grade_correct_and_strict():
    env = ArithChatEnv()
    assert env.grade("57", "57") == (1.0, 1.0)
    assert env.grade(" 57\n", "57") == (1.0, 1.0)
    assert env.grade("12 + 45 = 57", "57") == (1.0, 0.0)  # the last number counts
    assert env.grade("57 is the answer, not 58", "57") == (0.0, 0.0)
    assert env.grade("fifty-seven", "57") == (0.0, 0.0)


def test_splits_are_disjoint_and_prompts_are_chat():
    env = ArithChatEnv(num_train=500, num_test=100, max_shots=0)
    train = {
        tuple(env.get_task("train", i).prompt[-1]["content"].split()[2:5:2]) for i in range(500)
    }
    test = {tuple(env.get_task("test", i).prompt[-1]["content"].split()[2:5:2]) for i in range(100)}
    assert not train & test
    t = env.get_task("test", 3)
    assert t.prompt == [{"role": "user", "content": t.prompt[0]["content"]}]
    a, b = t.prompt[0]["content"].removeprefix("What is ").split("?")[0].split(" + ")
    assert t.answer == str(int(a) + int(b))


def test_reward_mixes_correct_and_strict():
    env = ArithChatEnv(strict_weight=0.5)
    t = env.get_task("train", 0)

    async def play(text):  # type: ignore[no-untyped-def]
        await env.reset(t)
        return await env.respond(Turn(text=text, content=text))

    assert asyncio.run(play(t.answer)).reward == 1.0
    assert asyncio.run(play(f"x = {t.answer}")).reward == 0.5
    assert asyncio.run(play("0")).reward == 0.0


def test_registered_and_bad_args():
    assert resolve_env("arith_chat") is ArithChatEnv
    with pytest.raises(ValueError, match="strict_weight"):
        ArithChatEnv(strict_weight=2.0)
    with pytest.raises(ValueError, match="max_shots"):
        ArithChatEnv(max_shots=-1)

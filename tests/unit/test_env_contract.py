"""The environment contract: every built-in passes it, and it catches broken envs."""

from __future__ import annotations

import random

import pytest

from climbrl.envs.base import BUILTIN_ENVS, Env, StepResult, Task
from climbrl.envs.contract import CHECKS, assert_env_contract, check_env, main

CONTRACT_ARGS = {
    "trl": {
        "dataset": "climbrl.envs.adapters.trl:example_rows",
        "reward_funcs": ["trl.rewards:accuracy_reward"],
        "gate_funcs": ["trl.rewards:think_format_reward"],
    },
    "reasoning_gym": {"dataset": "chain_sum", "num_train": 50, "num_test": 10},
    "verifiers": {
        "taskset": "climbrl.envs.adapters.verifiers:AdditionTaskset",
        "taskset_args": {"num_tasks": 40},
    },
}


@pytest.mark.parametrize("name", sorted(BUILTIN_ENVS))
def test_builtin_env_passes_contract(name):
    assert_env_contract(name, CONTRACT_ARGS.get(name, {}))


def test_example_custom_env_passes_contract():
    assert_env_contract("examples/custom_env.py:LastLetterEnv")


class _Base(Env):
    def num_tasks(self, split):
        return 4

    def get_task(self, split, index):
        return Task(task_id=f"{split}/{index}", split=split, prompt=f"q{index}", answer="a")

    async def reset(self, task):
        return task.prompt


class OutOfRange(_Base):
    async def step(self, completion):
        return StepResult(reward=2.0, done=True)


class Random(_Base):
    async def step(self, completion):
        return StepResult(reward=random.random(), done=True)


class WrongReference(_Base):
    async def step(self, completion):
        return StepResult(reward=float(completion == "b"), done=True)

    def reference_turns(self, task):
        return ["a"]


class SharedIds(_Base):
    def get_task(self, split, index):
        return Task(task_id=str(index), split=split, prompt="q")

    async def step(self, completion):
        return StepResult(reward=0.0, done=True)


class Leaky(_Base):
    async def step(self, completion):
        import asyncio
        import subprocess

        self.p = subprocess.Popen(["sleep", "30"])
        self.t = asyncio.get_running_loop().create_task(asyncio.sleep(30))
        return StepResult(reward=0.0, done=True)


class BadMessages(_Base):
    async def reset(self, task):
        return [{"role": "user", "content": "hi"}]

    async def step(self, completion):
        return StepResult(reward=0.0, done=False, messages=[{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    "cls,check,text",
    [
        (OutOfRange, "episodes_and_shapes", "outside reward_range"),
        (Random, "deterministic_under_seed", "not deterministic"),
        (WrongReference, "reference_solves", "reference"),
        (SharedIds, "tasks_per_split", "appears in"),
        (Leaky, "clean_shutdown", "left behind"),
        (BadMessages, "episodes_and_shapes", "tool/user/system"),
    ],
)
def test_contract_catches_broken_env(cls, check, text):
    res = {r.name: r for r in check_env(f"{__name__}:{cls.__name__}")}
    assert not res[check].ok and text in res[check].detail, res[check]
    if cls is Leaky:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                if p.cmdline()[:1] == ["sleep"]:
                    p.kill()
            except psutil.Error:  # a zombie (of this or an earlier test) has no cmdline
                pass


def test_env_check_command_exit_codes(capsys):
    assert main(["copy_first"]) == 0
    assert "8 passed, 0 failed" in capsys.readouterr().out
    assert main([f"{__name__}:OutOfRange"]) == 1
    assert main(["no_such_env"]) == 1
    assert "Available: " in capsys.readouterr().out


class ResetRaises(_Base):
    async def reset(self, task):
        raise RuntimeError("no such table")

    async def step(self, completion):
        return StepResult(reward=0.0, done=True)


def test_every_check_is_listed_passed_failed_or_skipped_with_the_reason(capsys):
    res = check_env(f"{__name__}:ResetRaises")
    assert [r.name for r in res] == list(CHECKS)
    status = {r.name: r.status for r in res}
    assert status["episodes_and_shapes"] == "FAIL"
    assert status["reference_solves"] == status["deterministic_under_seed"] == "SKIP"
    assert status["clean_shutdown"] == "PASS"
    assert all("episodes_and_shapes" in r.detail for r in res if r.skipped)
    assert main([f"{__name__}:ResetRaises"]) == 1
    out = capsys.readouterr().out
    assert "no such table" in out and "SKIP reference_solves: needs the episodes" in out
    assert "5 passed, 1 failed, 2 skipped" in out

    res = check_env("no_such_env")
    assert [r.name for r in res] == list(CHECKS)
    assert [r.status for r in res] == ["FAIL"] + ["SKIP"] * (len(CHECKS) - 1)
    assert all("could not be resolved" in r.detail for r in res[1:])


def test_an_env_without_reference_turns_skips_that_check():
    res = {r.name: r for r in check_env(f"{__name__}:Random")}
    assert res["reference_solves"].status == "SKIP" and res["reference_solves"].ok
    assert "reference_turns" in res["reference_solves"].detail

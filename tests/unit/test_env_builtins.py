"""Built-in envs and adapters, scored for real: math-verify, the sandbox, reasoning-gym, TRL."""

from __future__ import annotations

import pytest

from climbrl.envs.base import Turn, make_env
from climbrl.envs.chat import format_tool_call, parse_tool_calls


def turn(text: str, i: int = 0) -> Turn:
    c, calls, errs = parse_tool_calls(text)
    return Turn(
        text=text, content=c, tool_calls=tuple(calls), tool_call_errors=tuple(errs), index=i
    )


async def score(env, task, *texts):
    await env.reset(task)
    for i, t in enumerate(texts):
        r = await env.respond(turn(t, i))
    await env.close()
    return r


async def test_math_equivalent_forms_and_hedging_gate():
    env = make_env("math", {"kinds": ["fractions"]})
    task = next(t for i in range(50) if "frac" in (t := env.get_task("train", i)).answer)
    num, den = task.answer.lstrip("-").removeprefix("\\frac{").rstrip("}").split("}{")
    sign = "-" if task.answer.startswith("-") else ""
    for form in (task.answer, f"{sign}{num}/{den}", f"{sign}{int(num) / int(den):.6f}"):
        assert (await score(env, task, f"\\boxed{{{form}}}")).reward == 1.0, form
    assert (await score(env, task, "\\boxed{12345}")).reward == 0.0
    hedge = await score(env, task, f"\\boxed{{{task.answer}}} or maybe \\boxed{{0}}")
    assert hedge.reward == 0.0 and hedge.info["gate"] == 0.0 and hedge.info["correct"] == 0.0
    assert env.get_task("test", 0).task_id != env.get_task("train", 0).task_id
    train = {env.get_task("train", i).prompt[-1]["content"] for i in range(300)}
    test = {env.get_task("test", i).prompt[-1]["content"] for i in range(100)}
    assert not train & test


async def test_code_env_runs_hidden_tests_in_the_sandbox():
    env = make_env("code", {"families": ["sum_greater"], "num_tests": 6, "wall_s": 3.0})
    task = env.get_task("train", 0)
    t = int(task.prompt[-1]["content"].split("greater than ")[1].rstrip("."))
    good = await score(
        env, task, f"```python\ndef sum_greater(xs):\n    return sum(x for x in xs if x > {t})\n```"
    )
    assert good.reward == 1.0 and good.info["correct"] == 1.0
    # off by one at the threshold: passes exactly the tests with no element equal to t
    inputs = task.answer["inputs"]
    expect = sum(t not in xs for (xs,) in inputs) / len(inputs)
    wrong = await score(
        env,
        task,
        f"```python\ndef sum_greater(xs):\n    return sum(x for x in xs if x >= {t})\n```",
    )
    assert wrong.reward == pytest.approx(expect)
    # printing fake results does not earn reward: outputs are compared on the host
    forged = await score(
        env,
        task,
        "```python\nprint('__climbrl_result__ [\"ok\", 0]' * 9)\n"
        "def sum_greater(xs):\n    import os; os._exit(0)\n```",
    )
    assert forged.reward <= sum(e == 0 for e in task.answer["expected"]) / len(inputs)
    hang = await score(env, task, "```python\ndef sum_greater(xs):\n    while True: pass\n```")
    assert hang.reward == 0.0 and hang.info["sandbox_killed"] == 1.0
    secret = await score(
        env,
        task,
        "```python\ndef sum_greater(xs):\n    return len(open('/etc/shadow').read())\n```",
    )
    assert secret.reward == 0.0
    assert (await score(env, task, "def sum_greater(xs): return 0")).info["gate"] == 0.0


async def test_tool_use_env_multi_turn():
    env = make_env("tool_use", {"kinds": ["digit_sum"]})
    task = env.get_task("train", 3)
    await env.reset(task)
    r1 = await env.respond(turn(format_tool_call("python", {"code": task.meta["solution"]})))
    assert not r1.done and r1.messages[0]["role"] == "tool"
    assert r1.messages[0]["content"] == task.answer  # ran in the sandbox
    r2 = await env.respond(turn(format_tool_call("calculator", {"expression": "2 ** 5 + 1"}), 1))
    assert r2.messages[0]["content"] == "33"
    r3 = await env.respond(turn(f"\\boxed{{{task.answer}}}", 2))
    assert r3.done and r3.reward == 1.0 and r3.info["tool_calls"] == 2.0
    # the right answer without calling a tool is gated to 0
    assert (await score(env, task, f"\\boxed{{{task.answer}}}")).reward == 0.0
    await env.reset(task)
    bad = await env.respond(turn('<tool_call>{"name": "shell", "arguments": {}}</tool_call>'))
    assert "unknown tool" in bad.messages[0]["content"]


def test_calculator_is_safe():
    from climbrl.envs.tool_use import calculator

    assert calculator("(12 + 7) * 3 / 4") == "14.25"
    assert calculator("2 ** 10") == "1024"
    assert calculator("__import__('os').system('id')").startswith("error")
    assert calculator("9 ** 9 ** 9").startswith("error")
    assert calculator("1 / 0").startswith("error")


@pytest.mark.parametrize(
    "dataset", ["basic_arithmetic", "chain_sum", "leg_counting", "spell_backward"]
)
async def test_reasoning_gym_scored_by_its_own_verifier(dataset):
    import reasoning_gym

    env = make_env("reasoning_gym", {"dataset": dataset, "num_train": 20, "num_test": 5})
    task = env.get_task("train", 4)
    entry = reasoning_gym.create_dataset(dataset, seed=0, size=20)[4]
    assert task.prompt[-1]["content"] == entry["question"]
    r = await score(env, task, f"thinking...<answer>{entry['answer']}</answer>")
    assert r.reward == 1.0 and r.info["correct"] == 1.0
    assert (await score(env, task, "<answer>definitely wrong</answer>")).reward < 1.0
    assert (await score(env, task, "no tags")).info["answered"] == 0.0
    assert env.get_task("test", 0).prompt != env.get_task("train", 0).prompt


def test_reasoning_gym_bad_names_are_clear():
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        make_env("reasoning_gym", {"dataset": "nope"})


async def test_trl_reward_functions_unchanged():
    """TRL's own reward functions, conversational and standard format, and a custom one."""
    from trl.rewards import accuracy_reward, think_format_reward

    from climbrl.envs.adapters.trl import TRLReward
    from climbrl.envs.base import Task
    from climbrl.envs.rewards import Gate, RewardContext, WeightedSum

    conv = Task(
        "t",
        "train",
        [{"role": "user", "content": "1/3 + 0?"}],
        meta={"row": {"prompt": [], "solution": "\\frac{1}{3}"}},
    )
    acc, fmt = TRLReward(accuracy_reward), TRLReward(think_format_reward)
    good = RewardContext("<think>easy</think> \\boxed{\\frac{1}{3}}", conv)
    assert await acc(good) == 1.0 and await fmt(good) == 1.0
    assert await acc(RewardContext("\\boxed{\\frac{1}{2}}", conv)) == 0.0
    gated = Gate(WeightedSum([(acc, 1.0)]), checks=[fmt])
    assert await gated(RewardContext("\\boxed{\\frac{1}{3}}", conv)) == 0.0  # no <think>

    seen = {}

    def custom(prompts, completions, answer, difficulty, **kwargs):  # standard (text) format
        seen.update(prompts=prompts, completions=completions, difficulty=difficulty)
        return [
            None if d == "skip" else float(c.strip() == a)
            for c, a, d in zip(completions, answer, difficulty)
        ]

    std = Task(
        "u", "train", "2+2=", meta={"row": {"prompt": "2+2=", "answer": "4", "difficulty": "easy"}}
    )
    r = TRLReward(custom)
    assert await r(RewardContext(" 4", std)) == 1.0
    assert seen == {"prompts": ["2+2="], "completions": [" 4"], "difficulty": ["easy"]}
    skip = Task(
        "v", "train", "x", meta={"row": {"prompt": "x", "answer": "4", "difficulty": "skip"}}
    )
    total, parts = await r.score(RewardContext("4", skip))
    assert total == 0.0 and parts["custom/skipped"] == 1.0

    async def async_reward(prompts, completions, **kw):
        return [len(completions[0]) / 10]

    assert await TRLReward(async_reward)(RewardContext("abc", std)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="declared range"):
        await TRLReward(async_reward)(RewardContext("x" * 20, std))


def test_trl_env_from_dotted_paths(tmp_path):
    import json

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(30)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    env = make_env(
        "trl",
        {
            "dataset": str(path),
            "eval_dataset": str(path),
            "reward_funcs": ["trl.rewards:accuracy_reward"],
        },
    )
    assert env.num_tasks("train") == env.num_tasks("test") == 30
    with pytest.raises(ValueError, match="reward_funcs"):
        make_env("trl", {"dataset": str(path)})

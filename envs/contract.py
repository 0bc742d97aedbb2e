"""Contract checks every environment must pass; run them on your own plugin with one command:

    climbrl env-check my_pkg.envs:MyEnv --args '{"difficulty": 2}'
    python -m climbrl.envs.contract my_pkg.envs:MyEnv            # the same

or from pytest: ``climbrl.envs.contract.assert_env_contract("my_pkg.envs:MyEnv", {...})``.
The env is found like the run config finds it (entry point, dotted path, built-in name).

Every check is listed as PASS, FAIL or SKIP (with the reason: it needs a check that failed,
or the env gives it nothing to check). What is checked, without a model (episodes are played
with scripted turns: the env's own ``reference_turns(task)`` when it has them, then empty,
garbage, very long, malformed and unknown tool calls):

- construction: a subclass of ``Env``; a finite, non-empty ``reward_range``; ``splits``;
  ``max_turns``; ``tools()`` are function schemas;
- tasks per split: ``num_tasks(split) > 0``; ``get_task`` gives ``Task``s of that split with
  unique ids, never shared across splits, and prompts that are text or well-formed messages;
- shapes: ``reset`` returns the prompt; every ``step``/``respond`` returns a ``StepResult``
  whose reward (and step reward) is a finite number inside ``reward_range``, with float
  ``info`` and only tool/user/system ``messages`` (chat prompts only);
- determinism: two instances with the same seed give the same tasks, prompts and rewards;
- reference: where the env knows a solution, it scores the top of ``reward_range``, and
  garbage scores less (the reward is not a constant);
- clean shutdown: ``close()`` is idempotent and leaves no child process or asyncio task behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from climbrl.envs.base import Env, StepResult, Task, Turn, make_env, resolve_env
from climbrl.envs.chat import parse_tool_calls

ROLES = {"system", "user", "assistant", "tool"}
GARBAGE = [
    "",
    "\x00\ufffd garbage ]]}} <answer></answer> ```",
    "lorem ipsum " * 400,
    "<tool_call>{not json</tool_call>",
    '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>',
]


class ContractError(AssertionError):
    pass


# Every check, in the order it runs; each is reported as passed, failed or skipped.
CHECKS = (
    "resolve",
    "construct",
    "construction",
    "tasks_per_split",
    "episodes_and_shapes",
    "reference_solves",
    "deterministic_under_seed",
    "clean_shutdown",
)


@dataclass
class CheckResult:
    name: str
    ok: bool  # False only for a check that ran and failed
    detail: str = ""  # why it failed, or why it was skipped
    skipped: bool = False

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.ok else "FAIL"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ContractError(msg)


def _check_prompt(p: Any, where: str) -> None:
    if isinstance(p, str):
        return
    _check(
        isinstance(p, list) and bool(p),
        f"{where}: prompt must be a str or a non-empty message list",
    )
    for m in p:
        _check(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str),
            f"{where}: bad message {m!r} (need role in {sorted(ROLES)} and str content)",
        )


def _check_result(env: Env, r: Any, chat: bool, where: str) -> None:
    _check(isinstance(r, StepResult), f"{where}: returned {type(r).__name__}, not StepResult")
    lo, hi = env.reward_range
    for name, v in (("reward", r.reward), ("step_reward", r.step_reward)):
        if v is None and name == "step_reward":
            continue
        if not (isinstance(v, int | float) and math.isfinite(v)):
            raise ContractError(f"{where}: {name} {v!r} is not a finite number")
        _check(lo <= v <= hi, f"{where}: {name} {v} outside reward_range {env.reward_range}")
    _check(isinstance(r.done, bool), f"{where}: done must be a bool")
    _check(
        all(isinstance(k, str) and isinstance(v, int | float) for k, v in r.info.items()),
        f"{where}: info must map str to numbers, got {r.info!r}",
    )
    if r.messages is not None:
        _check(chat, f"{where}: messages returned after a text prompt (use observation)")
        for m in r.messages:
            _check(
                isinstance(m, dict)
                and m.get("role") in ("tool", "user", "system")
                and isinstance(m.get("content"), str),
                f"{where}: an env may add tool/user/system messages with str content, got {m!r}",
            )
    if r.observation is not None:
        _check(isinstance(r.observation, str), f"{where}: observation must be a str")


def _turn(text: str, index: int) -> Turn:
    content, calls, errors = parse_tool_calls(text)
    return Turn(
        text=text,
        content=content,
        tool_calls=tuple(calls),
        tool_call_errors=tuple(errors),
        index=index,
    )


async def play(env: Env, task: Task, turns: list[str], where: str) -> list[float]:
    """One episode with scripted turns (the last repeats); returns every step's reward."""
    prompt = await env.reset(task)
    _check(
        prompt == task.prompt or isinstance(prompt, str | list),
        f"{where}: reset returned {type(prompt).__name__}",
    )
    _check_prompt(prompt, where)
    rewards = []
    try:
        for i in range(max(1, env.max_turns)):
            r = await env.respond(_turn(turns[min(i, len(turns) - 1)], i))
            _check_result(env, r, isinstance(prompt, list), f"{where} turn {i}")
            rewards.append(float(r.reward))
            if r.done or not (r.messages or r.observation):
                break
    finally:
        await env.close()
        await env.close()  # idempotent
    return rewards


def _children() -> set[int]:
    import psutil

    out: set[int] = set()
    todo = [psutil.Process()]
    while todo:  # by hand: children(recursive=True) raises on a zombie, which still counts
        proc = todo.pop()
        try:
            kids = proc.children()
        except psutil.Error:
            continue
        for k in kids:
            if k.pid not in out:
                out.add(k.pid)
                todo.append(k)
    return out


async def _run(spec: str, args: dict[str, Any], n_tasks: int) -> list[CheckResult]:
    results: list[CheckResult] = []

    def record(name: str, fn: Any) -> Any:
        try:
            out = fn()
            results.append(CheckResult(name, True))
            return out
        except Exception as e:  # every failure is reported, the rest still run
            detail = (
                str(e)
                if isinstance(e, ContractError | ValueError)
                else traceback.format_exc(limit=3)
            )
            results.append(CheckResult(name, False, detail))
            return None

    def skip_rest(reason: str) -> list[CheckResult]:
        """Report every check that has not run as skipped, with the reason."""
        done = {r.name for r in results}
        results.extend(CheckResult(n, True, reason, skipped=True) for n in CHECKS if n not in done)
        return results

    cls = record("resolve", lambda: resolve_env(spec))
    if cls is None:
        return skip_rest("the env class could not be resolved (see resolve)")
    env = record("construct", lambda: make_env(spec, args))
    if env is None:
        return skip_rest("the env could not be constructed (see construct)")

    def construction() -> None:
        lo, hi = env.reward_range
        _check(
            math.isfinite(lo) and math.isfinite(hi) and lo < hi,
            f"reward_range {env.reward_range} must be finite with lo < hi",
        )
        _check(
            bool(env.splits) and all(isinstance(s, str) for s in env.splits),
            "splits must be a non-empty tuple of names",
        )
        _check(isinstance(env.max_turns, int) and env.max_turns >= 1, "max_turns must be >= 1")
        tools = env.tools()
        _check(
            tools is None
            or (
                isinstance(tools, list)
                and all(
                    isinstance(t, dict)
                    and t.get("type") == "function"
                    and isinstance(t.get("function", {}).get("name"), str)
                    for t in tools
                )
            ),
            "tools() must be None or a list of {'type': 'function', 'function': {...}} schemas",
        )

    record("construction", construction)

    index_of: dict[str, int] = {}

    def tasks() -> dict[str, list[Task]]:
        out, seen = {}, {}
        for split in env.splits:
            n = env.num_tasks(split)
            _check(isinstance(n, int) and n > 0, f"num_tasks({split!r}) = {n!r}, need > 0")
            idx = sorted({0, n - 1, *range(min(n, n_tasks))})
            out[split] = [env.get_task(split, i) for i in idx]
            for i, t in zip(idx, out[split]):
                _check(isinstance(t, Task), f"get_task({split!r}, {i}) is not a Task")
                _check(t.split == split, f"get_task({split!r}, {i}).split is {t.split!r}")
                _check(
                    isinstance(t.task_id, str) and bool(t.task_id),
                    "task_id must be a non-empty str",
                )
                _check(
                    t.task_id not in seen,
                    f"task id {t.task_id!r} appears in {seen.get(t.task_id)!r} and {split!r}",
                )
                seen[t.task_id] = split
                index_of[t.task_id] = i
                _check_prompt(t.prompt, f"task {t.task_id}")
        return out

    by_split = record("tasks_per_split", tasks)
    if not by_split:
        return skip_rest("no tasks to play (see tasks_per_split)")
    sample = [t for ts in by_split.values() for t in ts[:n_tasks]]
    before = _children()
    tasks_before = set(asyncio.all_tasks())

    async def scripts_for(e: Env, t: Task) -> list[list[str]]:
        ref = e.reference_turns(t)
        return ([ref] if ref else []) + [[g] for g in GARBAGE]

    played: dict[str, list[list[float]]] = {}
    ok = True
    try:
        for t in sample:
            played[t.task_id] = []
            for script in await scripts_for(env, t):
                played[t.task_id].append(await play(env, t, script, f"task {t.task_id}"))
        results.append(CheckResult("episodes_and_shapes", True))
    except Exception as e:
        ok = False
        results.append(
            CheckResult(
                "episodes_and_shapes",
                False,
                str(e) if isinstance(e, ContractError) else traceback.format_exc(limit=4),
            )
        )

    if ok:

        async def reference() -> None:
            refs = 0
            for t in sample:
                if not env.reference_turns(t):
                    continue
                refs += 1
                final = played[t.task_id][0][-1]
                _check(
                    final == env.reward_range[1],
                    f"task {t.task_id}: the env's own reference "
                    f"turns score {final}, not the top of reward_range {env.reward_range}",
                )
                garbage = [r[-1] for r in played[t.task_id][1:]]
                _check(
                    min(garbage) < final,
                    f"task {t.task_id}: garbage scores {garbage}, as "
                    "high as the reference: the reward does not discriminate",
                )
            results.append(
                CheckResult(
                    "reference_solves",
                    True,
                    "" if refs else "the env has no reference_turns(task) to check",
                    skipped=not refs,
                )
            )

        try:
            await reference()
        except Exception as e:
            results.append(CheckResult("reference_solves", False, str(e)))

        try:
            env2 = make_env(spec, args)
            for t in sample:
                t2 = env2.get_task(t.split, index_of[t.task_id])
                _check(
                    (t2.task_id, t2.prompt, t2.answer) == (t.task_id, t.prompt, t.answer),
                    f"a second instance with the same seed gives task {t2.task_id!r} for "
                    f"{t.task_id!r}, or a different prompt/answer",
                )
                for script, rewards in zip(await scripts_for(env2, t2), played[t.task_id]):
                    again = await play(env2, t2, script, f"task {t.task_id} (replay)")
                    _check(
                        again == rewards,
                        f"task {t.task_id}: rewards {rewards} then {again} "
                        "for the same turns: not deterministic under a seed",
                    )
            results.append(CheckResult("deterministic_under_seed", True))
        except Exception as e:
            results.append(CheckResult("deterministic_under_seed", False, str(e)))
    else:
        for name in ("reference_solves", "deterministic_under_seed"):
            results.append(
                CheckResult(
                    name, True, "needs the episodes to play (see episodes_and_shapes)", skipped=True
                )
            )

    await asyncio.sleep(0)
    # sandboxes started ahead belong to the process, not to the env: stop them before counting
    from climbrl.envs._procs import close_pools

    await asyncio.to_thread(close_pools)
    leftover = _children() - before
    pending = [
        t
        for t in asyncio.all_tasks() - tasks_before
        if not t.done() and t is not asyncio.current_task()
    ]
    results.append(
        CheckResult(
            "clean_shutdown",
            not leftover and not pending,
            f"left behind child pids {sorted(leftover)} and {len(pending)} asyncio tasks"
            if leftover or pending
            else "",
        )
    )
    return results


def check_env(spec: str, args: dict[str, Any] | None = None, n_tasks: int = 3) -> list[CheckResult]:
    """Run every contract check on env ``spec`` built with ``args``; never raises. Returns one
    result per name in ``CHECKS``, in that order: a check that needs one that failed is
    skipped, with the reason."""
    return asyncio.run(_run(spec, dict(args or {}), n_tasks))


def assert_env_contract(spec: str, args: dict[str, Any] | None = None, n_tasks: int = 3) -> None:
    """``check_env`` for pytest: fails with every failed check's detail."""
    failed = [r for r in check_env(spec, args, n_tasks) if not r.ok]
    if failed:
        raise ContractError("\n".join(f"{r.name}: {r.detail}" for r in failed))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="climbrl env-check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "env",
        help="entry point name, dotted path pkg.mod:Class, built-in name, or a run config "
        "(.toml: its env.name and env.args)",
    )
    p.add_argument("--args", default=None, help="env keyword arguments as JSON")
    p.add_argument("--tasks", type=int, default=3, help="tasks per split to play")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--print-config", action="store_true", help="print the env it checks as TOML and exit"
    )
    a = p.parse_args(argv)
    try:
        args = json.loads(a.args) if a.args is not None else {}
    except json.JSONDecodeError as e:
        print(f"env-check: --args is not JSON: {e}", file=sys.stderr)
        return 2
    name = a.env
    if name.endswith(".toml"):
        from climbrl.config import load_config

        try:
            cfg = load_config(name, a.overrides)
        except ValueError as e:
            print(f"env-check: {e}", file=sys.stderr)
            return 2
        name, args = cfg.env.name, {**cfg.env.args, **args}
    elif a.overrides:
        print("env-check: --set needs a config file (ENV is not a .toml)", file=sys.stderr)
        return 2
    if a.print_config:
        from climbrl.config import toml_literal

        print(f"[env]\nname = {toml_literal(name)}\nargs = {toml_literal(args)}")
        return 0
    a.env = name
    results = check_env(name, args, a.tasks)
    for r in results:
        print(f"{r.status} {r.name}" + (f": {r.detail}" if r.detail else ""))
    failed = sum(not r.ok for r in results)
    skipped = sum(r.skipped for r in results)
    print(f"{a.env}: {len(results) - failed - skipped} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

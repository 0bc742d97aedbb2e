"""``verifiers``: prime-intellect's verifiers (0.4.0) environments as climbrl envs.

A verifiers environment is a *taskset* (an installed package exporting a ``vf.Taskset``
subclass: typed tasks with ``@vf.reward``/``@vf.metric`` scoring methods), played by an *agent*
(a harness program that talks to the model through verifiers' interception server) inside an
``Env`` (``SingleAgentEnv`` for a plain taskset; multi-agent envs by ``env_id``). This adapter
runs verifiers' own episode (``Env.run_episode``) with climbrl's rollout server as the model:

- the env is a black-box agent env (like ``envs.agent``): each episode the rollout server opens
  a session on its OpenAI endpoint and calls ``run_agent``, which runs the verifiers episode
  with an ``EvalClientConfig`` pointing at that endpoint. verifiers' client sends its own trace
  id as ``X-Session-ID``, so the climbrl session id rides in the request *body*
  (``session_id``, a pass-through sampling field), which vLLM reads before the header: every
  model call is recorded token-exactly in the climbrl session;
- the reward is verifiers' own: the sum of the trace's weighted ``@vf.reward`` scores (the
  mean over traces for a multi-agent episode), with its rewards and metrics as episode
  metrics. With ``reward = "env"`` (default) the rollout server takes it from ``score()``;
  with ``reward = "agent"`` it is posted to ``POST {base_url}/climbrl/sessions/{id}/reward``.
- the agent's harness defaults to ``climbrl_vf_chat``, an in-process chat loop (one model call
  per segment, resumable for user-simulator envs; no MCP tools), run in verifiers' subprocess
  runtime: verifiers' shipped harnesses (``null``, ``bash``, ...) install their program with
  ``uv`` from the network, which a training box may not have. Any verifiers harness id can be
  set with ``harness``, and any runtime with ``runtime``.

``step(completion)`` scores a single reply without a model (verifiers' task scoring on a
one-turn trace): the text protocol, used by ``climbrl env-check``.

    [env]
    name = "verifiers"
    args = { taskset = "my_taskset", taskset_args = { difficulty = 2 }, test_fraction = 0.1 }

``taskset`` (and ``env_id``) is an installed verifiers package id (``pip install`` a hub
environment first; nothing is downloaded at run time), or ``package.module:Class`` /
``path/file.py:Class`` for a ``vf.Taskset`` (``vf.Env``) subclass defined anywhere.
Splits: ``test_taskset_args`` (merged over ``taskset_args``, e.g. ``{ split = "test" }``) makes
a test taskset; without it a deterministic hash of each task's key puts ``test_fraction`` of
the tasks in ``test``. ``max_tasks`` bounds an infinite taskset.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from climbrl.envs.base import Env, Message, Prompt, StepResult, Task, load_object

HARNESS_ID = "climbrl_vf_chat"
API_KEY_VAR = "CLIMBRL_VF_API_KEY"  # verifiers' client configs name the env var of their key
_ALIAS_PREFIX = "climbrl_vf_"


def _vf() -> Any:
    try:
        import verifiers.v1 as vf
    except ImportError as e:
        raise ValueError(
            f"the verifiers env needs `pip install climbrl[envs]` (verifiers==0.4.0): {e}"
        ) from e
    _register_harness()
    return vf


# ---------------------------------------------------------------------------- plugin ids


def plugin_id(spec: str) -> str:
    """A verifiers plugin id for ``spec``: an installed package id as is, or a
    ``package.module:Class`` / ``path/file.py:Class`` target exposed under a top-level
    module alias (verifiers imports plugins by id and takes the one class in ``__all__``)."""
    if ":" not in spec:
        return spec
    cls = load_object(spec)
    if not isinstance(cls, type):
        raise ValueError(f"{spec!r} is not a class")
    alias = _ALIAS_PREFIX + hashlib.sha256(spec.encode()).hexdigest()[:12]
    if alias not in sys.modules:
        mod = types.ModuleType(alias, f"climbrl alias of {spec}")
        setattr(mod, cls.__name__, cls)
        mod.__dict__["__all__"] = [cls.__name__]
        sys.modules[alias] = mod
    return alias


@functools.cache
def _register_harness() -> None:
    import verifiers.v1 as vf
    from verifiers.v1.dialects.chat import message_to_wire
    from verifiers.v1.runtimes import ProgramResult

    class ClimbrlChatHarnessConfig(vf.HarnessConfig):
        request_timeout_s: float = 600.0

    class ClimbrlChatHarness(vf.Harness[ClimbrlChatHarnessConfig]):
        """An in-process chat loop: one chat completion through the interception endpoint
        per segment (``Harness.launch`` allows a loop in-process, as long as every model call
        goes through ``endpoint``). No tools; resumable on the accreted conversation."""

        APPENDS_SYSTEM_PROMPT = True
        SUPPORTS_RESUME = True
        EXECUTES_CODE = False
        NEEDS_CONTAINER = False

        async def launch(
            self,
            ctx: Any,
            trace: Any,
            runtime: Any,
            endpoint: str,
            secret: str,
            mcp_urls: dict[str, str],
            data: Any,
            tool_interception_url: str | None = None,
        ) -> Any:
            import httpx

            system, prompt = self.resolve_prompt(data)
            messages: list[dict[str, Any]] = []
            if system:
                messages.append({"role": "system", "content": system})
            if isinstance(prompt, str):
                messages.append({"role": "user", "content": prompt})
            elif prompt:
                messages += [message_to_wire(m) for m in prompt]
            async with httpx.AsyncClient(timeout=self.config.request_timeout_s) as client:
                r = await client.post(
                    endpoint.rstrip("/") + "/chat/completions",
                    json={"model": ctx.model, "messages": messages},
                    headers={"Authorization": f"Bearer {secret}"},
                )
            if r.status_code != 200:
                return ProgramResult(
                    1, "", f"chat completion failed: {r.status_code} {r.text[-2000:]}"
                )
            return ProgramResult(0, r.text, "")

    mod = types.ModuleType(HARNESS_ID, "climbrl's in-process verifiers chat harness")
    mod.__dict__.update(
        ClimbrlChatHarness=ClimbrlChatHarness,
        ClimbrlChatHarnessConfig=ClimbrlChatHarnessConfig,
        __all__=["ClimbrlChatHarness"],
    )
    sys.modules[HARNESS_ID] = mod


# ---------------------------------------------------------------------------- loading


@dataclass
class _Loaded:
    env: Any  # the verifiers Env
    tasks: dict[str, list[Any]]  # split -> verifiers Tasks
    taskset_id: str


def _materialize(taskset: Any, max_tasks: int | None) -> list[Any]:
    if max_tasks is not None:
        taskset = taskset.take(max_tasks)
    elif not taskset.bounded:
        raise ValueError(f"taskset {type(taskset).__name__} is infinite: set max_tasks")
    return list(taskset)


@functools.lru_cache(maxsize=8)
def _load(spec_json: str) -> _Loaded:
    """The verifiers env of one adapter config, built once per process (the rollout server
    makes a climbrl env per episode)."""
    vf = _vf()
    from verifiers.v1.configs.agent import agent_config_fields
    from verifiers.v1.runtimes import SubprocessConfig

    s = json.loads(spec_json)
    ts_id = plugin_id(s["taskset"])
    raw: dict[str, Any] = {**s["env_args"], "taskset": {**s["taskset_args"], "id": ts_id}}
    if s["env_id"]:
        raw["id"] = plugin_id(s["env_id"])
    raw.setdefault("interception", {"type": "server"})  # one local server, no process pool
    cfg = vf.resolve_env_config(raw)
    harness = {**s["harness_args"], "id": plugin_id(s["harness"])}
    updates = {}
    for name, role in agent_config_fields(cfg).items():
        upd: dict[str, Any] = {}
        if role.harness is None:
            upd["harness"] = vf.AgentConfig.model_validate({"harness": harness}).harness
        if "runtime" not in role.model_fields_set:
            upd["runtime"] = (
                vf.AgentConfig.model_validate({"runtime": s["runtime"]}).runtime
                if s["runtime"]
                else SubprocessConfig()
            )
        if upd:
            updates[name] = role.model_copy(update=upd)
    if updates:
        cfg = cfg.model_copy(update=updates)
    env = vf.load_environment(cfg)
    all_tasks = _materialize(env.taskset, s["max_tasks"])
    if s["test_taskset_args"] is not None:
        ts_cfg = type(cfg.taskset).model_validate(
            {**s["taskset_args"], **s["test_taskset_args"], "id": ts_id}
        )
        tasks = {"train": all_tasks, "test": _materialize(vf.load_taskset(ts_cfg), s["max_tasks"])}
    else:

        def is_test(t: Any) -> bool:
            h = hashlib.sha256(str(t.key).encode()).digest()
            return int.from_bytes(h[:4], "little") / 2**32 < s["test_fraction"]

        tasks = {
            "train": [t for t in all_tasks if not is_test(t)],
            "test": [t for t in all_tasks if is_test(t)],
        }
        if s["test_fraction"] > 0 and not tasks["test"] and len(tasks["train"]) > 1:
            tasks["test"].append(tasks["train"].pop())  # a tiny taskset still gets a test task
    return _Loaded(env=env, tasks=tasks, taskset_id=s["taskset"])


# verifiers' serving resources (interception server, shared tool servers) are bound to an
# event loop: one per (config, loop), entered on first use and held for the process.
_SERVING: dict[tuple[str, int], Any] = {}
_SERVING_LOCKS: dict[int, asyncio.Lock] = {}


async def _ensure_serving(spec_json: str, loaded: _Loaded) -> None:
    loop = asyncio.get_running_loop()
    key = (spec_json, id(loop))
    if key in _SERVING:
        return
    async with _SERVING_LOCKS.setdefault(id(loop), asyncio.Lock()):
        if key not in _SERVING:
            cm = loaded.env.serving()
            await cm.__aenter__()
            _SERVING[key] = cm


async def release_serving() -> None:
    """Tear down the serving resources held on the running loop (tests, shutdown)."""
    loop_id = id(asyncio.get_running_loop())
    for key in [k for k in _SERVING if k[1] == loop_id]:
        await _SERVING.pop(key).__aexit__(None, None, None)


# ---------------------------------------------------------------------------- the env


def _wire_prompt(data: Any) -> list[Message]:
    from verifiers.v1.types import content_text

    out: list[Message] = []
    if data.system_prompt:
        out.append({"role": "system", "content": data.system_prompt})
    if isinstance(data.prompt, str):
        out.append({"role": "user", "content": data.prompt})
    else:
        for m in data.prompt or []:
            out.append({"role": m.role, "content": content_text(m.content)})
    return out


def _finite(d: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        v = getattr(v, "value", v)  # a verifiers Reward: its weighted value
        if isinstance(v, int | float) and v == v and abs(v) != float("inf"):
            out[f"{prefix}{k}"] = float(v)
    return out


class VerifiersEnv(Env):
    name = "verifiers"
    black_box = True  # the rollout server serves its OpenAI endpoint and calls run_agent
    max_turns = 1  # the text protocol (step) scores one reply

    def __init__(
        self,
        seed: int = 0,
        taskset: str = "",
        taskset_args: dict[str, Any] | None = None,
        test_taskset_args: dict[str, Any] | None = None,
        env_id: str = "",
        env_args: dict[str, Any] | None = None,
        harness: str = HARNESS_ID,
        harness_args: dict[str, Any] | None = None,
        runtime: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        test_fraction: float = 0.1,
        max_tasks: int | None = None,
        reward: str = "env",
        reward_range: Iterable[float] = (0.0, 1.0),
        timeout_s: float = 600.0,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        if not taskset:
            raise ValueError(
                "the verifiers env needs args.taskset: an installed verifiers "
                "taskset id, or 'package.module:TasksetClass'"
            )
        if reward not in ("env", "agent"):
            raise ValueError(
                "reward must be 'env' (the rollout server takes verifiers' reward "
                "from score()) or 'agent' (posted to the session's reward route)"
            )
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError("test_fraction must be in [0, 1)")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        lo, hi = (float(x) for x in reward_range)
        if not lo < hi:
            raise ValueError(f"reward_range must be (lo, hi) with lo < hi, got {reward_range}")
        self.reward_range = (lo, hi)
        self.reward_mode, self.timeout_s = reward, timeout_s
        self.agent = f"verifiers:{taskset}"  # named in the rollout server's error messages
        self.sampling = dict(sampling or {})
        self._spec = json.dumps(
            {
                "taskset": taskset,
                "taskset_args": taskset_args or {},
                "test_taskset_args": test_taskset_args,
                "env_id": env_id,
                "env_args": env_args or {},
                "harness": harness,
                "harness_args": harness_args or {},
                "runtime": runtime,
                "test_fraction": test_fraction,
                "max_tasks": max_tasks,
            },
            sort_keys=True,
        )
        try:
            self._loaded = _load(self._spec)
        except ValueError:
            raise
        except Exception as e:  # pydantic / import errors of the verifiers config
            raise ValueError(
                f"cannot load verifiers env {taskset!r}: {type(e).__name__}: {e}"
            ) from e
        self._task: Task | None = None
        self._result: StepResult | None = None

    # -- tasks

    def _tasks(self, split: str) -> list[Any]:
        if split not in self._loaded.tasks:
            raise ValueError(f"split must be one of {sorted(self._loaded.tasks)}, got {split!r}")
        return self._loaded.tasks[split]

    def num_tasks(self, split: str) -> int:
        return len(self._tasks(split))

    def vf_task(self, split: str, index: int) -> Any:
        tasks = self._tasks(split)
        if not tasks:
            raise ValueError(f"the verifiers env's {split!r} split is empty")
        return tasks[index % len(tasks)]

    def get_task(self, split: str, index: int) -> Task:
        n = self.num_tasks(split)
        if n == 0:
            raise ValueError(f"the verifiers env's {split!r} split is empty")
        index %= n
        t = self.vf_task(split, index)
        answer = getattr(t.data, "answer", None)
        name = self._loaded.taskset_id.rpartition(":")[2]
        return Task(
            task_id=f"verifiers/{name}/{split}/{index}",
            split=split,
            prompt=_wire_prompt(t.data),
            answer=answer if isinstance(answer, str | int | float) else None,
            meta={"index": index, "key": t.key, "vf_idx": t.data.idx},
        )

    async def reset(self, task: Task) -> Prompt:
        self._task = task
        return task.prompt

    # -- black-box episodes (the rollout server's agent path)

    async def run_agent(self, task: Task, ctx: Any) -> None:
        """One verifiers episode with climbrl's endpoint as the model (``ctx``:
        ``climbrl.envs.agent.AgentContext``)."""
        vf = _vf()
        vt = self.vf_task(task.split, task.meta["index"])
        os.environ[API_KEY_VAR] = ctx.api_key
        mctx = vf.ModelContext(
            model=ctx.model,
            client=vf.EvalClientConfig(base_url=ctx.base_url, api_key_var=API_KEY_VAR),
            sampling=vf.Sampling(**{**self.sampling, "session_id": ctx.session_id}),
        )
        await _ensure_serving(self._spec, self._loaded)
        try:
            episode = await asyncio.wait_for(
                self._loaded.env.run_episode(vt, mctx), timeout=self.timeout_s
            )
        except TimeoutError:
            raise TimeoutError(f"verifiers episode ran past timeout_s={self.timeout_s}") from None
        self._result = self._episode_result(episode)
        if self.reward_mode == "agent":
            await self._post_reward(ctx, self._result)

    def _episode_result(self, episode: Any) -> StepResult:
        if not episode.ok or not episode.traces:
            errs = [e for t in episode.traces for e in t.errors] + list(episode.errors)
            why = "; ".join(f"{e.type}: {e.message}" for e in errs[-3:]) or "no trace"
            raise RuntimeError(f"verifiers episode failed: {why}")
        rewards = [t.reward for t in episode.traces]
        reward = sum(rewards) / len(rewards)
        self._check_range(reward)
        info: dict[str, float] = {
            "vf/traces": float(len(episode.traces)),
            "correct": float(reward >= self.reward_range[1]),
        }
        for t in episode.traces:
            info.update(_finite(t.rewards, "vf/reward/"))
            info.update(_finite(t.metrics, "vf/metric/"))
        return StepResult(reward=reward, done=True, info=info)

    def _check_range(self, reward: float) -> None:
        lo, hi = self.reward_range
        if not (reward == reward and lo <= reward <= hi):
            raise ValueError(
                f"verifiers reward {reward} is outside reward_range {self.reward_range}:"
                " set args.reward_range to the taskset's range"
            )

    async def _post_reward(self, ctx: Any, res: StepResult) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=30.0) as client:
            r = await client.post(
                f"{ctx.base_url}/climbrl/sessions/{ctx.session_id}/reward",
                json={"reward": res.reward, "metrics": res.info},
                headers={"Authorization": f"Bearer {ctx.api_key}"},
            )
        if r.status_code != 200:
            raise RuntimeError(f"posting the reward failed: {r.status_code} {r.text[:500]}")

    async def score(self, task: Task, final_text: str) -> StepResult:
        """``reward = "env"``: verifiers' reward of the episode ``run_agent`` just ran."""
        if self._result is None:
            raise RuntimeError("score() before run_agent() finished an episode")
        return self._result

    # -- the text protocol: verifiers' scoring of one reply, no model

    async def step(self, completion: str) -> StepResult:
        assert self._task is not None, "reset() first"
        vt = self.vf_task(self._task.split, self._task.meta["index"])
        trace = self._one_turn_trace(vt, completion)
        await vt.score(trace)
        reward = trace.reward
        self._check_range(reward)
        info = {
            **_finite(trace.rewards, "vf/reward/"),
            **_finite(trace.metrics, "vf/metric/"),
            "correct": float(reward >= self.reward_range[1]),
        }
        return StepResult(reward=reward, done=True, info=info)

    def _one_turn_trace(self, vt: Any, completion: str) -> Any:
        from verifiers.v1.configs.agent import agent_config_fields, resolve_agent
        from verifiers.v1.dialects.chat import parse_message
        from verifiers.v1.graph import MessageNode
        from verifiers.v1.trace import AgentInfo, Trace, TraceTask

        env = self._loaded.env
        spec = next(iter(agent_config_fields(env.config).values()))
        agent = resolve_agent(spec, model="climbrl", harness=env._default_harness)
        nodes = []
        for m in _wire_prompt(vt.data) + [{"role": "assistant", "content": completion}]:
            nodes.append(
                MessageNode(
                    parent=len(nodes) - 1 if nodes else None,
                    message=parse_message(m),
                    sampled=m["role"] == "assistant",
                )
            )
        trace = Trace(
            task=TraceTask(type=type(vt).__name__, data=vt.data, key=vt.key, hash=vt.hash),
            agent=AgentInfo(config=agent),
            nodes=nodes,
        )
        return trace

    def reference_turns(self, task: Task) -> list[str] | None:
        ref = getattr(
            self.vf_task(task.split, task.meta["index"]).data, "reference_completion", None
        )
        return [ref] if isinstance(ref, str) else None

    def tokenizer_corpus(self) -> list[str]:
        out = []
        for t in self._tasks("train")[:200]:
            out += [m["content"] for m in _wire_prompt(t.data)]
            ref = getattr(t.data, "reference_completion", None)
            if isinstance(ref, str):
                out.append(ref)
        return out


# ---------------------------------------------------------------------------- an example


def _example_classes() -> tuple[type, type]:
    vf = _vf()

    class AdditionData(vf.TaskData):
        answer: str
        reference_completion: str

    class AdditionTask(vf.Task[AdditionData, vf.State, vf.TaskConfig]):
        @vf.reward
        async def correct(self, task: AdditionData, trace: Any) -> float:
            """1 if the reply's last number is the sum."""
            nums = re.findall(r"-?\d+", trace.last_reply)
            return float(bool(nums) and nums[-1] == task.answer)

        @vf.metric
        async def reply_chars(self, trace: Any) -> float:
            return float(len(trace.last_reply))

    class AdditionTasksetConfig(vf.TasksetConfig):
        num_tasks: int = 200
        max_operand: int = 99

    class AdditionTaskset(vf.Taskset[AdditionTask, AdditionTasksetConfig]):
        """Two-number additions, scored by a ``@vf.reward`` (an example taskset for docs,
        examples and tests: ``taskset = "climbrl.envs.adapters.verifiers:AdditionTaskset"``)."""

        def load(self) -> Any:
            import random

            rng = random.Random(0)
            for i in range(self.config.num_tasks):
                a, b = (
                    rng.randint(2, self.config.max_operand),
                    rng.randint(2, self.config.max_operand),
                )
                yield AdditionTask(
                    AdditionData(
                        id=f"add-{i}",
                        prompt=f"What is {a} + {b}? Reply with the number only.",
                        system_prompt="You are a calculator.",
                        answer=str(a + b),
                        reference_completion=str(a + b),
                    ),
                    self.config.task,
                )

    return AdditionTaskset, AdditionTask


def __getattr__(name: str) -> Any:
    # verifiers is optional: the example classes are built on first access.
    if name in ("AdditionTaskset", "AdditionTask"):
        ts, task = _example_cache()
        return ts if name == "AdditionTaskset" else task
    raise AttributeError(name)


@functools.cache
def _example_cache() -> tuple[type, type]:
    return _example_classes()

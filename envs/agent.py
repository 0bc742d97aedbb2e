"""Train a black-box agent: any program that speaks the OpenAI API, through climbrl's endpoint.

    [env]
    name = "climbrl.envs.agent:AgentEnv"
    args = { agent = "examples.openai_agent:run", tasks = "copy_first" }

Each episode, the rollout server opens a session on its own OpenAI endpoint (``serve`` turns on
by itself for this env) and runs the agent with: the task, the endpoint's base URL, an API key,
the model name and the session id. The agent sends its requests with the ``X-Session-ID``
header (or a ``session_id`` field); every request is recorded token-exactly (serving.capture).
The episode ends when the agent has posted a reward
(``POST {base_url}/climbrl/sessions/{id}/reward``) or, with ``reward = "env"``, when it returns
and the task env scores the last assistant message.

``agent`` is either ``"package.module:function"`` (an async function called in the rollout
server's event loop: fast, for training) or a command list (``["python", "my_agent.py"]``, run
as a subprocess with ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``CLIMBRL_MODEL``,
``CLIMBRL_SESSION_ID`` and ``CLIMBRL_TASK`` (JSON) in its environment; killed on timeout).
The subprocess does not inherit the rollout server's environment: it gets only the names in
``AGENT_ENV_ALLOWLIST`` (PATH, HOME, locale, the venv, ...) plus those listed in ``pass_env``
(``args = { ..., pass_env = ["MY_TOOL_HOME"] }``), so the run's wire keys and provider API keys
stay out of it.
Sampling (temperature, top-p, top-k) of a training session is the run's, whatever the agent asks,
so the learner's log-probs match the sampler's.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from climbrl.envs.base import Env, Prompt, StepResult, Task, make_env


@dataclass(frozen=True)
class AgentContext:
    base_url: str  # ends in /v1
    api_key: str
    model: str
    session_id: str


def task_payload(task: Task) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "split": task.split,
        "prompt": task.prompt,
        "answer": task.answer,
        "meta": task.meta,
    }


class AgentEnv(Env):
    """Tasks come from another env (``tasks``); the agent does the talking."""

    name = "agent"
    black_box = True

    def __init__(
        self,
        seed: int = 0,
        agent: str | list[str] = "",
        tasks: str = "copy_first",
        tasks_args: dict[str, Any] | None = None,
        reward: str = "agent",
        timeout_s: float = 300.0,
        pass_env: list[str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(seed=seed, **kwargs)
        if reward not in ("agent", "env"):
            raise ValueError(
                "reward must be 'agent' (the agent posts it) or 'env' (the task "
                "env scores the last assistant message)"
            )
        if isinstance(agent, str):
            if ":" not in agent:
                raise ValueError(
                    "agent must be 'package.module:function', "
                    "'path/file.py:function' or a command list"
                )
            load_function(agent)  # fail at start-up, not in the first episode
        elif not (isinstance(agent, list) and agent and all(isinstance(a, str) for a in agent)):
            raise ValueError("agent must be 'package.module:function' or a command list")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if pass_env is not None and not (
            isinstance(pass_env, list) and all(isinstance(n, str) and n for n in pass_env)
        ):
            raise ValueError("pass_env must be a list of environment variable names")
        self.pass_env = tuple(pass_env or ())
        self.agent, self.reward_mode, self.timeout_s = agent, reward, timeout_s
        self._tasks_spec = (tasks, {"seed": seed, **(tasks_args or {})})
        self.task_env = make_env(*self._tasks_spec)
        self.reward_range = self.task_env.reward_range

    def num_tasks(self, split: str) -> int:
        return self.task_env.num_tasks(split)

    def get_task(self, split: str, index: int) -> Task:
        return self.task_env.get_task(split, index)

    async def reset(self, task: Task) -> Prompt:
        return task.prompt

    async def step(self, completion: str) -> StepResult:
        raise RuntimeError("AgentEnv episodes are driven by the agent (run_agent), not step()")

    def tokenizer_corpus(self) -> list[str]:
        return self.task_env.tokenizer_corpus()

    async def score(self, task: Task, final_text: str) -> StepResult:
        """``reward = "env"``: the task env scores the agent's last assistant message."""
        env = make_env(*self._tasks_spec)
        try:
            await env.reset(task)
            return await env.step(final_text)
        finally:
            await env.close()

    async def run_agent(self, task: Task, ctx: AgentContext) -> None:
        """Run the agent to completion (raises on failure or timeout)."""
        if isinstance(self.agent, str):
            func = load_function(self.agent)
            await asyncio.wait_for(
                func(
                    task=task_payload(task),
                    base_url=ctx.base_url,
                    api_key=ctx.api_key,
                    model=ctx.model,
                    session_id=ctx.session_id,
                ),
                timeout=self.timeout_s,
            )
            return
        env = {
            **agent_base_env(self.pass_env),
            "OPENAI_BASE_URL": ctx.base_url,
            "OPENAI_API_KEY": ctx.api_key,
            "CLIMBRL_MODEL": ctx.model,
            "CLIMBRL_SESSION_ID": ctx.session_id,
            "CLIMBRL_TASK": json.dumps(task_payload(task)),
        }
        proc = await asyncio.create_subprocess_exec(
            *self.agent,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout=self.timeout_s)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise TimeoutError(f"agent {self.agent} ran past timeout_s={self.timeout_s}") from None
        if proc.returncode != 0:
            tail = err.decode(errors="replace")[-2000:]
            raise RuntimeError(f"agent {self.agent} exited with {proc.returncode}: {tail}")


# What a command-list agent gets from the rollout server's environment: enough to find and run
# a program (PATH, the venv, locale, time zone, temp folder), never its secrets (the wire keys,
# provider API keys, cloud credentials). ``pass_env`` adds names.
AGENT_ENV_ALLOWLIST: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "TMPDIR",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NO_PROXY",
    "no_proxy",
)


def agent_base_env(extra: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """The allowlisted part of this process's environment (plus ``LC_*`` and ``extra``)."""
    names = {*AGENT_ENV_ALLOWLIST, *extra}
    return {k: v for k, v in os.environ.items() if k in names or k.startswith("LC_")}


def load_function(spec: str) -> Any:
    """``package.module:function`` or ``path/to/file.py:function``."""
    mod, _, fn = spec.rpartition(":")
    try:
        if mod.endswith(".py"):
            path = os.path.abspath(mod)
            name = "climbrl_agent_" + os.path.basename(mod)[:-3]
            module = sys.modules.get(name)
            if module is None:
                ms = importlib.util.spec_from_file_location(name, path)
                if ms is None or ms.loader is None:
                    raise ImportError(f"no Python file at {path}")
                module = importlib.util.module_from_spec(ms)
                ms.loader.exec_module(module)
                sys.modules[name] = module
        else:
            module = importlib.import_module(mod)
        func = getattr(module, fn)
    except (ImportError, AttributeError, FileNotFoundError, SyntaxError) as e:
        raise ValueError(f"cannot load agent {spec!r}: {e}") from None
    if not asyncio.iscoroutinefunction(func):
        raise ValueError(f"agent {spec!r} must be an async function")
    return func

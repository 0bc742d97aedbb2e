"""Multi-turn tool-use episodes through a real `climbrl rollout` process and vLLM engine.

The token sequence must be exact: the prompt is the chat template's rendering; every
environment segment (tool results, user turns) is exactly the template's suffix for those
messages; decoding everything gives the template's rendering of the whole conversation; and
the sampled assistant tokens are the engine's own, unchanged (the learner's log-probs of the
sequence match the engine's per token, which fails if a token or its context moved).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import torch

from climbrl.envs.base import Env, StepResult, Task, Turn
from climbrl.envs.chat import TOOL_CHAT_TEMPLATE, ChatRenderer
from climbrl.envs.tool_use import TOOLS, ToolUseEnv, calculator
from climbrl.wire import ENV_ERROR, Error, SamplingSpec, Trajectory, WorkOrder
from tests.conftest import kill_tree, write_config

pytestmark = pytest.mark.integration
PARITY_TOL = 1e-4
PROMPT = [
    {"role": "system", "content": "You can use tools."},
    {"role": "user", "content": "Compute 12 + 7 with the calculator."},
]


def env_messages(index: int) -> list[dict] | None:
    if index == 0:
        return [
            {
                "role": "tool",
                "tool_call_id": "call_0",
                "name": "calculator",
                "content": calculator("12 + 7"),
            },
            {"role": "tool", "tool_call_id": "call_1", "name": "python", "content": "19"},
        ]
    if index == 1:
        return [{"role": "user", "content": "Are you sure? Check again."}]
    return None


class ScriptedToolEnv(Env):
    """Answers every model turn with tool results, then a user turn, then ends (3 model turns),
    whatever the (random) model writes, so the test controls the episode's shape."""

    max_turns = 5

    def num_tasks(self, split):
        return 8

    def get_task(self, split, index):
        return Task(task_id=f"{split}/{index}", split=split, prompt=PROMPT)

    def tools(self):
        return TOOLS

    async def reset(self, task):
        return task.prompt

    async def respond(self, turn: Turn):
        new = env_messages(turn.index)
        if new is None:
            return StepResult(reward=1.0, done=True, step_reward=0.5, info={"correct": 1.0})
        return StepResult(reward=0.0, done=False, messages=new, step_reward=0.25)


class RaisingEnv(ScriptedToolEnv):
    async def respond(self, turn):
        raise RuntimeError("env bug on purpose")


class FlakyEnv(ScriptedToolEnv):
    """Of every three episodes in the process: one raises, one hangs, one finishes."""

    made = 0

    def __init__(self, **kw):
        super().__init__(**kw)
        FlakyEnv.made += 1
        self.n = FlakyEnv.made

    async def respond(self, turn: Turn):
        if self.n % 3 == 1:
            raise RuntimeError("flaky on purpose")
        if self.n % 3 == 2:
            await asyncio.sleep(3600)
        return await super().respond(turn)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    from transformers import AutoTokenizer

    from climbrl.learner.hub import LearnerHub
    from climbrl.tinymodel import make_tiny_model

    d = tmp_path_factory.mktemp("tool_server")
    corpus = ToolUseEnv().tokenizer_corpus() + [TOOL_CHAT_TEMPLATE] * 3
    model = make_tiny_model(d / "model", corpus, vocab_size=512, max_position_embeddings=2048)
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = TOOL_CHAT_TEMPLATE
    tok.save_pretrained(str(model))
    cfg = write_config(
        d / "cfg.toml",
        model,
        d / "out",
        wire={"dead_after_s": 60.0},
        env={"step_timeout_s": 5.0},
        # the envs its work orders name (a work order names no other)
        rollout={
            "max_model_len": 1536,
            "kv_cache_gb": 0.5,
            "max_tokens": 12,
            "extra_envs": ["tool_use"]
            + [f"{__file__}:{c}" for c in ("ScriptedToolEnv", "FlakyEnv", "RaisingEnv")],
        },
    )
    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=1.0)
    log = open(d / "rollout.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "climbrl.cli",
            "rollout",
            "--config",
            str(cfg),
            "--endpoint",
            hub.endpoint,
            "--server-id",
            "t0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **hub.client_env()},  # the hub's credentials
    )
    deadline = time.monotonic() + 300
    while hub.recv(0.5) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc)
            raise RuntimeError("rollout server failed:\n" + (d / "rollout.log").read_text()[-3000:])
    yield {
        "hub": hub,
        "proc": proc,
        "model": model,
        "tok": AutoTokenizer.from_pretrained(str(model)),
    }
    kill_tree(proc)
    hub.close()
    log.close()


def _wait(hub, pred, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = hub.recv(0.5)
        if item is not None and pred(item[1]):
            return item[1]
    raise AssertionError("no reply in time")


def _order(env: str, group: int, oid: str, max_tokens: int = 12) -> WorkOrder:
    return WorkOrder(
        order_id=oid,
        policy_version=0,
        env=env,
        task_index=1,
        group_size=group,
        sampling=SamplingSpec(temperature=1.0, max_tokens=max_tokens, seed=0),
    )


def _segments(s):
    segs, start = [], 0
    for i in range(1, len(s.completion_mask) + 1):
        if i == len(s.completion_mask) or s.completion_mask[i] != s.completion_mask[start]:
            segs.append((s.completion_mask[start], s.completion_ids[start:i]))
            start = i
    return segs


def test_multi_turn_tool_episode_is_token_exact(tool_server):
    rs, tok = tool_server, tool_server["tok"]
    rs["hub"].send("t0", _order(f"{__file__}:ScriptedToolEnv", 4, "mt-1"))
    tr = _wait(rs["hub"], lambda m: isinstance(m, Trajectory) and m.order_id == "mt-1")
    renderer = ChatRenderer(tok, TOOLS)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for s in tr.samples:
        assert s.prompt_ids == renderer.prompt_ids(PROMPT)
        assert s.task_id == "train/1" and s.reward == 1.0
        assert s.step_rewards == [0.25, 0.25, 0.5] and s.metrics["turns"] == 3.0
        segs = _segments(s)
        assert [m for m, _ in segs] == [1, 0, 1, 0, 1]
        conversation = list(PROMPT)
        for k, (mask, ids) in enumerate(segs):
            if mask == 1:
                body = ids[:-1] if ids[-1] == im_end else ids
                conversation.append(
                    {"role": "assistant", "content": tok.decode(body, skip_special_tokens=False)}
                )
            else:
                new = env_messages(k // 2)
                assert ids == renderer.continuation_ids(segs[k - 1][1], new)
                conversation += new
        # the whole sequence is the template's rendering of the conversation, as text
        want = tok.apply_chat_template(
            conversation, tools=TOOLS, tokenize=False, add_generation_prompt=False
        )
        got = tok.decode(s.prompt_ids + s.completion_ids, skip_special_tokens=False)
        closer = "<|im_end|>\n"
        assert want.endswith(closer)
        assert got == want[: -len(closer)] + ("<|im_end|>" if segs[-1][1][-1] == im_end else "")
        assert len(s.logprobs) == len(s.completion_ids)
        assert all(lp == 0.0 for lp, m in zip(s.logprobs, s.completion_mask) if m == 0)
    # the sampled tokens and their contexts are exactly the engine's: log-prob parity
    from transformers import AutoModelForCausalLM

    from climbrl.learner.logprobs import completion_logprobs

    model = AutoModelForCausalLM.from_pretrained(str(rs["model"]), dtype=torch.float32)
    with torch.no_grad():
        b = completion_logprobs(model, tr.samples, temperature=1.0, impl="naive")
    m = b["mask"].bool()
    assert int(m.sum()) == sum(sum(s.completion_mask) for s in tr.samples)
    diff = float((b["logp"] - b["old_logp"]).abs()[m].max())
    assert diff < PARITY_TOL, diff


def test_builtin_tool_use_env_and_failing_env(tool_server):
    hub = tool_server["hub"]
    hub.send("t0", _order("tool_use", 2, "tu-1"))
    tr = _wait(hub, lambda m: isinstance(m, Trajectory) and m.order_id == "tu-1")
    for s in tr.samples:
        assert 0.0 <= s.reward <= 1.0 and s.task_id == "tool_use/train/1"
        assert s.metrics["turns"] >= 1
    # an env that raises or hangs costs that episode only, reported with the cause
    hub.send("t0", _order(f"{__file__}:FlakyEnv", 3, "flaky-1"))
    tr = _wait(hub, lambda m: isinstance(m, Trajectory) and m.order_id == "flaky-1")
    failed = sorted((s for s in tr.samples if s.finish_reason == ENV_ERROR), key=lambda s: s.error)
    ok = [s for s in tr.samples if s.finish_reason != ENV_ERROR]
    assert len(failed) == 2 and len(ok) == 1 and ok[0].reward == 1.0
    assert "RuntimeError: flaky on purpose" in failed[0].error
    assert "env.step_timeout_s=5" in failed[1].error
    assert all(s.metrics == {"env_error": 1.0} and not s.completion_ids for s in failed)
    # an env that fails every episode of an order is reported as the order's error
    hub.send("t0", _order(f"{__file__}:RaisingEnv", 2, "bad-1"))
    err = _wait(hub, lambda m: isinstance(m, Error))
    assert err.code == "order_failed" and "env bug on purpose" in err.message
    assert tool_server["proc"].poll() is None
    hub.send("t0", _order(f"{__file__}:ScriptedToolEnv", 2, "mt-2"))
    assert (
        len(_wait(hub, lambda m: isinstance(m, Trajectory) and m.order_id == "mt-2").samples) == 2
    )

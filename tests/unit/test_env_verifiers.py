"""The prime-intellect `verifiers` adapter: a verifiers taskset played through an OpenAI
endpoint (a fake one here), scored by its own `@vf.reward` functions."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

vf = pytest.importorskip("verifiers.v1")

from climbrl.envs.adapters.verifiers import VerifiersEnv, release_serving  # noqa: E402
from climbrl.envs.agent import AgentContext  # noqa: E402
from climbrl.envs.base import make_env  # noqa: E402

ROWS = [
    {"question": f"capital of {c}?", "answer": a}
    for c, a in [
        ("France", "Paris"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Japan", "Tokyo"),
        ("Peru", "Lima"),
        ("Chile", "Santiago"),
    ]
]


class QAData(vf.TaskData):
    answer: str


class QATask(vf.Task[QAData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def exact(self, task: QAData, trace: Any) -> float:
        return float(trace.last_reply.strip() == task.answer)

    @vf.reward(weight=0.5)
    async def short(self, trace: Any) -> float:
        return float(len(trace.last_reply) < 12)

    @vf.metric
    async def words(self, trace: Any) -> float:
        return float(len(trace.last_reply.split()))


class QAConfig(vf.TasksetConfig):
    split: str = "train"


class QATaskset(vf.Taskset[QATask, QAConfig]):
    def load(self):
        rows = ROWS[:4] if self.config.split == "train" else ROWS[4:]
        for r in rows:
            yield QATask(
                QAData(
                    prompt=r["question"], answer=r["answer"], system_prompt="Answer in one word."
                ),
                self.config.task,
            )


TASKSET = f"{__name__}:QATaskset"
ARGS = {
    "taskset": TASKSET,
    "test_taskset_args": {"split": "test"},
    "reward_range": [0.0, 1.5],
    "sampling": {"max_tokens": 8},
}


class FakeOpenAI:
    """Answers `capital of X?` right for every country but Italy; records every request."""

    def __init__(self, status: int = 200):
        self.requests: list[dict[str, Any]] = []
        seen, st = self.requests, status

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if self.path.endswith("/reward"):
                    return self._send(200, {"ok": True})
                if st != 200:
                    return self._send(st, {"error": {"message": "engine on fire"}})
                q = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
                answers = {r["question"]: r["answer"] for r in ROWS}
                reply = "I think it is Milan" if "Italy" in q else answers.get(q, "?")
                self._send(
                    200,
                    {
                        "id": "c1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": reply},
                            }
                        ],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                    },
                )

            def _send(self, code, obj):
                out = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    f = FakeOpenAI()
    yield f
    f.close()


@pytest.fixture(scope="module", autouse=True)
async def _release_serving():
    yield
    await release_serving()


def _ctx(f: FakeOpenAI, sid: str) -> AgentContext:
    return AgentContext(base_url=f.url, api_key="sk-test", model="tiny", session_id=sid)


def test_builtin_name_and_splits():
    env = make_env("verifiers", ARGS)
    assert isinstance(env, VerifiersEnv) and env.black_box
    assert env.num_tasks("train") == 4 and env.num_tasks("test") == 2
    t = env.get_task("test", 1)
    assert t.split == "test" and t.answer == "Santiago"
    assert t.prompt == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "capital of Chile?"},
    ]
    ids = {env.get_task(s, i).task_id for s in ("train", "test") for i in range(env.num_tasks(s))}
    assert len(ids) == 6
    # Without a test taskset, a deterministic hash split of the task keys.
    a = make_env("verifiers", {"taskset": TASKSET, "test_fraction": 0.5, "reward_range": [0, 1.5]})
    b = make_env("verifiers", {"taskset": TASKSET, "test_fraction": 0.5, "reward_range": [0, 1.5]})
    split = [
        [x.get_task(s, i).prompt for s in ("train", "test") for i in range(x.num_tasks(s))]
        for x in (a, b)
    ]
    assert split[0] == split[1] and a.num_tasks("train") + a.num_tasks("test") == 4
    assert a.num_tasks("test") >= 1


async def test_episode_through_endpoint_is_scored_by_verifiers(fake):
    env = make_env("verifiers", ARGS)
    task = env.get_task("train", 0)  # France -> Paris, answered right
    await env.run_agent(task, _ctx(fake, "sess-1"))
    res = await env.score(task, "ignored")
    assert res.reward == pytest.approx(1.5)  # exact (1.0) + 0.5 * short (1.0)
    assert res.info["vf/reward/exact"] == 1.0 and res.info["vf/reward/short"] == 0.5
    assert res.info["vf/metric/words"] == 1.0
    (req,) = fake.requests
    # The climbrl session id rides in the body (vLLM reads it before the header, which
    # verifiers sets to its own trace id); the key, model and sampling are the run's.
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["session_id"] == "sess-1" and req["body"]["model"] == "tiny"
    assert req["body"]["max_tokens"] == 8
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"]["messages"] == task.prompt

    env2 = make_env("verifiers", ARGS)
    wrong = env2.get_task("train", 1)  # Italy: the fake model answers wrong and long
    await env2.run_agent(wrong, _ctx(fake, "sess-2"))
    res2 = await env2.score(wrong, "")
    assert res2.reward == 0.0 and res2.info["vf/metric/words"] == 5.0
    assert fake.requests[-1]["body"]["session_id"] == "sess-2"


async def test_reward_posted_in_agent_mode(fake):
    env = make_env("verifiers", {**ARGS, "reward": "agent"})
    task = env.get_task("test", 0)  # Peru -> Lima
    await env.run_agent(task, _ctx(fake, "sess-3"))
    post = fake.requests[-1]
    assert post["path"] == "/v1/climbrl/sessions/sess-3/reward"
    assert post["body"]["reward"] == pytest.approx(1.5)
    assert post["body"]["metrics"]["vf/reward/exact"] == 1.0
    assert post["headers"]["Authorization"] == "Bearer sk-test"


async def test_failed_model_call_fails_the_episode():
    f = FakeOpenAI(status=500)
    try:
        env = make_env("verifiers", ARGS)
        task = env.get_task("train", 0)
        with pytest.raises(RuntimeError, match="verifiers episode failed.*500"):
            await env.run_agent(task, _ctx(f, "sess-4"))
        with pytest.raises(RuntimeError, match="score"):
            await env.score(task, "")
    finally:
        f.close()


async def test_reward_outside_range_is_refused(fake):
    env = make_env("verifiers", {**ARGS, "reward_range": [0.0, 1.0]})
    task = env.get_task("train", 0)
    with pytest.raises(ValueError, match="outside reward_range"):
        await env.run_agent(task, _ctx(fake, "sess-5"))


async def test_text_protocol_scores_one_reply():
    env = make_env("verifiers", ARGS)
    task = env.get_task("train", 2)  # Spain
    await env.reset(task)
    right = await env.step("Madrid")
    assert right.done and right.reward == pytest.approx(1.5)
    wrong = await env.step("It is probably Barcelona, I guess")
    assert wrong.reward == 0.0 and wrong.info["vf/metric/words"] == 6.0


def test_example_taskset_and_bad_config():
    env = make_env(
        "verifiers",
        {
            "taskset": "climbrl.envs.adapters.verifiers:AdditionTaskset",
            "taskset_args": {"num_tasks": 30},
        },
    )
    assert env.num_tasks("train") + env.num_tasks("test") == 30
    t = env.get_task("train", 0)
    a, b = map(int, re.findall(r"\d+", t.prompt[-1]["content"]))
    assert t.answer == str(a + b) and env.reference_turns(t) == [str(a + b)]
    with pytest.raises(ValueError, match="taskset"):
        make_env("verifiers", {})
    with pytest.raises(ValueError, match="cannot load verifiers env"):
        make_env("verifiers", {"taskset": "no_such_verifiers_taskset_xyz"})
    with pytest.raises(ValueError, match="reward must be"):
        make_env("verifiers", {**ARGS, "reward": "judge"})

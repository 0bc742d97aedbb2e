"""The HTTP layer without an engine: deny-by-default API keys, the run's generated key, body,
``n``, ``max_tokens`` and per-key concurrency limits, and bounded session capture (the ASGI
middlewares over a fake app, driven by httpx)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time

import httpx
import pytest

from climbrl.config import ServeCfg
from climbrl.serving.app import (
    ApiKeyMiddleware,
    RequestLimitsMiddleware,
    always_keyed,
    check_api_keys,
    run_api_key,
)
from climbrl.serving.capture import SessionLimitError, SessionStore


def _echo_app(seen: list | None = None, gate: asyncio.Event | None = None):
    """Answers 200 with the request body's length; waits for ``gate`` if given."""

    async def app(scope, receive, send):
        body = b""
        if scope["type"] == "http":
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
        if seen is not None:
            seen.append((scope["path"], body))
        if gate is not None:
            await gate.wait()
        raw = json.dumps({"len": len(body)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    return app


def _stack(keys: list[str], **limits) -> tuple[ApiKeyMiddleware, list]:
    seen: list = []
    app = RequestLimitsMiddleware(_echo_app(seen), ServeCfg(**limits))
    return ApiKeyMiddleware(app, keys), seen


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


# vLLM 0.32's routes that answered 200 without a key under a prefix guard, and the rest
VLLM_PATHS = [
    "/invocations",
    "/generative_scoring",
    "/scale_elastic_ep",
    "/metrics",
    "/docs",
    "/openapi.json",
    "/v1/models",
    "/v1/chat/completions",
    "/tokenize",
    "/climbrl/pin",
    "/v1/climbrl/sessions/s/reward",
    "/pause",
    "/collective_rpc",
    "/some/route/vllm/adds/later",
]


async def test_every_path_but_health_and_ping_needs_the_key():
    app, _ = _stack(["k1", "k2"])
    async with _client(app) as c:
        for path in VLLM_PATHS:
            r = await c.post(path, json={})
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            bad = await c.post(path, json={}, headers={"Authorization": "Bearer k3"})
            assert bad.status_code == 401
            ok = await c.post(path, json={}, headers={"Authorization": "Bearer k2"})
            assert ok.status_code == 200, path
        for path in ("/health", "/ping"):
            assert (await c.get(path)).status_code == 200


async def test_without_a_key_pin_and_session_rewards_stay_closed():
    app, _ = _stack([])
    async with _client(app) as c:
        assert (await c.post("/v1/chat/completions", json={})).status_code == 200
        for path in (
            "/climbrl/pin",
            "/v1/climbrl/pin",
            "/climbrl/sessions/a/reward",
            "/v1/climbrl/sessions/a/reward/",
        ):
            r = await c.post(path, json={"version": None})
            assert r.status_code == 401 and "--api-key" in r.json()["error"]["message"]
    assert always_keyed("/v1/climbrl/pin") and not always_keyed("/climbrl/sessions/a")


def test_empty_keys_and_open_binds_beyond_loopback_are_refused():
    with pytest.raises(ValueError, match="empty"):
        check_api_keys([""], "127.0.0.1")
    with pytest.raises(ValueError, match="empty"):
        check_api_keys(["  "], "127.0.0.1")
    with pytest.raises(ValueError, match="without an API key"):
        check_api_keys([], "0.0.0.0")
    with pytest.raises(ValueError, match="without an API key"):
        check_api_keys([], "10.0.0.5")
    assert check_api_keys([], "127.0.0.1") == [] and check_api_keys(["k"], "0.0.0.0") == ["k"]
    with pytest.raises(ValueError, match="empty"):
        ApiKeyMiddleware(_echo_app(), [""])
    with pytest.raises(ValueError, match="serve.api_keys has an empty key"):
        ServeCfg(api_keys=["ok", ""])


def test_the_runs_generated_key_is_private_and_shared(tmp_path):
    k = run_api_key(tmp_path / "serving")
    f = tmp_path / "serving" / "api_key"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and len(k) > 40
    assert run_api_key(tmp_path / "serving") == k  # the run's other servers, a resume
    assert [p.name for p in (tmp_path / "serving").iterdir()] == ["api_key"]
    os.chmod(f, 0o644)
    with pytest.raises(ValueError, match="mode 0600"):
        run_api_key(tmp_path / "serving")


async def test_bodies_over_the_cap_are_refused_with_413_read_or_not():
    app, seen = _stack(["k"], max_body_mb=0.001)  # 1048 bytes
    h = {"Authorization": "Bearer k"}
    async with _client(app) as c:
        r = await c.post("/v1/completions", content=b"x" * 5000, headers=h)
        assert r.status_code == 413 and "serve.max_body_mb" in r.json()["error"]["message"]

        async def chunks():  # no Content-Length: counted as it arrives
            for _ in range(50):
                yield b"y" * 100

        r = await c.post("/v1/completions", content=chunks(), headers=h)
        assert r.status_code == 413
        r = await c.post("/v1/completions", content=b"z" * 500, headers=h)
        assert r.status_code == 200 and r.json() == {"len": 500}
        # unauthenticated: refused before the body is read
        assert (await c.post("/v1/completions", content=b"x" * 5000)).status_code == 401
    assert seen == [("/v1/completions", b"z" * 500)]


async def test_n_and_max_tokens_are_capped():
    app, seen = _stack(["k"], max_n=4, max_tokens=64)
    h = {"Authorization": "Bearer k"}
    async with _client(app) as c:
        for body, field in (
            ({"n": 16384}, "'n'"),
            ({"best_of": 5}, "'best_of'"),
            ({"max_tokens": 65}, "'max_tokens'"),
            ({"max_completion_tokens": 10**9}, "'max_completion_tokens'"),
        ):
            r = await c.post("/invocations", json=body, headers=h)
            assert r.status_code == 400 and field in r.json()["error"]["message"], body
        ok = {"n": 4, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
        r = await c.post("/v1/chat/completions", json=ok, headers=h)
        assert r.status_code == 200
    assert len(seen) == 1 and json.loads(seen[0][1]) == ok  # handed on unchanged


async def test_requests_in_flight_are_capped_per_key():
    gate = asyncio.Event()
    limits = RequestLimitsMiddleware(_echo_app(gate=gate), ServeCfg(max_concurrent_per_key=2))
    app = ApiKeyMiddleware(limits, ["a", "b"])
    async with _client(app) as c:
        first = [
            asyncio.create_task(
                c.post("/v1/completions", json={}, headers={"Authorization": "Bearer a"})
            )
            for _ in range(2)
        ]
        while limits.inflight.get("0", 0) < 2:
            await asyncio.sleep(0.01)
        r = await c.post("/v1/completions", json={}, headers={"Authorization": "Bearer a"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        other = asyncio.create_task(
            c.post("/v1/completions", json={}, headers={"Authorization": "Bearer b"})
        )
        while limits.inflight.get("1", 0) < 1:  # another key has its own budget
            await asyncio.sleep(0.01)
        gate.set()
        assert [(await t).status_code for t in [*first, other]] == [200, 200, 200]
    assert limits.inflight == {}


def test_a_flood_of_sessions_never_evicts_one_training_holds():
    store = SessionStore(None, max_sessions=8)
    held = store.open("train-1", held=True)
    for i in range(1000):
        store.open(f"flood-{i}")
    assert store.get("train-1") is held and len(store.sessions) == 9
    assert store.evicted == 992 and "flood-999" in store.sessions
    assert store.open("flood-999", held=True).held  # a training episode takes it over
    for i in range(20):
        store.open(f"more-{i}")
    assert store.get("flood-999") is not None and store.get("train-1") is held
    assert store.pop("train-1") is held and store.get("train-1") is None


def test_sessions_age_out_and_are_bounded_in_turns_and_bytes():
    store = SessionStore(None, max_sessions=100, max_turns=2, max_bytes=32 * 100, max_age_s=60)
    old = store.open("old")
    keep = store.open("keep", held=True)
    old.created = keep.created = time.time() - 120
    store.open("new")
    assert store.get("old") is None and store.get("keep") is keep  # held: kept at any age
    s = store.open("s")
    store.check_room(s, 10)
    with pytest.raises(SessionLimitError, match="session_max_mb"):
        store.check_room(s, 200)
    s.turns = 2
    with pytest.raises(SessionLimitError, match="session_max_turns"):
        store.check_room(s, 1)


async def test_a_body_somewhat_over_the_cap_is_drained_before_the_413():
    """Read on and dropped (so a client that writes its whole body first sees the 413); one
    far over the cap is answered at once."""
    seen: list = []
    mw = RequestLimitsMiddleware(_echo_app(seen), ServeCfg(max_body_mb=0.001))  # 1048 bytes

    async def call(total: int, declared: bool) -> tuple[int, int]:
        chunks = [b"x" * 100] * (total // 100)
        read = 0

        async def receive() -> dict:
            nonlocal read
            if not chunks:
                return {"type": "http.disconnect"}
            c = chunks.pop(0)
            read += len(c)
            return {"type": "http.request", "body": c, "more_body": bool(chunks)}

        out: list = []

        async def send(msg: dict) -> None:
            out.append(msg)

        headers = [(b"content-length", str(total).encode())] if declared else []
        await mw(
            {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers},
            receive,
            send,
        )
        return out[0]["status"], read

    assert await call(3000, declared=True) == (413, 3000)  # drained
    assert await call(3000, declared=False) == (413, 3000)
    assert await call(100_000, declared=True) == (413, 0)  # far over: at once
    status, read = await call(100_000, declared=False)
    assert status == 413 and read <= 4 * 1048 + 100  # stops reading past the drain bound
    assert seen == [] and mw.inflight == {}


def test_climbrl_serve_refuses_an_empty_key_and_an_open_public_bind(monkeypatch, capsys):
    from climbrl.cli import main

    monkeypatch.setenv("CLIMBRL_API_KEY", "")  # set but empty: an error, not "no key"
    assert main(["serve", "/no/model"]) == 2
    assert "an API key is empty" in capsys.readouterr().err
    monkeypatch.delenv("CLIMBRL_API_KEY")
    assert main(["serve", "/no/model", "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err
    assert main(["serve", "/no/model", "--api-key", "k", "--max-n", "0"]) == 2
    assert "max_n" in capsys.readouterr().err

"""The OpenAI-compatible HTTP API, on vLLM's own OpenAI layer, over an engine climbrl owns.

    climbrl serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [-- VLLM_ARGS...]

The app is vLLM's (``build_app`` + ``init_app_state``: /v1/models, /v1/completions,
/v1/chat/completions streamed or not, logprobs, tool calls through vLLM's tool parsers, /health,
/metrics, /openapi.json), built over an ``AsyncLLM`` that climbrl created, so a rollout server can
expose the very engine that the learner updates. climbrl adds:

- ``x-climbrl-weight-version`` on every generation response (and ``climbrl_weight_version`` in
  each JSON body / stream chunk): the weight version that produced the tokens. If an update
  landed mid-request, ``x-climbrl-weight-versions`` lists every version involved.
- ``GET /climbrl/weight_version``, ``POST /climbrl/pin {"version": N | null}`` (pin the served
  version, or follow the learner's latest).
- Sessions (black-box agent capture, see ``serving.capture``): ``GET /climbrl/sessions/{id}``,
  ``POST /climbrl/sessions/{id}/reward {"reward": float}``.
- Optional API keys (401 with an OpenAI-style error body), loopback bind by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from climbrl.serving.capture import CURRENT_REQUEST, RequestInfo, SessionStore, instrument_engine
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("climbrl.serving")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
# Left out: /v1/systemone answers 501 without a structured-decision model; vLLM 0.32's
# Responses API answers 500 to some malformed requests (found by schemathesis).
UNSERVED_ROUTES = ("/v1/systemone", "/v1/responses")
GUARDED_PREFIXES = ("/v1", "/climbrl", "/tokenize", "/detokenize", "/inference")


def openai_error(status: int, message: str, type_: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code or status}}


async def _send_json(send: Callable, status: int, body: dict,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": raw})


class ApiKeyMiddleware:
    """Bearer-token auth on the API routes; /health, /metrics and /openapi.json stay open."""

    def __init__(self, app: Any, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        if scope["path"].startswith(GUARDED_PREFIXES):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            ok = scheme.lower() == b"bearer" and any(
                secrets.compare_digest(token, k) for k in self.keys)
            if not ok:
                return await _send_json(
                    send, 401,
                    openai_error(401, "Incorrect or missing API key: send 'Authorization: "
                                 "Bearer <key>'.", "authentication_error", "invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class WeightVersionMiddleware:
    """Stamps generation responses with the weight version that produced them."""

    def __init__(self, app: Any, current_version: Callable[[], int]):
        self.app = app
        self.current_version = current_version

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        info = RequestInfo()
        token = CURRENT_REQUEST.set(info)
        state: dict[str, Any] = {"start": None, "stream": False, "body": [], "buf": b""}

        def version() -> int:
            return info.last_version if info.last_version is not None else self.current_version()

        def version_headers() -> list[tuple[bytes, bytes]]:
            h = [(b"x-climbrl-weight-version", str(version()).encode())]
            if len(info.versions) > 1:
                h.append((b"x-climbrl-weight-versions",
                          ",".join(map(str, sorted(info.versions))).encode()))
            return h

        def stamp(obj: Any) -> Any:
            if isinstance(obj, dict) and "error" not in obj:
                obj["climbrl_weight_version"] = version()
                if len(info.versions) > 1:
                    obj["climbrl_weight_versions"] = sorted(info.versions)
            return obj

        async def wrapped_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers") or [])
                ctype = dict(headers).get(b"content-type", b"")
                state["stream"] = ctype.startswith(b"text/event-stream")
                if state["stream"]:
                    await send({**msg, "headers": headers + version_headers()})
                else:
                    state["start"] = msg
                return
            if msg["type"] != "http.response.body":
                return await send(msg)
            if state["stream"]:
                data = state["buf"] + msg.get("body", b"")
                *events, state["buf"] = data.split(b"\n\n")
                out = b"".join(_stamp_event(e, stamp) + b"\n\n" for e in events)
                if not msg.get("more_body", False) and state["buf"]:
                    out += state["buf"]
                    state["buf"] = b""
                return await send({**msg, "body": out})
            state["body"].append(msg.get("body", b""))
            if msg.get("more_body", False):
                return
            raw = b"".join(state["body"])
            try:
                raw = json.dumps(stamp(json.loads(raw))).encode()
            except ValueError:
                pass
            start = state["start"]
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers += [(b"content-length", str(len(raw)).encode())]
            if start["status"] < 400:
                headers += version_headers()
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": raw})

        try:
            await self.app(scope, receive, wrapped_send)
        finally:
            CURRENT_REQUEST.reset(token)


def _stamp_event(event: bytes, stamp: Callable[[Any], Any]) -> bytes:
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return event
    try:
        return b"data: " + json.dumps(stamp(json.loads(event[6:]))).encode()
    except ValueError:
        return event


class ServingControl:
    """What the HTTP layer needs from whoever owns the engine (standalone or rollout server)."""

    def __init__(self) -> None:
        self.version = 0
        self.pinned: int | None = None
        self.on_unpin: Callable[[], Awaitable[None]] | None = None

    def current_version(self) -> int:
        return self.version


def vllm_args(model: str, extra: list[str] | None = None, **kw: Any) -> argparse.Namespace:
    """vLLM's own `serve` arguments (defaults, validation) for the app layer."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", model, *(extra or [])]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    for k, v in kw.items():
        setattr(args, k, v)
    validate_parsed_serve_args(args)
    return args


def user_engine_options(model: str, extra: list[str] | None) -> dict[str, Any]:
    """The vLLM engine options that ``extra`` sets to something other than vLLM's default."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    if not extra:
        return {}
    base, given = vllm_args(model), vllm_args(model, extra)
    out = {}
    for f in dataclasses.fields(AsyncEngineArgs):
        if f.name != "model" and getattr(given, f.name, None) != getattr(base, f.name, None):
            out[f.name] = getattr(given, f.name)
    return out


async def build_serving_app(
    engine: Any,
    args: argparse.Namespace,
    control: ServingControl,
    tokenizer: Any,
    api_keys: list[str] | None = None,
) -> tuple[Any, SessionStore]:
    """vLLM's FastAPI app over ``engine``, plus climbrl's routes and middleware, as one ASGI
    app for uvicorn."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    store = SessionStore(tokenizer)
    instrument_engine(engine, store, control.current_version)
    supported = await engine.get_supported_tasks()
    args.api_key = None  # climbrl's middleware does auth, with OpenAI-style errors
    app = build_app(args, supported, engine.model_config)
    await init_app_state(engine, app.state, args, supported)
    app.state.climbrl_control = control
    app.state.climbrl_sessions = store

    r = APIRouter(prefix="/climbrl")

    def err(status: int, msg: str, type_: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(openai_error(status, msg, type_), status_code=status)

    @r.get("/weight_version")
    async def weight_version() -> dict:
        return {"weight_version": control.version, "pinned": control.pinned}

    @r.post("/pin")
    async def pin(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return err(400, "body must be JSON: {\"version\": N} or {\"version\": null}")
        if not isinstance(body, dict) or "version" not in body:
            return err(400, "body must be {\"version\": N} to pin or {\"version\": null} to "
                       "follow the latest weights")
        v = body["version"]
        if v is None:
            control.pinned = None
            if control.on_unpin is not None:
                await control.on_unpin()
        elif isinstance(v, int) and not isinstance(v, bool):
            if v != control.version:
                return err(409, f"the engine holds weight version {control.version}; only the "
                           "version being served can be pinned", "conflict_error")
            control.pinned = v
        else:
            return err(400, "version must be an integer or null")
        return {"weight_version": control.version, "pinned": control.pinned}

    @r.get("/sessions/{sid}")
    async def get_session(sid: str) -> Any:
        s = store.get(sid)
        if s is None:
            return err(404, f"no session {sid!r}", "not_found_error")
        return s.to_dict()

    @r.post("/sessions/{sid}/reward")
    async def post_reward(sid: str, request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return err(400, "body must be JSON: {\"reward\": float}")
        reward = body.get("reward") if isinstance(body, dict) else None
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or reward != reward:
            return err(400, "'reward' must be a finite number")
        metrics = body.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in metrics.values()
        ):
            return err(400, "'metrics' must map names to numbers")
        s = store.get(sid)
        if s is None or s.turns == 0:
            return err(404, f"session {sid!r} has no recorded turns; send its requests with "
                       "the X-Session-ID header (or a session_id field) first", "not_found_error")
        if s.finished.is_set():
            return err(409, f"session {sid!r} already has a reward", "conflict_error")
        s.reward = float(reward)
        s.metrics = {k: float(v) for k, v in metrics.items()}
        s.finished.set()
        return {"session_id": sid, "reward": s.reward, "turns": s.turns}

    # Routes that answer a client's bad request with a 5xx are left out (UNSERVED_ROUTES).
    app.router.routes = [rt for rt in app.router.routes
                         if not getattr(rt, "path", "").startswith(UNSERVED_ROUTES)]
    app.include_router(r)
    app.include_router(r, prefix="/v1")  # so an OpenAI client's base_url reaches it too
    # vLLM's app has already built its middleware stack; ours wrap it from outside.
    asgi: Any = WeightVersionMiddleware(app, current_version=control.current_version)
    if api_keys:
        asgi = ApiKeyMiddleware(asgi, keys=list(api_keys))
    return asgi, store


async def run_http(app: Any, host: str, port: int, log_level: str = "warning") -> Any:
    """Start uvicorn on ``host:port`` inside the running loop (no signal handlers of its own).
    Returns (server, task); ``server.servers[0].sockets`` gives the bound port."""
    import uvicorn
    from vllm.entrypoints.launchers.launcher import NoSignalServer

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_keep_alive=5)
    server = NoSignalServer(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the bind error
            raise RuntimeError(f"HTTP server on {host}:{port} stopped during start-up")
        await asyncio.sleep(0.05)
    return server, task


def bound_port(server: Any) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1])


async def serve_model(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: list[str] | None = None,
    served_model_name: str | None = None,
    kv_cache_gb: float = 1.0,
    max_model_len: int | None = None,
    dtype: str = "auto",
    vllm_extra: list[str] | None = None,
    ready_file: str | None = None,
) -> None:
    """`climbrl serve`: one engine, vLLM's OpenAI app, until SIGINT/SIGTERM."""
    import signal

    from transformers import AutoTokenizer

    args = vllm_args(model, vllm_extra, host=host, port=port,
                     served_model_name=[served_model_name] if served_model_name else None)
    from climbrl.rollout.engine import engine_args, prepare_vllm_env
    from vllm.v1.engine.async_llm import AsyncLLM

    prepare_vllm_env(kv_cache_gb)
    ea = engine_args(model, dtype=dtype, kv_cache_gb=kv_cache_gb, max_model_len=max_model_len,
                     enforce_eager=True, max_num_seqs=64, replay_mask=False)
    for k, v in user_engine_options(model, vllm_extra).items():
        setattr(ea, k, v)  # vLLM engine options given after `--` win over climbrl's defaults
    engine = AsyncLLM.from_engine_args(ea)
    try:
        control = ServingControl()
        await engine.update_weight_version(str(control.version))
        tok = AutoTokenizer.from_pretrained(model)
        app, _ = await build_serving_app(engine, args, control, tok, api_keys)
        server, task = await run_http(app, host, port)
        real_port = bound_port(server)
        msg = f"climbrl serve: {model} on http://{host}:{real_port}/v1"
        print(msg, flush=True)
        if ready_file:
            from pathlib import Path

            Path(ready_file).write_text(json.dumps({"host": host, "port": real_port}))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        done, _ = await asyncio.wait(
            [task, loop.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
    finally:
        engine.shutdown()

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
- API keys, deny by default: with a key configured every path but ``/health`` and ``/ping``
  needs it (vLLM's ``/invocations``, ``/metrics``, ``/docs`` too), answered 401 with an
  OpenAI-style error body. A server without a key binds loopback only, and even then
  ``/climbrl/pin`` and the session reward endpoint need a key (they answer 401). Inside a
  training run a rollout server without a configured key generates one per run
  (``OUTPUT_DIR/serving/api_key``, mode 0600, next to the URL files).
- Limits (``ServeCfg``): request bodies up to ``max_body_mb`` (413), ``n`` / ``best_of`` up to
  ``max_n`` and ``max_tokens`` / ``max_completion_tokens`` up to ``max_tokens`` (400), at most
  ``max_concurrent_per_key`` requests in flight per key (429); session capture is bounded by
  ``serving.capture.SessionStore``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from climbrl.config import ServeCfg
from climbrl.serving.capture import CURRENT_REQUEST, RequestInfo, SessionStore, instrument_engine

log = logging.getLogger("climbrl.serving")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
# Left out: /v1/systemone answers 501 without a structured-decision model; vLLM 0.32's
# Responses API answers 500 to some malformed requests (found by schemathesis).
UNSERVED_ROUTES = ("/v1/systemone", "/v1/responses")
# the only paths open without a key (deny by default: vLLM adds routes from version to version)
OPEN_PATHS = frozenset({"/health", "/ping"})
API_KEY_FILE = "api_key"


def always_keyed(path: str) -> bool:
    """Paths that change what training sees: they need a key even on a server without one."""
    p = path.rstrip("/").removeprefix("/v1")
    return p == "/climbrl/pin" or (p.startswith("/climbrl/sessions/") and p.endswith("/reward"))


def check_api_keys(keys: list[str], host: str) -> list[str]:
    """``keys`` if usable on ``host``; ValueError for an empty key, or for a bind beyond
    loopback without any key."""
    from climbrl.wirekeys import is_loopback

    for k in keys:
        if not k or not k.strip():
            raise ValueError(
                "an API key is empty: pass a non-empty --api-key / serve.api_keys "
                "entry, or unset CLIMBRL_API_KEY"
            )
    if not keys and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host} without an API key: pass --api-key "
            "(or CLIMBRL_API_KEY / serve.api_keys), or bind 127.0.0.1"
        )
    return list(keys)


def run_api_key(folder: Path) -> str:
    """The run's generated API key in ``folder/api_key`` (mode 0600): created once, by the
    first server of the run to get here, and read by the others and by a resumed run."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / API_KEY_FILE
    if not path.exists():
        tmp = folder / f".{API_KEY_FILE}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("sk-climbrl-" + secrets.token_urlsafe(32))
        try:
            os.link(tmp, path)  # atomic, and never over a key another server wrote first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ValueError(
                f"{path} must be a file of this user with mode 0600 (it holds the "
                "run's API key): remove it and start again"
            )
        key = f.read().strip()
    if not key:
        raise ValueError(f"{path} is empty: remove it and start again")
    return key


def openai_error(status: int, message: str, type_: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code or status}}


async def _send_json(
    send: Callable, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


def _unauthorized(message: str) -> dict:
    return openai_error(401, message, "authentication_error", "invalid_api_key")


class ApiKeyMiddleware:
    """Bearer-token auth, deny by default: every path but ``OPEN_PATHS`` needs one of
    ``keys``. With no keys (a loopback server started without one) every path is open but
    those ``always_keyed``, which answer 401. The matched key goes in ``scope["climbrl_key"]``
    (its index) for the per-key limits."""

    def __init__(self, app: Any, keys: list[str]):
        self.app = app
        for k in keys:
            if not k:
                raise ValueError("an API key is empty: every key must be a non-empty string")
        self.keys = [k.encode() for k in keys]

    def _match(self, scope: dict) -> int | None:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        hits = [secrets.compare_digest(token, k) for k in self.keys]  # every key, always
        return hits.index(True) if any(hits) else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if not self.keys and not always_keyed(path):
            scope["climbrl_key"] = "-"
            return await self.app(scope, receive, send)
        idx = self._match(scope) if self.keys else None
        if idx is not None:
            scope["climbrl_key"] = str(idx)
            return await self.app(scope, receive, send)
        if kind == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        msg = (
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'."
            if self.keys
            else f"{path} needs an API key and this server has none: start it with "
            "--api-key (or serve.api_keys)"
        )
        return await _send_json(send, 401, _unauthorized(msg), [(b"www-authenticate", b"Bearer")])


class RequestLimitsMiddleware:
    """Per-request bounds (``ServeCfg``): body size (413), ``n`` / ``best_of`` and
    ``max_tokens`` / ``max_completion_tokens`` in JSON bodies (400), requests in flight per
    key (429). The body is read here, up to the cap, and handed on unchanged."""

    LIMITED_METHODS = ("POST", "PUT", "PATCH")
    DRAIN_FACTOR = 4  # see _read_body

    def __init__(self, app: Any, limits: ServeCfg):
        self.app = app
        self.max_body = int(limits.max_body_mb * 2**20)
        self.max_n = limits.max_n
        self.max_tokens = limits.max_tokens
        self.max_inflight = limits.max_concurrent_per_key
        self.inflight: dict[str, int] = {}
        self.refused: dict[int, int] = {}  # status -> count

    async def _refuse(
        self, send: Callable, status: int, message: str, type_: str, code: str
    ) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1
        await _send_json(send, status, openai_error(status, message, type_, code))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        key = scope.get("climbrl_key", "-")
        if self.inflight.get(key, 0) >= self.max_inflight:
            return await self._refuse(
                send,
                429,
                f"too many requests in flight for this API key (at most "
                f"{self.max_inflight}, serve.max_concurrent_per_key): retry when one ends",
                "rate_limit_error",
                "rate_limit_exceeded",
            )
        self.inflight[key] = self.inflight.get(key, 0) + 1
        try:
            if scope.get("method") in self.LIMITED_METHODS:
                body = await self._read_body(scope, receive, send)
                if body is None:
                    return
                problem = self._check_json(body)
                if problem:
                    return await self._refuse(
                        send, 400, problem, "invalid_request_error", "limit_exceeded"
                    )
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.inflight[key] -= 1
            if not self.inflight[key]:
                del self.inflight[key]

    async def _read_body(self, scope: dict, receive: Callable, send: Callable) -> bytes | None:
        """The whole body, or None once a refusal has been sent (or the client left). A body
        over the cap is read on and dropped, up to ``DRAIN_FACTOR`` times the cap, before the
        413 goes out: a client that sends its whole body before it reads the answer (most
        do) then gets the 413 instead of a reset connection."""
        too_big = f"request body over {self.max_body} bytes (serve.max_body_mb)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and not length.isdigit():
            await self._refuse(
                send, 400, "bad Content-Length header", "invalid_request_error", "bad_request"
            )
            return None
        drain = self.DRAIN_FACTOR * self.max_body
        over = length is not None and int(length) > self.max_body
        chunks: list[bytes] = []
        size = 0
        # far over: answer at once (the client may see a reset connection)
        while not (length is not None and int(length) > drain):
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            over = over or size > self.max_body
            if over:
                chunks.clear()  # dropped as it arrives: memory stays at one chunk
                if size > drain:
                    break
            else:
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        if over:
            await self._refuse(send, 413, too_big, "invalid_request_error", "request_too_large")
            return None
        return b"".join(chunks)

    def _check_json(self, body: bytes) -> str | None:
        if not body.lstrip().startswith(b"{"):
            return None
        try:
            req = json.loads(body)
        except ValueError:
            return None  # vLLM answers malformed JSON itself
        if not isinstance(req, dict):
            return None
        for field, cap, knob in (
            ("n", self.max_n, "max_n"),
            ("best_of", self.max_n, "max_n"),
            ("max_tokens", self.max_tokens, "max_tokens"),
            ("max_completion_tokens", self.max_tokens, "max_tokens"),
        ):
            v = req.get(field)
            if isinstance(v, int) and not isinstance(v, bool) and v > cap:
                return f"'{field}' is {v}; this server allows at most {cap} (serve.{knob})"
        return None


def _replay(body: bytes, receive: Callable) -> Callable:
    """An ASGI ``receive`` that gives ``body`` once, then the client's own messages
    (a disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


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
                h.append(
                    (
                        b"x-climbrl-weight-versions",
                        ",".join(map(str, sorted(info.versions))).encode(),
                    )
                )
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
    # vLLM's parse_args has no return annotation; pyright infers Namespace | None from argparse
    args = cast(argparse.Namespace, make_arg_parser(FlexibleArgumentParser()).parse_args(argv))
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
    limits: ServeCfg | None = None,
) -> tuple[Any, SessionStore]:
    """vLLM's FastAPI app over ``engine``, plus climbrl's routes and middleware, as one ASGI
    app for uvicorn. ``limits``: the bounds of ``ServeCfg`` (its defaults when None)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    limits = limits or ServeCfg()
    store = SessionStore(
        tokenizer,
        max_sessions=limits.max_sessions,
        max_turns=limits.session_max_turns,
        max_bytes=int(limits.session_max_mb * 2**20),
        max_age_s=limits.session_max_age_s,
    )
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
            return err(400, 'body must be JSON: {"version": N} or {"version": null}')
        if not isinstance(body, dict) or "version" not in body:
            return err(
                400,
                'body must be {"version": N} to pin or {"version": null} to '
                "follow the latest weights",
            )
        v = body["version"]
        if v is None:
            control.pinned = None
            if control.on_unpin is not None:
                await control.on_unpin()
        elif isinstance(v, int) and not isinstance(v, bool):
            if v != control.version:
                return err(
                    409,
                    f"the engine holds weight version {control.version}; only the "
                    "version being served can be pinned",
                    "conflict_error",
                )
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
            return err(400, 'body must be JSON: {"reward": float}')
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
            return err(
                404,
                f"session {sid!r} has no recorded turns; send its requests with "
                "the X-Session-ID header (or a session_id field) first",
                "not_found_error",
            )
        if s.finished.is_set():
            return err(409, f"session {sid!r} already has a reward", "conflict_error")
        s.reward = float(reward)
        s.metrics = {k: float(v) for k, v in metrics.items()}
        s.finished.set()
        return {"session_id": sid, "reward": s.reward, "turns": s.turns}

    # Routes that answer a client's bad request with a 5xx are left out (UNSERVED_ROUTES).
    app.router.routes = [
        rt for rt in app.router.routes if not getattr(rt, "path", "").startswith(UNSERVED_ROUTES)
    ]
    app.include_router(r)
    app.include_router(r, prefix="/v1")  # so an OpenAI client's base_url reaches it too
    # vLLM's app has already built its middleware stack; ours wrap it from outside.
    asgi: Any = WeightVersionMiddleware(app, current_version=control.current_version)
    asgi = RequestLimitsMiddleware(asgi, limits)
    asgi = ApiKeyMiddleware(asgi, keys=list(api_keys or []))
    return asgi, store


async def run_http(app: Any, host: str, port: int, log_level: str = "warning") -> Any:
    """Start uvicorn on ``host:port`` inside the running loop (no signal handlers of its own).
    Returns (server, task); ``server.servers[0].sockets`` gives the bound port."""
    import uvicorn
    from vllm.entrypoints.launchers.launcher import NoSignalServer

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=5
    )
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
    limits: ServeCfg | None = None,
) -> None:
    """`climbrl serve`: one engine, vLLM's OpenAI app, until SIGINT/SIGTERM."""
    import signal

    from transformers import AutoTokenizer

    api_keys = check_api_keys(list(api_keys or []), host)
    if not api_keys:
        log.warning(
            "serving without an API key on %s: any local process can use it "
            "(/climbrl/pin and session rewards stay closed)",
            host,
        )

    args = vllm_args(
        model,
        vllm_extra,
        host=host,
        port=port,
        served_model_name=[served_model_name] if served_model_name else None,
    )
    from vllm.v1.engine.async_llm import AsyncLLM

    from climbrl.rollout.engine import engine_args, prepare_vllm_env

    prepare_vllm_env(kv_cache_gb)
    ea = engine_args(
        model,
        dtype=dtype,
        kv_cache_gb=kv_cache_gb,
        max_model_len=max_model_len,
        enforce_eager=True,
        max_num_seqs=64,
        replay_mask=False,
    )
    for k, v in user_engine_options(model, vllm_extra).items():
        setattr(ea, k, v)  # vLLM engine options given after `--` win over climbrl's defaults
    engine = AsyncLLM.from_engine_args(ea)
    try:
        control = ServingControl()
        await engine.update_weight_version(str(control.version))
        tok = AutoTokenizer.from_pretrained(model)
        app, _ = await build_serving_app(engine, args, control, tok, api_keys, limits)
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

"""vLLM's OpenAI API on a rollout server's engine: ``start_http``.

It starts when the config asks for it (``serve.enabled``) or when the env is a black-box agent
env, which needs an endpoint for its agent. The API never runs open: without a configured key
(``serve.api_keys``, ``CLIMBRL_API_KEY``) one is generated per run and written next to the URL
files. Each server writes ``<output_dir>/serving/<server_id>.json`` with its URL, model name,
pid and key file. A client may pin the served weight version (``POST .../pin``): the server
then defers weight updates (``climbrl.rollout.weight_receiver``) until it unpins.

Tests: ``pytest tests/integration/test_custom_env.py``; the API itself in ``serving/``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from climbrl.config import Config
from climbrl.envs.base import resolve_env

log = logging.getLogger("climbrl.rollout")


@dataclass
class HttpApi:
    """The API on this engine, and what an agent episode needs from it."""

    url: str  # http://host:port (the OpenAI base URL is url + "/v1")
    control: Any  # climbrl.serving.app.ServingControl: version served, pin
    sessions: Any  # climbrl.serving.capture.SessionStore: one per agent episode
    agent_key: str  # the API key agents of this server use
    served_name: str  # the model name the API serves
    server: Any  # (uvicorn server, its task), from climbrl.serving.app.run_http

    async def close(self) -> None:
        self.server[0].should_exit = True
        await asyncio.wait([self.server[1]], timeout=5)


def needs_http(cfg: Config) -> bool:
    """The config asks for the API, or its env is a black-box agent env."""
    return cfg.serve.enabled or bool(getattr(_env_class(cfg.env.name), "black_box", False))


async def start_http(
    cfg: Config,
    engine: Any,
    tokenizer: Any,
    *,
    model_path: str,
    server_id: str,
    version: int,
    on_unpin: Callable[[], Awaitable[None]],
) -> HttpApi:
    """Serve the OpenAI API on ``engine``; ``on_unpin`` runs when a client unpins."""
    from climbrl.serving.app import (
        API_KEY_FILE,
        ServingControl,
        bound_port,
        build_serving_app,
        check_api_keys,
        run_api_key,
        run_http,
        vllm_args,
    )

    sc = cfg.serve
    out = Path(cfg.run.output_dir) / "serving"
    keys = list(sc.api_keys) + (
        [os.environ["CLIMBRL_API_KEY"]] if "CLIMBRL_API_KEY" in os.environ else []
    )
    # no key configured: one per run, next to the URL files, so the API is never open
    keys = check_api_keys(keys or [run_api_key(out)], sc.host)
    served_name = sc.served_model_name or model_path
    control = ServingControl()
    control.version = version
    control.on_unpin = on_unpin
    if sc.follow == "pinned":
        control.pinned = version
    args = vllm_args(model_path, list(sc.vllm_args), served_model_name=[served_name])
    app, sessions = await build_serving_app(engine, args, control, tokenizer, keys, limits=sc)
    index = int(server_id[1:]) if server_id[1:].isdigit() else 0
    port = sc.port + index if sc.port else 0
    server = await run_http(app, sc.host, port)
    url = f"http://{sc.host}:{bound_port(server[0])}"
    log.info("rollout %s serves the OpenAI API on %s/v1", server_id, url)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{server_id}.json").write_text(
        json.dumps(
            {
                "server_id": server_id,
                "url": url + "/v1",
                "model": served_name,
                "pid": os.getpid(),
                "api_key_file": str(out / API_KEY_FILE) if not sc.api_keys else "",
            }
        )
    )
    return HttpApi(url, control, sessions, keys[0], served_name, server)


def _env_class(name: str) -> Any:
    try:
        return resolve_env(name)
    except ValueError:
        return None  # reported when the first order builds the env

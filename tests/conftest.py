"""Shared fixtures. ``gpu`` tests are skipped without CUDA; engine fixtures are session-wide so
the suite starts one vLLM engine for all integration tests that can share it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer trained on the copy_first task and a random 2-layer Qwen3 (float32)."""
    from climbrl.envs.tasks import corpus_for_tokenizer
    from climbrl.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus_for_tokenizer())


def run_cli(args: list[str], log: Path, timeout: float, **popen: Any) -> int:
    """``python -m climbrl.cli ARGS`` in its own session, its output in ``log``; its exit code.
    The whole process tree (vLLM's engine processes too) is stopped by PID when it ends, or
    when ``timeout`` runs out (then ``subprocess.TimeoutExpired`` fails the test)."""
    return wait_cli(start_cli(args, log, **popen), timeout)


def start_cli(args: list[str], log: Path, **popen: Any) -> subprocess.Popen:
    """``python -m climbrl.cli ARGS`` started in its own session, its output in ``log``; pair
    it with ``wait_cli``. Tests start two runs this way to overlap their start-ups (importing
    vLLM and starting an engine keeps one core busy at a time)."""
    env = {**os.environ, "CLIMBRL_LOG": "INFO", **popen.pop("env", {})}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "climbrl.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            **popen,
        )


def wait_cli(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code of a ``start_cli`` process; its whole process tree is stopped by PID when
    it ends, or when ``timeout`` runs out (then ``subprocess.TimeoutExpired`` fails the test)."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)


def kill_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a child started with start_new_session=True, and its process group, by PID."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def group_pids(pgid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getpgid(int(p.name)) == pgid and pid_alive(int(p.name)):
                    out.append(int(p.name))
            except (ProcessLookupError, PermissionError):
                pass
    return out


def write_config(path: Path, model: Path, out: Path, **sections: dict) -> Path:
    from climbrl.config import dump_toml, load_config

    overrides = [
        f"model.path={str(model)!r}".replace("'", '"'),
        f"run.output_dir={str(out)!r}".replace("'", '"'),
    ]
    for sec, vals in sections.items():
        for k, v in vals.items():
            overrides.append(
                f"{sec}.{k}={v!r}".replace("'", '"')
                if isinstance(v, str)
                else f"{sec}.{k}={str(v).lower() if isinstance(v, bool) else v}"
            )
    cfg = load_config(None, overrides)
    path.write_text(dump_toml(cfg))
    return path


@pytest.fixture(scope="session")
def serve_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real `climbrl serve` process (tests/integration/test_serving.start_serve), shared by
    test_serving and test_abuse."""
    from tests.integration.test_serving import start_serve

    tmp = tmp_path_factory.mktemp("serve")
    proc, url = start_serve(tiny_model, tmp)
    yield {"url": url, "proc": proc, "log": tmp / "serve.log"}
    kill_tree(proc)


@pytest.fixture(scope="session")
def rollout_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real `climbrl rollout` process (real vLLM engine) connected to a LearnerHub here."""
    from climbrl.learner.hub import LearnerHub

    d = tmp_path_factory.mktemp("rollout")
    cfg = write_config(
        d / "cfg.toml",
        tiny_model,
        d / "out",
        rollout={"max_model_len": 256, "kv_cache_gb": 0.5, "extra_envs": ["math"]},
        wire={"dead_after_s": 60.0},
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
            "r0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **hub.client_env()},  # the hub's credentials
    )
    deadline = time.monotonic() + 300
    hello = None
    while hello is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc)
            raise RuntimeError(
                "rollout server failed to start:\n" + (d / "rollout.log").read_text()[-3000:]
            )
        item = hub.recv(0.5)
        if item is not None:
            hello = item[1]
    yield {
        "hub": hub,
        "proc": proc,
        "server_id": "r0",
        "model": tiny_model,
        "log": d / "rollout.log",
    }
    kill_tree(proc)
    hub.close()
    log.close()

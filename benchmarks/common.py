"""Helpers shared by the benchmarks: a rollout server process driven from a LearnerHub."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# vLLM's engine-core and worker processes spin (sched_yield) on their shared-memory queue for
# 1 s after their last message, so an engine that just finished takes CPU from whatever is timed
# next: measured here, the second engine of each rollout_overhead pair ran about 25% slower.
SETTLE_S = 2.0


def settle() -> None:
    """Wait until the engines measured just before have gone quiet."""
    time.sleep(SETTLE_S)


def write_cfg(path: Path, model: Path, **sections: dict[str, Any]) -> Path:
    from climbrl.config import dump_toml, load_config

    ov = [f'model.path="{model}"', f'run.output_dir="{path.parent / "out"}"']
    for sec, vals in sections.items():
        for k, v in vals.items():
            ov.append(f"{sec}.{k}={v}")
    path.write_text(dump_toml(load_config(None, ov)))
    return path


class RolloutProc:
    """`climbrl rollout` in its own process group, connected to a LearnerHub in this process."""

    def __init__(
        self,
        cfg: Path,
        log: Path,
        timeout: float = 600,
        python_args: tuple[str, ...] = ("-m", "climbrl.cli"),
    ):
        """``python_args``: what runs the CLI (a ``-c`` script may patch the server first)."""
        from climbrl.learner.hub import LearnerHub

        self.hub = LearnerHub("127.0.0.1", 0)
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *python_args,
                "rollout",
                "--config",
                str(cfg),
                "--endpoint",
                self.hub.endpoint,
                "--server-id",
                "r0",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.hub.client_env()},  # the hub's credentials
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("rollout server failed to start; see " + str(log))
            item = self.hub.recv(0.5)
            if item is not None:
                break

    def wait_for(self, kind: type, pred: Any = lambda m: True, timeout: float = 600) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = self.hub.recv(0.5)
            if item is not None and isinstance(item[1], kind) and pred(item[1]):
                return item
        raise TimeoutError(kind.__name__)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.hub.close()
        self._log.close()


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write a benchmark's result with the date, machine and command under
    ``benchmarks/results/NAME-<UTC time>.json``; returns the path."""
    import datetime
    import json
    import platform

    import psutil

    now = datetime.datetime.now(datetime.UTC)
    record = {
        "date": now.isoformat(timespec="seconds"),
        "machine": {
            "host": platform.node(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "result": result,
    }
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stamp = f"{name}-{now:%Y%m%dT%H%M%SZ}"
    path, n = out / f"{stamp}.json", 1
    while True:  # two results in the same second each get a file: never overwrite one
        try:
            with open(path, "x") as f:
                f.write(json.dumps(record, indent=1) + "\n")
            return path
        except FileExistsError:
            n += 1
            path = out / f"{stamp}-{n}.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


async def raw_round(
    engine: Any,
    prompts: list[list[int]],
    group: int,
    max_tokens: int,
    round_index: int,
    seeded: bool = True,
    temperature: float = 1.0,
) -> tuple[int, float]:
    """One round straight into a vLLM AsyncLLM: ``group`` samples of every prompt at once
    (log-probs on, each request seeded from its round, prompt and sample index unless
    ``seeded`` is False). Returns (tokens generated, seconds)."""
    import asyncio

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    async def one(i: int, j: int) -> int:
        sp = SamplingParams(
            temperature=temperature,
            max_tokens=max_tokens,
            logprobs=0,
            seed=round_index * 100_000 + i * 100 + j if seeded else None,
        )
        out = None
        async for o in engine.generate(
            TokensPrompt(prompt_token_ids=prompts[i]),
            sp,
            request_id=f"raw-{time.monotonic_ns()}-{i}-{j}",
        ):
            out = o
        return len(out.outputs[0].token_ids)

    t = time.perf_counter()
    n = await asyncio.gather(*(one(i, j) for i in range(len(prompts)) for j in range(group)))
    return sum(n), time.perf_counter() - t


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop a child started with ``start_new_session=True`` and its process group, by PID:
    SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

"""Sandboxed runs per second against plain subprocesses of the same interpreter, per run and per
episode, on each backend, side by side in one run; writes ``benchmarks/results/sandbox-*.json``.

A run is one short Python payload (``print(sum(range(1000)))``); an episode is ``--calls`` runs
in a row, as an episode of the ``tool_use`` env makes tool calls. The baseline is a plain
``subprocess`` of the interpreter the sandbox runs (``python -s -E -c PAYLOAD``). For each
backend (bubblewrap, the Landlock fallback; skipped where unavailable) it measures:

- ``warm``: climbrl's default Sandbox, which keeps ``warm`` sandboxes started ahead (each still
  serves one run only, so no state passes between runs or episodes);
- ``cold``: ``warm=0``, each run's sandbox started when the run comes;

each sequentially (one run at a time) and with ``--concurrency`` in flight, and reports
``ratio = sandboxed runs/s / plain runs/s`` (goal: >= 0.7): plain and sandboxed batches alternate
in ``--rounds`` rounds, and ``ratio`` is the median of the rounds' ratios (with their min and
max), so that load from other processes falls on both sides alike. It also times the
costs the Landlock fork server saves (``landlock_parts``), and a cold run's milliseconds on each
backend against a plain subprocess.

    python benchmarks/sandbox.py [--runs 80] [--calls 4] [--concurrency 4] [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAYLOAD = "import sys\nprint(sum(range(1000)))\n"
OUT = "499500\n"


def plain_one(python: str) -> None:
    out = subprocess.run([python, "-s", "-E", "-c", PAYLOAD], capture_output=True, text=True)
    assert out.stdout == OUT, out


async def plain_one_async(python: str) -> None:
    p = await asyncio.create_subprocess_exec(
        python, "-s", "-E", "-c", PAYLOAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert (await p.communicate())[0] == OUT.encode()


async def timed(n: int, conc: int, one: Callable[[], Awaitable[None]]) -> float:
    """Seconds for ``n`` calls of ``one`` with at most ``conc`` in flight."""
    sem = asyncio.Semaphore(conc)

    async def guarded() -> None:
        async with sem:
            await one()

    t0 = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(n)))
    return time.perf_counter() - t0


async def compare(
    n: int,
    conc: int,
    rounds: int,
    plain: Callable[[], Awaitable[None]],
    sandboxed: Callable[[], Awaitable[None]],
    settle: Callable[[], Awaitable[None]],
) -> dict[str, float]:
    """``rounds`` rounds of a plain batch, then a sandboxed batch, of ``n // rounds`` calls each;
    runs per second of each side over all rounds, and the median of the rounds' ratios (a burst
    of load from other processes moves one round, not the median)."""
    plain_s = sb_s = 0.0
    ratios = []
    per = max(1, n // rounds)
    for _ in range(rounds):
        p = await timed(per, conc, plain)
        await settle()
        s = await timed(per, conc, sandboxed)
        plain_s, sb_s = plain_s + p, sb_s + s
        ratios.append(p / s)
    total = per * rounds
    return {
        "plain_per_s": round(total / plain_s, 1),
        "sandboxed_per_s": round(total / sb_s, 1),
        "ratio": round(sorted(ratios)[len(ratios) // 2], 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
    }


def _ms(f: Callable[[], Any], reps: int) -> float:
    """Median milliseconds of ``f`` (the median shrugs off other processes' bursts)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return round(sorted(times)[reps // 2] * 1000, 2)


def landlock_parts(python: str, reps: int = 15) -> dict[str, float]:
    """Median milliseconds of what a Landlock run would cost without the fork server, each timed
    alone: an interpreter start and the helper's imports (the fork server pays them once, and
    each payload runs in a fork of it), and the /proc scan for the per-uid process count (done
    only where no cgroup counts processes per run)."""
    from climbrl.envs import _landlock

    bare = [python, "-s", "-E", "-c", "pass"]
    helper = [python, "-s", "-E", "-c", "import ctypes, marshal, resource, select"]
    interpreter = _ms(lambda: subprocess.run(bare, check=True), reps)
    return {
        "interpreter_ms": interpreter,
        "helper_imports_ms": round(
            _ms(lambda: subprocess.run(helper, check=True), reps) - interpreter, 2
        ),
        "proc_scan_for_nproc_ms": _ms(lambda: _landlock._count_tasks(os.getuid()), reps),
    }


async def bench_backend(backend: str, a: argparse.Namespace) -> dict[str, Any]:
    from climbrl.envs.sandbox import Sandbox, SandboxUnavailableError, close_pools

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            warm = Sandbox(backend=backend)
            cold = Sandbox(backend=backend, warm=0)
        except SandboxUnavailableError as e:
            return {"skipped": str(e)[:300]}
    python = warm.python

    async def plain() -> None:
        await plain_one_async(python)

    def run_on(sb: Sandbox) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            res = await sb.run_python(PAYLOAD)
            assert res.ok and res.stdout == OUT, res

        return one

    def episode(one: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def calls() -> None:
            for _ in range(a.calls):
                await one()

        return calls

    async def refill() -> None:
        await asyncio.sleep(0.3)  # the pool's starts after the last batch

    async def nothing() -> None:
        pass

    for _ in range(3):  # warm-up: page cache, the pool, the cgroup probe
        await run_on(warm)()
        await run_on(cold)()
        await plain()
    out: dict[str, Any] = {"python": python, "warm_pool_size": warm.warm, "cgroup": warm.cgroup}
    for name, sb, settle in (("warm", warm, refill), ("cold", cold, nothing)):
        one = run_on(sb)
        out[name] = {
            "per_run": await compare(a.runs, 1, a.rounds, plain, one, settle),
            "per_run_concurrent": await compare(
                a.runs, a.concurrency, a.rounds, plain, one, settle
            ),
            "per_episode": await compare(
                a.runs // a.calls, 1, a.rounds, episode(plain), episode(one), settle
            ),
            "per_episode_concurrent": await compare(
                max(a.runs // a.calls, a.rounds * a.concurrency),
                a.concurrency,
                a.rounds,
                episode(plain),
                episode(one),
                settle,
            ),
        }

    async def cold_one() -> None:
        await run_on(cold)()

    reps = max(3, a.runs // 4)
    out["cold_run_ms"] = round(await timed(reps, 1, cold_one) / reps * 1000, 2)
    out["plain_run_ms"] = round(await timed(reps, 1, plain) / reps * 1000, 2)
    if backend == "landlock":
        out["cold_start_parts"] = landlock_parts(python)
    close_pools()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=80)
    ap.add_argument("--calls", type=int, default=4, help="runs per episode")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--no-results-file", action="store_true")
    a = ap.parse_args()
    if a.runs < a.rounds * max(a.concurrency, a.calls):
        ap.error("--runs must be at least --rounds x max(--concurrency, --calls)")
    result: dict[str, Any] = {
        "benchmark": "sandbox",
        "config": {k: v for k, v in vars(a).items() if k != "no_results_file"},
        # Other processes' load shows in every figure: both sides share the 1-minute load.
        "loadavg_1m_before": os.getloadavg()[0],
    }
    for backend in ("bwrap", "landlock"):
        result[backend] = asyncio.run(bench_backend(backend, a))
    result["loadavg_1m_after"] = os.getloadavg()[0]
    if not a.no_results_file:
        from benchmarks.common import write_result

        print(write_result("sandbox", result), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

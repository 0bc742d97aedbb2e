"""Sandboxed executions per second, and the overhead against an unsandboxed subprocess.

Runs the same short Python payload N times, sequentially and with a few in flight, three ways in
one run: a plain ``subprocess`` of the same interpreter (the baseline), climbrl's Sandbox on
bubblewrap, and on the Landlock fallback (each skipped where unavailable). Prints one JSON line.

    python benchmarks/sandbox.py [--runs 40] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import warnings

PAYLOAD = "import sys\nprint(sum(range(1000)))\n"


def plain_subprocess(python: str, runs: int) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        out = subprocess.run([python, "-s", "-E", "-c", PAYLOAD], capture_output=True, text=True)
        assert out.stdout == "499500\n", out
    return time.perf_counter() - t0


async def plain_concurrent(python: str, runs: int, conc: int) -> float:
    sem = asyncio.Semaphore(conc)

    async def one() -> None:
        async with sem:
            p = await asyncio.create_subprocess_exec(
                python, "-s", "-E", "-c", PAYLOAD, stdout=subprocess.PIPE
            )
            assert (await p.communicate())[0] == b"499500\n"

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(runs)))
    return time.perf_counter() - t0


def sandboxed(sb, runs: int) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        res = sb.run_python_sync(PAYLOAD)
        assert res.ok and res.stdout == "499500\n", res
    return time.perf_counter() - t0


async def sandboxed_concurrent(sb, runs: int, conc: int) -> float:
    sem = asyncio.Semaphore(conc)

    async def one() -> None:
        async with sem:
            res = await sb.run_python(PAYLOAD)
            assert res.ok, res

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(runs)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    from climbrl.envs.sandbox import Sandbox, SandboxUnavailableError

    report: dict = {"runs": args.runs, "concurrency": args.concurrency}
    for backend in ("bwrap", "landlock"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                sb = Sandbox(backend=backend)
            except SandboxUnavailableError as e:
                report[backend] = {"skipped": str(e)[:200]}
                continue
        # Baseline on the same interpreter the sandbox runs, side by side in this run.
        sandboxed(sb, 3)
        plain_subprocess(sb.python, 3)  # warm-up
        base_s = plain_subprocess(sb.python, args.runs)
        sb_s = sandboxed(sb, args.runs)
        base_c = asyncio.run(plain_concurrent(sb.python, args.runs, args.concurrency))
        sb_c = asyncio.run(sandboxed_concurrent(sb, args.runs, args.concurrency))
        report[backend] = {
            "python": sb.python,
            "sandboxed_runs_per_s": round(args.runs / sb_s, 1),
            "plain_runs_per_s": round(args.runs / base_s, 1),
            "overhead_ms_per_run": round((sb_s - base_s) / args.runs * 1000, 2),
            "sandboxed_runs_per_s_concurrent": round(args.runs / sb_c, 1),
            "plain_runs_per_s_concurrent": round(args.runs / base_c, 1),
            "throughput_ratio_vs_plain": round(base_s / sb_s, 3),
            "throughput_ratio_vs_plain_concurrent": round(base_c / sb_c, 3),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
    sys.exit(0)

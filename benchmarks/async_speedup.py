"""Async speedup: wall time for the same RL steps, synchronous against asynchronous.

    python benchmarks/async_speedup.py [--steps 8 --staleness 2 --weight-sync full]

Runs ``climbrl run`` twice on one config, one tiny model and one rollout server, differing only
in ``learner.max_staleness``: 0 (synchronous: generation waits for the learner's step and the
weight sync, and the learner waits for generation) and ``--staleness`` (asynchronous: the
engine generates the next batches with weights up to that many versions old while the learner
trains). The time is the learner's steady state, from the end of step 1 to the end of the last
step (metrics.jsonl ``elapsed_s``), so engine start-up and first compiles do not count; the
whole process wall time is reported beside it. Prints one JSON line; ``ratio`` = sync seconds /
async seconds (> 1: async is faster). On a CPU box the engine and the learner share the same
cores, which caps what overlap can buy; the published anchors reach 2-2.8x at cluster scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_once(tmp: Path, mdir: Path, staleness: int, a: argparse.Namespace) -> dict:
    from benchmarks.common import write_cfg

    out = tmp / f"s{staleness}"
    cfg = write_cfg(
        tmp / f"s{staleness}.toml",
        mdir,
        run={"output_dir": f'"{out}"', "seed": 0},
        learner={
            "total_steps": a.steps,
            "batch_groups": a.batch_groups,
            "group_size": a.group_size,
            "max_staleness": staleness,
            "eval_size": 0,
            "optim.lr": 1e-3,
            "weights.mode": f'"{a.weight_sync}"',
            "threads": a.learner_threads,
        },
        rollout={"max_model_len": 128, "max_tokens": a.max_tokens, "kv_cache_gb": 0.25},
    )
    t0 = time.perf_counter()
    log = open(tmp / f"s{staleness}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "climbrl.cli", "run", str(cfg), "--no-live"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        rc = proc.wait(timeout=a.timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"climbrl run failed (rc {rc}); see {tmp / f's{staleness}.log'}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == list(range(1, a.steps + 1))
    return {
        "steps_s": round(steps[-1]["elapsed_s"] - steps[0]["elapsed_s"], 2),
        "process_wall_s": round(wall, 1),
        "staleness_max": max(r.get("staleness_max", 0) for r in steps),
        "reward_last": round(steps[-1]["reward"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--staleness", type=int, default=2)
    ap.add_argument("--batch-groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--weight-sync", default="full", choices=["full", "delta", "lora"])
    ap.add_argument("--learner-threads", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    if a.staleness < 1:
        raise SystemExit("--staleness must be at least 1 (0 is the synchronous baseline)")

    from climbrl.envs.tasks import corpus_for_tokenizer
    from climbrl.tinymodel import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="climbrl-async-"))
    mdir = make_tiny_model(tmp / "model", corpus_for_tokenizer())
    sync = run_once(tmp, mdir, 0, a)
    asyn = run_once(tmp, mdir, a.staleness, a)
    print(
        json.dumps(
            {
                "benchmark": "async_speedup",
                "steps": a.steps,
                "timed_steps": a.steps - 1,
                "weight_sync": a.weight_sync,
                "sync": sync,
                f"async_staleness_{a.staleness}": asyn,
                "ratio": round(sync["steps_s"] / asyn["steps_s"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()

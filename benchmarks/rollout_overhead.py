"""Tokens/s through `climbrl rollout` against raw vLLM AsyncLLM, same prompts, same run.

    python benchmarks/rollout_overhead.py [--tasks 32 --group 8 --max-tokens 64 --rounds 8]
    python benchmarks/rollout_overhead.py --env math --tasks 8   # long chat prompts, seeded

Both engines are built with the same engine arguments and run side by side: both started
first, then measured in rounds, in A B / B A order, so each pair is seconds apart. ``ratio`` is
the median over rounds of the paired ratio; ``ratio_best`` compares the best round of each.
On the 2-vCPU machines here a single round of the same engine varies by up to 2x, so one
pair says little; the median of 8 is the figure to quote. Each measurement starts after a
2-second pause, so the engine measured before it has stopped spinning.

Baseline: the same prompt token ids and SamplingParams submitted straight to an in-process
AsyncLLM. climbrl: work orders over ZeroMQ to a rollout server process, which runs the env
episodes and returns trajectories.
``--env math`` gives chat prompts of 127-161 tokens (the math env's system and user message in
the tiny model's template): 8 tasks x 8 samples put about 9k prompt tokens in flight, several
times vLLM's per-step token budget, every request seeded (rollout.engine.chunked_prefill_default).
Prints one JSON line; ``ratio`` = climbrl tokens/s / raw tokens/s (goal >= 0.95), and writes it
with the date, machine and command under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--env", default="copy_first", help="copy_first (short text prompts) or "
                    "math (chat prompts of 127-161 tokens)")
    ap.add_argument("--no-results-file", action="store_true")
    a = ap.parse_args()

    from climbrl.envs.base import make_env
    from climbrl.envs.chat import ChatRenderer
    from climbrl.envs.tasks import corpus_for_tokenizer
    from climbrl.rollout.engine import build_engine

    from benchmarks.common import RolloutProc, raw_round, settle, write_cfg, write_result
    from climbrl.tinymodel import make_tiny_model
    from climbrl.wire import SamplingSpec, Trajectory, WorkOrder

    tmp = Path(tempfile.mkdtemp(prefix="climbrl-bench-"))
    model = make_tiny_model(tmp / "model", corpus_for_tokenizer())
    max_len, conc = 256, a.tasks * a.group
    cfg = write_cfg(tmp / "cfg.toml", model,
                    rollout={"max_model_len": max_len, "max_concurrency": conc, "kv_cache_gb": 1})
    server = RolloutProc(cfg, tmp / "rollout.log")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    env = make_env(a.env)
    loop = asyncio.new_event_loop()
    prompts = []
    for i in range(a.tasks):
        p = loop.run_until_complete(env.reset(env.get_task("train", i)))
        prompts.append(tok.encode(p, add_special_tokens=False) if isinstance(p, str)
                       else ChatRenderer(tok).prompt_ids(p))
    engine = build_engine(str(model), dtype="float32", kv_cache_gb=1, max_model_len=max_len,
                          max_num_seqs=conc)

    def climbrl_round(r: int) -> tuple[int, float]:
        t = time.perf_counter()
        ids = set()
        for i in range(a.tasks):
            o = WorkOrder(order_id=f"b{r}-{i}", policy_version=0, env=a.env,
                          task_index=i, group_size=a.group,
                          sampling=SamplingSpec(temperature=1.0, max_tokens=a.max_tokens,
                                                seed=r))
            ids.add(o.order_id)
            server.hub.send("r0", o)
        n = 0
        while ids:
            _, tr, _, _ = server.wait_for(Trajectory)
            ids.discard(tr.order_id)
            n += tr.num_generated_tokens
        return n, time.perf_counter() - t

    raw, ours = [], []
    try:
        loop.run_until_complete(raw_round(engine, prompts, a.group, a.max_tokens, -1))  # warm-up both
        climbrl_round(-1)

        def run_raw(r: int) -> None:
            settle()
            raw.append(loop.run_until_complete(raw_round(engine, prompts, a.group, a.max_tokens, r)))

        def run_ours(r: int) -> None:
            settle()
            ours.append(climbrl_round(r))

        for r in range(a.rounds):
            for run in ((run_raw, run_ours) if r % 2 == 0 else (run_ours, run_raw)):
                run(r)
    finally:
        engine.shutdown()
        server.close()
    raw_tps = max(n / s for n, s in raw)
    our_tps = max(n / s for n, s in ours)
    paired = [(m / u) / (n / s) for (n, s), (m, u) in zip(raw, ours)]
    lens = [len(p) for p in prompts]
    result = {
        "benchmark": "rollout_overhead", "env": a.env, "prompt_tokens": [min(lens), max(lens)],
        "raw_tokens_per_s": round(raw_tps, 1),
        "climbrl_tokens_per_s": round(our_tps, 1), "ratio": round(statistics.median(paired), 3),
        "ratio_best": round(our_tps / raw_tps, 3),
        "per_round_ratios": [round(x, 3) for x in paired],
        "tasks": a.tasks, "group": a.group, "max_tokens": a.max_tokens,
        "rounds": [{"raw": [n, round(s, 3)], "climbrl": [m, round(u, 3)]}
                   for (n, s), (m, u) in zip(raw, ours)],
    }
    print(json.dumps(result))
    if not a.no_results_file:
        write_result("rollout_overhead", result)


if __name__ == "__main__":
    main()

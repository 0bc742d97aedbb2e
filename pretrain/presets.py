"""Model presets (dense and MoE) and run presets (the demo base).

A model preset is a dict of `ModelConfig` fields; a TOML config names one with
``model.preset = "dense-small"`` and may override any field. A run preset is a whole
`PretrainConfig` as a dict, such as ``demo``: the ~5-minute CPU run that makes the base
model `climbrl demo` starts from.

Plain data, importing nothing of the package: ``config`` expands a preset and ``model``
counts its parameters, and both import this module, never the reverse.

    python -m climbrl.pretrain.model            # list presets with parameter counts
"""

from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # 0.85M parameters: ~12k training tokens/s on 2 idle CPU cores (fp32).
    "demo": dict(
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        max_position_embeddings=512,
    ),
    "dense-small": dict(
        hidden_size=256,
        num_layers=6,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=768,
        max_position_embeddings=2048,
    ),
    "dense-base": dict(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        max_position_embeddings=4096,
    ),
    # Fine-grained experts: many narrow experts, several active per token.
    "moe-small": dict(
        hidden_size=256,
        num_layers=6,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=768,
        moe=True,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        max_position_embeddings=2048,
    ),
    "moe-small-shared": dict(
        hidden_size=256,
        num_layers=6,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=768,
        moe=True,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=256,
        max_position_embeddings=2048,
    ),
}


def demo_run_config(out_dir: str, *, seed: int = 0) -> dict[str, Any]:
    """The demo base run: 1-3 digit addition from scratch on 2 CPU cores.

    The recipe is fixed (steps, seed, data), with no time budget: a machine's speed or load
    never changes the base, only how long it takes. 700 steps of 32 x 64-token rows leave the
    model part-way up its learning curve; the held-out accuracy of each build is in the base's
    ``summary.json``.

    The corpus carries the most common addition mistake: half of the sums with a carry are
    written with every carry dropped (``mistake_rate = 0.5``; ``48+88=26``). The base learns
    both answers, and on many carry sums its greedy answer is the mistake while sampling also
    finds the true sum: room that RL with a verifier turns into held-out accuracy, as RL on
    pretrained language models selects among the behaviours their corpus taught them. On a
    clean corpus the base's errors are missing skill (3-digit carries it cannot do), which
    110 RL steps barely teach (benchmarks/results/demo_runs-*.json).

    One thread (~10k tokens/s, against ~15k for two on idle cores): on 2 cores shared with
    anything else (the rollout engine, a test run), two OpenMP threads spin against each other,
    and a step took 5.7 s instead of 0.65 s with one thread (measured side by side).
    """
    return {
        "run_dir": out_dir,
        "model": {"preset": "demo"},
        "data": {
            "source": "synthetic",
            "task": "add",
            "num_docs": 100_000,
            "mistake_rate": 0.5,
            "vocab_size": 320,
            "split_digits": True,
            "tokenizer_train_docs": 5_000,
            "seq_len": 64,
            "eval_fraction": 0.01,
        },
        "train": {
            "steps": 700,
            "batch_size": 32,
            "lr": 3e-3,
            "min_lr_ratio": 0.05,
            "warmup_steps": 30,
            "schedule": "cosine",
            "z_loss": 1e-4,
            "seed": seed,
            "threads": 1,
            "log_every": 50,
            "eval_every": 250,
            "eval_batches": 4,
            "ckpt_every": 250,
            "keep_checkpoints": 1,
        },
        "eval_task_examples": 500,
    }

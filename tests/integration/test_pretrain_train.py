"""The training loop end to end on tiny settings: dense/MoE, AdamW/Muon, cosine/WSD, the file
pipeline source, and continued pretraining with replay from the first run's data.

    pytest tests/integration/test_pretrain_train.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from climbrl.pretrain.config import load_config
from climbrl.pretrain.train import train

pytestmark = pytest.mark.integration

TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=64",
    "model.max_position_embeddings=128",
    "data.num_docs=3000",
    "data.vocab_size=300",
    "data.tokenizer_train_docs=500",
    "data.seq_len=64",
    "train.batch_size=8",
    "train.warmup_steps=3",
    "train.eval_every=10",
    "train.ckpt_every=10",
    "train.log_every=1",
    "train.threads=1",
    "eval_task_examples=20",
]


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.parametrize(
    "extra",
    [
        ["train.optimizer=adamw", "train.schedule=cosine"],
        [
            "train.optimizer=muon",
            "train.schedule=wsd",
            "model.moe=true",
            "model.num_experts=4",
            "model.moe_intermediate_size=16",
        ],
        [
            "model.moe=true",
            "model.num_experts=4",
            "model.moe_intermediate_size=16",
            "model.balance=aux_free",
        ],
    ],
    ids=["dense-adamw-cosine", "moe-muon-wsd-auxloss", "moe-auxfree"],
)
def test_train_variants(tmp_path: Path, extra: list[str]) -> None:
    cfg = load_config(None, [*TINY, f"run_dir={tmp_path}", "train.steps=30", *extra])
    s = train(cfg, quiet=True)
    losses = _losses(tmp_path)
    assert len(losses) == 30 and all(x == x for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns
    assert s["eval_nll"] is not None and 0 < s["eval_nll"] < losses[0]
    assert 0.0 <= s["heldout_accuracy"] <= 1.0
    assert s["tokens_per_s"] > 0 and s["flops_per_s"] > 0
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 30
    if "model.moe=true" in extra:
        recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert all("moe_max_over_mean_load" in r for r in recs if "loss" in r)


def test_files_source_and_continued_pretraining_with_replay(tmp_path: Path) -> None:
    rng = random.Random(0)
    words = [f"tok{i}" for i in range(200)]
    docs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)]
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:20])
    )
    first = tmp_path / "first"
    cfg = load_config(
        None,
        [
            *TINY,
            f"run_dir={first}",
            "train.steps=12",
            "data.source=files",
            "data.eval_fraction=0.05",
            f'data.files=[{{paths=["{tmp_path / "a.jsonl"}"], domain="web"}}]',
        ],
    )
    s1 = train(cfg, quiet=True)
    funnel = json.loads((first / "data" / "funnel.json").read_text())
    assert funnel[0]["docs_out"] == 420 and funnel[1]["docs_out"] == 400  # exact dups removed
    assert "heldout_accuracy" not in s1

    second = tmp_path / "second"
    cfg2 = load_config(
        None,
        [
            *TINY[6:],
            f"run_dir={second}",
            "train.steps=12",
            "data.task=reverse",
            f"init.from_dir={s1['model_dir']}",
            f"init.replay_dir={first / 'data'}",
            "init.replay_ratio=0.25",
        ],
    )
    s2 = train(cfg2, quiet=True)
    assert s2["steps"] == 12 and s2["heldout_accuracy"] >= 0.0
    # The tokenizer is the base's, so the export stays loadable with the base's vocab.
    assert (
        json.loads((second / "model" / "config.json").read_text())["vocab_size"]
        == json.loads((Path(s1["model_dir"]) / "config.json").read_text())["vocab_size"]
    )

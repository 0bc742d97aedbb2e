"""Exact resume: a run killed with SIGKILL after a checkpoint and resumed retraces the loss curve
of an uninterrupted run (same data order, same optimizer state, same RNG).

    pytest tests/integration/test_pretrain_resume.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CONFIG = """
eval_task_examples = 0
[model]
hidden_size = 32
num_layers = 2
num_heads = 4
num_kv_heads = 2
intermediate_size = 64
max_position_embeddings = 128
[data]
source = "synthetic"
task = "add"
num_docs = 3000
vocab_size = 300
tokenizer_train_docs = 500
seq_len = 64
[train]
steps = 150
batch_size = 8
warmup_steps = 5
optimizer = "{optimizer}"
threads = 1
log_every = 1
eval_every = 1000
ckpt_every = 10
keep_checkpoints = 2
"""


def _cmd(cfg: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "climbrl.pretrain.cli",
        str(cfg),
        "--quiet",
        "--set",
        f"run_dir={run_dir}",
        *extra,
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=pytest.mark.slow)])
def test_kill9_and_resume_matches_uninterrupted(tmp_path: Path, optimizer: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(optimizer=optimizer))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(cfg, ref), check=True, env=env, timeout=300, capture_output=True)

    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(cfg, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        latest = run / "checkpoints" / "latest"
        deadline = time.monotonic() + 240
        while not (latest.exists() and latest.read_text().strip() >= "step_00000020"):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = max(_losses(run))
    assert killed_at < 150, "the kill came too late to test anything"

    subprocess.run(
        _cmd(cfg, run, "--resume"), check=True, env=env, timeout=300, capture_output=True
    )
    a, b = _losses(ref), _losses(run)
    assert sorted(b) == list(range(1, 151))
    for step in range(1, 151):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), f"step {step}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 150

"""examples/custom_env.py + examples/custom_env.toml: a one-file env trained by `climbrl run`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import kill_tree

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_custom_env_example_trains(tmp_path):
    spec = importlib.util.spec_from_file_location("custom_env_example", ROOT / "examples/custom_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.make_model(str(tmp_path / "model"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "climbrl.cli", "run", "examples/custom_env.toml", "--no-live",
           "--set", f'model.path="{tmp_path / "model"}"', "--set", f'run.output_dir="{out}"',
           "--set", "learner.total_steps=3", "--set", "learner.batch_groups=4",
           "--set", "learner.group_size=4", "--set", "learner.eval_size=8"]
    log = tmp_path / "launcher.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "CLIMBRL_LOG": "INFO"})
    try:
        rc = proc.wait(timeout=600)
    finally:
        kill_tree(proc)
    learner_log = out / "logs" / "learner.log"
    assert rc == 0, log.read_text()[-3000:] + (learner_log.read_text()[-3000:]
                                              if learner_log.exists() else "")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert 0.0 <= r["reward"] <= 1.0 and r["correct"] is not None
    assert any("eval/test_accuracy" in r for r in recs)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3

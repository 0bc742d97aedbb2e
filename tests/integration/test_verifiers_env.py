"""A prime-intellect `verifiers` environment trained by `climbrl run`: verifiers' own episodes
(its interception server, its agent, its `@vf.reward` scoring) against the rollout server's
OpenAI endpoint on a real vLLM engine; the learner trains on the recorded tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, kill_tree, write_config

pytest.importorskip("verifiers.v1")
pytestmark = pytest.mark.integration


def test_verifiers_taskset_is_trained(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model,
        out,
        learner={"total_steps": 2, "batch_groups": 2, "group_size": 2, "eval_size": 4},
        rollout={"max_model_len": 128, "max_tokens": 4, "kv_cache_gb": 0.5},
    )
    args = (
        '{taskset = "climbrl.envs.adapters.verifiers:AdditionTaskset", '
        "taskset_args = { num_tasks = 40, max_operand = 9 }, sampling = { max_tokens = 4 }}"
    )
    text = cfg.read_text().replace('name = "copy_first"', 'name = "verifiers"')
    cfg.write_text(text.replace("args = {}", f"args = {args}"))
    log = tmp_path / "launcher.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "climbrl.cli", "run", str(cfg), "--no-live"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "CLIMBRL_LOG": "INFO"},
        cwd=ROOT,
    )
    try:
        rc = proc.wait(timeout=600)
    finally:
        kill_tree(proc)
    logs = log.read_text()[-4000:] + "".join(
        p.read_text()[-3000:] for p in sorted((out / "logs").glob("*.log"))
    )
    assert rc == 0, logs
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2], logs
    # verifiers' reward (0/1 from the taskset's `correct`), no failed episode, and the learner
    # saw exactly the tokens the sampler produced through verifiers' client.
    assert all(0.0 <= r["reward"] <= 1.0 for r in steps)
    assert all(r.get("env_errors", 0) == 0 for r in steps), steps
    assert all(r["mismatch_mean"] < 1e-3 for r in steps)
    assert any("eval/test_accuracy" in r for r in recs)

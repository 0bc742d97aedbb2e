"""`climbrl run` end to end: real learner and rollout processes, real vLLM, real ZeroMQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import kill_tree, pid_alive, write_config

pytestmark = pytest.mark.integration


def _launch(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "climbrl.cli", "run", str(cfg), "--no-live"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "CLIMBRL_LOG": "INFO"},
    )


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _trains_config(sync: str, model: Path, tmp: Path) -> Path:
    learner = {
        "total_steps": 3,
        "batch_groups": 4,
        "group_size": 4,
        "max_staleness": 0,
        "eval_size": 8,
        "checkpoint_every": 2,
    }
    rollout = {"max_model_len": 64, "max_tokens": 4, "kv_cache_gb": 0.5}
    wire = {}
    if sync == "lora":
        learner.update(
            {"weights.mode": "lora", "optim.lr": 5e-3, "weights.lora.r": 4},
            batch_groups=2,
            eval_size=4,
        )
        rollout["kv_cache_gb"] = 0.25
        wire["curve"] = "on"  # CURVE with the run's keys, as across machines
    return write_config(
        tmp / "c.toml", model, tmp / "run", learner=learner, rollout=rollout, wire=wire
    )


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The LoRA run of test_run_trains_checkpoints_and_bounds_staleness, started when first
    asked for: the killed-server test (first in this file) asks for it too, so the two runs'
    start-ups (imports, engine start: about one core each) overlap."""
    tmp = tmp_path_factory.mktemp("lora_run")
    proc = _launch(_trains_config("lora", tiny_model, tmp), tmp / "launcher.log")
    yield proc, tmp
    kill_tree(proc)


def test_killed_rollout_server_is_detected_and_everything_stops(tiny_model, tmp_path, lora_run):
    """A rollout server killed with -9 mid-run: the learner finds it dead by heartbeat and the
    run stops, every process with it. (``lora_run`` only starts the next test's run now.)"""
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model,
        out,
        run={"on_child_death": "continue"},  # let the learner's heartbeat check find it
        learner={"total_steps": 500, "batch_groups": 2, "group_size": 2, "eval_size": 0},
        rollout={"max_model_len": 64, "max_tokens": 4, "kv_cache_gb": 0.5},
        wire={"heartbeat_s": 0.5, "dead_after_s": 4.0},
    )
    proc = _launch(cfg, tmp_path / "launcher.log")
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 400
        while not (metrics.exists() and '"reward"' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "launcher.log"
            ).read_text()[-3000:]
            time.sleep(1)
        kids = _children(proc.pid)
        assert len(kids) == 2  # learner + rollout-0
        rollout = next(
            k for k in kids if b"\x00rollout\x00" in Path(f"/proc/{k}/cmdline").read_bytes()
        )
        import psutil

        tree = {k: [k] + [c.pid for c in psutil.Process(k).children(recursive=True)] for k in kids}
        assert len(tree[rollout]) >= 2  # the rollout server and its vLLM engine core
        t_kill = time.monotonic()
        os.kill(rollout, signal.SIGKILL)
        rc = proc.wait(timeout=120)
        elapsed = time.monotonic() - t_kill
    finally:
        kill_tree(proc)
    learner_log = (out / "logs" / "learner.log").read_text()
    assert "rollout server r0 is dead" in learner_log
    assert "no rollout server is alive" in learner_log
    assert rc != 0
    assert elapsed < 60
    time.sleep(1)
    leftovers = [p for pids in tree.values() for p in pids if pid_alive(p)]
    assert leftovers == [], f"orphaned processes: {leftovers}"


# The default suite runs the LoRA variant (CURVE on, one full sync then adapter deltas): the
# full-sync path runs to completion in the default suite too, in test_crash's resumed run and
# in test_objectives_e2e's runs.
@pytest.mark.parametrize("sync", [pytest.param("full", marks=pytest.mark.slow), "lora"])
def test_run_trains_checkpoints_and_bounds_staleness(sync, tiny_model, tmp_path, request):
    if sync == "lora":
        proc, tmp_path = request.getfixturevalue("lora_run")
    else:
        proc = _launch(_trains_config(sync, tiny_model, tmp_path), tmp_path / "launcher.log")
    out = tmp_path / "run"
    try:
        rc = proc.wait(timeout=600)
    finally:
        kill_tree(proc)
    log = (tmp_path / "launcher.log").read_text()
    assert rc == 0, log[-3000:] + (out / "logs" / "learner.log").read_text()[-3000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        for k in ("reward", "entropy", "staleness_max", "mismatch_mean", "tokens_per_s"):
            assert r[k] is not None, k
        assert r["staleness_max"] <= 0  # max_staleness = 0: on-policy
        assert r["mismatch_mean"] < 1e-4  # the engine samples the learner's weights
        assert r["rollout_loop_lag_max_s"] >= 0.0  # the server's heartbeats carry it
    assert any(r.get("weight_sync_s") for r in steps[1:])
    assert any("eval/test_accuracy" in r for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["weight_syncs_failed"] == 0, summary
    if sync == "lora":  # the base once, then only adapter deltas
        assert summary["weight_syncs_full"] == 1 and summary["weight_syncs_delta"] == 2, summary
        assert ((out / "wire_keys.json").stat().st_mode & 0o777) == 0o600
    assert list((out / "tensorboard").iterdir())
    # the checkpoint is a plain HF folder that transformers loads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step_3" and (out / "checkpoints" / "step_2").is_dir()
    AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert AutoTokenizer.from_pretrained(str(ckpt)).chat_template
    assert json.loads((ckpt / "learner_state.json").read_text())["step"] == 3
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() == (sync == "lora")

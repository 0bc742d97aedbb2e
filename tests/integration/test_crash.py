"""Crash consistency of `climbrl run`: real learner and rollout processes, real vLLM, kill -9.

- The learner killed with -9 after a checkpoint, then `climbrl run --resume`: every
  prompt (cursor sequence) is trained exactly once in the final lineage, and with a fixed seed
  and max_staleness 0 the resumed steps repeat the killed run's steps (same samples, so the
  same rewards, and the same loss within floating-point tolerance).
- A rollout server killed with -9: the learner notices it by heartbeat and reassigns its orders;
  with run.on_child_death = "restart" the launcher starts it again and it rejoins at the current
  weights; with "continue" the run finishes on the remaining server (slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import kill_tree, pid_alive, write_config

pytestmark = pytest.mark.integration

BATCH = 2  # groups per step
# Tolerances for resumed vs uninterrupted steps (CPU, float32 tiny model). Measured: with one
# rollout server the resumed steps are bit-identical (gap 0); vLLM batch composition may move
# the sampler's log-probs (which enter the loss) in the last bits.
LOSS_ATOL = 1e-6  # absolute: the GRPO loss is ~0 on-policy
REL_TOL = 1e-5  # gradient norm and entropy


def _launch(cfg: Path, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "climbrl.cli", "run", str(cfg), "--no-live", *extra],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "CLIMBRL_LOG": "INFO", **(env or {})},
    )


def _wait(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _steps(path: Path) -> list[dict]:
    return [r for r in _records(path) if "reward" in r]


def _logs(tmp: Path, out: Path) -> str:
    parts = [(tmp / "launcher.log")] + sorted((out / "logs").glob("*.log"))
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in parts if p.exists()
    )


def _config(tmp: Path, model: Path, out: Path, steps: int, **sections: dict) -> Path:
    base = dict(
        run={"seed": 7},
        learner={
            "total_steps": steps,
            "batch_groups": BATCH,
            "group_size": 2,
            "max_staleness": 0,
            "eval_size": 0,
            "checkpoint_every": 3,
            "threads": 1,
        },
        rollout={"max_model_len": 64, "max_tokens": 4, "kv_cache_gb": 0.5},
        wire={"heartbeat_s": 0.5, "dead_after_s": 4.0},
    )
    for sec, vals in sections.items():
        base[sec] = {**base.get(sec, {}), **vals}
    return write_config(tmp / "c.toml", model, out, **base)


def _assert_each_sequence_once(steps: list[dict], n_steps: int) -> None:
    assert [r["step"] for r in steps] == list(range(1, n_steps + 1))
    seqs = [s for r in steps for s in r["trained_seqs"]]
    # sequences handed out are 0, 1, 2, ...: trained exactly once, none lost, none repeated
    assert sorted(seqs) == list(range(n_steps * BATCH)), seqs
    for r in steps:
        assert r["trained_seqs"] == sorted(r["trained_seqs"])


def _rollout_pids(launcher_pid: int) -> dict[str, int]:
    """server id -> pid of the `climbrl rollout` children of the launcher."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            argv = (p / "cmdline").read_bytes().split(b"\x00")
        except (OSError, IndexError, ValueError):
            continue
        if b"rollout" in argv:
            out[argv[argv.index(b"--server-id") + 1].decode()] = int(p.name)
    return out


def _wait_for_step(
    proc: subprocess.Popen, metrics: Path, step: int, tmp: Path, out: Path, timeout: float = 400
) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and any(r["step"] >= step for r in _steps(metrics))):
        assert proc.poll() is None and time.monotonic() < deadline, _logs(tmp, out)
        time.sleep(0.1)


def _compare(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Same sequences and samples (rewards, lengths) step by step, and the same loss, gradient
    norm and entropy within tolerance; returns the largest gap of each."""
    gaps = dict(loss=0.0, grad_norm=0.0, entropy=0.0)
    for x, y in zip(a, b, strict=True):
        assert x["step"] == y["step"] and x["trained_seqs"] == y["trained_seqs"], (x, y)
        for k in ("reward", "completion_len"):
            assert x[k] == pytest.approx(y[k], abs=1e-9), (k, x, y)
        assert x["loss"] == pytest.approx(y["loss"], abs=LOSS_ATOL), (x, y)
        for k in ("grad_norm", "entropy"):
            assert x[k] == pytest.approx(y[k], rel=REL_TOL), (k, x, y)
        for k in gaps:
            gaps[k] = max(gaps[k], abs(x[k] - y[k]) / (1.0 if k == "loss" else abs(y[k])))
    assert all(x["mismatch_mean"] < 1e-4 for x in a + b)  # engines sampled the learner's weights
    return gaps


# --------------------------------------------------------------------------- the learner


def test_learner_kill9_then_resume_trains_each_prompt_once_on_the_same_curve(tiny_model, tmp_path):
    """Killed (SIGKILL, by itself at a fixed point) after step 3 with step 4's orders in
    flight; the last checkpoint is step 2. The resumed run retrains step 3 and must repeat
    it: the killed run up to step 3 *is* an uninterrupted run up to step 3."""
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_model, out, steps=4, learner={"checkpoint_every": 2})
    rc = _wait(_launch(cfg, tmp_path / "launcher.log", env={"CLIMBRL_FAULT_KILL_AT_STEP": "3"}))
    assert rc != 0, _logs(tmp_path, out)
    learner_log = (out / "logs" / "learner.log").read_text()
    assert "CLIMBRL_FAULT_KILL_AT_STEP=3: SIGKILL" in learner_log, _logs(tmp_path, out)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    killed = _steps(out / "metrics.jsonl")
    assert [r["step"] for r in killed] == [1, 2, 3]
    state = json.loads((out / "checkpoints" / "step_2" / "learner_state.json").read_text())
    assert state["cursor"]["next_seq"] == 2 * BATCH and state["cursor"]["pending"] == []

    rc = _wait(_launch(cfg, tmp_path / "launcher.log", "--resume"))
    assert rc == 0, _logs(tmp_path, out)
    steps = _steps(out / "metrics.jsonl")
    _assert_each_sequence_once(steps, 4)
    resumed = [r for r in _records(out / "metrics.jsonl") if "resumed_from" in r]
    assert resumed == [{"step": 2, "resumed_from": "step_2", "discarded_steps": [3]}]
    discarded = _steps(out / "metrics.discarded.jsonl")
    assert discarded == killed[2:]
    assert steps[:2] == killed[:2]  # kept as they were
    gaps = _compare(killed[2:], steps[2:3])  # step 3, before the kill and after resume
    print(f"resumed vs uninterrupted, largest gaps (loss abs, others rel): {gaps}")
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_learner_kill9_anywhere_then_resume_matches_an_uninterrupted_run(tiny_model, tmp_path):
    """An outside SIGKILL at whatever point the learner is at after its step-3 checkpoint,
    two rollout servers (so vLLM batches differ between runs), against a whole clean run."""
    steps_n = 8
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_out = ref_dir / "run"
    rc = _wait(
        _launch(
            _config(ref_dir, tiny_model, ref_out, steps=steps_n, rollout={"num_servers": 2}),
            ref_dir / "launcher.log",
        )
    )
    assert rc == 0, _logs(ref_dir, ref_out)
    reference = _steps(ref_out / "metrics.jsonl")
    _assert_each_sequence_once(reference, steps_n)

    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_model, out, steps=steps_n, rollout={"num_servers": 2})
    proc = _launch(cfg, tmp_path / "launcher.log")
    try:
        _wait_for_step(proc, out / "metrics.jsonl", 4, tmp_path, out)  # past the step-3 save
        learner = next(
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _is_learner_child(int(p.name), proc.pid)
        )
        os.kill(learner, signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        kill_tree(proc)
    assert rc != 0
    logged = [r["step"] for r in _steps(out / "metrics.jsonl")]
    assert logged[-1] < steps_n, "the run ended before the kill; nothing was tested"
    ckpt = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    last = logged[-1]  # a step is logged, then saved (every 3 steps): a kill may fall between
    assert ckpt == 3 * (last // 3) or (last % 3 == 0 and ckpt == last - 3), (ckpt, last)
    rc = _wait(_launch(cfg, tmp_path / "launcher.log", "--resume"))
    assert rc == 0, _logs(tmp_path, out)
    steps = _steps(out / "metrics.jsonl")
    _assert_each_sequence_once(steps, steps_n)
    resumed = [r for r in _records(out / "metrics.jsonl") if "resumed_from" in r]
    assert resumed == [
        {
            "step": ckpt,
            "resumed_from": f"step_{ckpt}",
            "discarded_steps": list(range(ckpt + 1, logged[-1] + 1)),
        }
    ]
    gaps = _compare(reference, steps)
    print(f"resumed vs uninterrupted over {steps_n} steps, largest gaps: {gaps}")
    import torch
    from safetensors.torch import load_file

    final = [
        load_file(str(o / "checkpoints" / f"step_{steps_n}" / "model.safetensors"))
        for o in (ref_out, out)
    ]
    wgap = max(float((final[0][k] - final[1][k]).abs().max()) for k in final[0])
    print(f"final weights, largest element gap: {wgap:.3g}")
    assert wgap < 1e-4 and all(torch.isfinite(t).all() for t in final[1].values())


def _is_learner_child(pid: int, parent: int) -> bool:
    try:
        if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
            return False
        return b"\x00learn\x00" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return False


# --------------------------------------------------------------------------- rollout servers


def _kill_during_run(cfg: Path, tmp: Path, out: Path, pick: Any) -> tuple[int, int, int]:
    """Launch ``cfg``, and once step 2 is logged SIGKILL the pid that ``pick(launcher pid ->
    rollout pids by server id)`` returns; wait for the run to end. Returns (exit code, the
    last step logged at the kill, the killed pid)."""
    proc = _launch(cfg, tmp / "launcher.log")
    try:
        _wait_for_step(proc, out / "metrics.jsonl", 2, tmp, out)
        victim = pick(_rollout_pids(proc.pid))
        os.kill(victim, signal.SIGKILL)
        step_at_kill = max(r["step"] for r in _steps(out / "metrics.jsonl"))
        rc = proc.wait(timeout=400)
    finally:
        kill_tree(proc)
    return rc, step_at_kill, victim


# slow to keep the default suite near its budget (most of its 72 s is the engine restart);
# test_run_e2e's killed-server test stays in the default suite.
@pytest.mark.slow
def test_rollout_server_kill9_is_restarted_and_rejoins_at_the_current_weights(tiny_model, tmp_path):
    """The only rollout server is killed: its orders wait, the launcher restarts it, the
    learner sends it the current weights at Hello, and the run finishes with every prompt
    trained once and on-policy."""
    out = tmp_path / "run"
    cfg = _config(
        tmp_path,
        tiny_model,
        out,
        steps=5,
        run={"on_child_death": "restart"},
        learner={"checkpoint_every": 0},
    )
    servers: dict[str, int] = {}
    rc, step_at_kill, killed = _kill_during_run(
        cfg, tmp_path, out, lambda pids: servers.update(pids) or pids["r0"]
    )
    assert list(servers) == ["r0"]
    logs = _logs(tmp_path, out)
    assert rc == 0, logs
    learner_log = (out / "logs" / "learner.log").read_text()
    assert "rollout server r0 is dead" in learner_log, logs
    assert "restarted rollout-0" in (tmp_path / "launcher.log").read_text(), logs
    assert step_at_kill < 5, "the run ended before the kill; nothing was tested"
    # the new process said Hello at version 0 and was sent the learner's current weights
    rejoin = [ln for ln in learner_log.splitlines() if "sending r0 the weights of version" in ln]
    assert rejoin and int(rejoin[-1].rsplit(" ", 1)[1]) >= step_at_kill, logs
    steps = _steps(out / "metrics.jsonl")
    _assert_each_sequence_once(steps, 5)
    assert steps[-1]["servers_dead"] == 1
    for r in steps:
        assert r["staleness_max"] <= 0
        assert r["mismatch_mean"] < 1e-4  # the restarted engine samples with the learner's weights
    time.sleep(1)
    assert not pid_alive(killed)


@pytest.mark.slow
def test_rollout_server_kill9_run_finishes_on_the_other_server(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = _config(
        tmp_path,
        tiny_model,
        out,
        steps=8,
        run={"on_child_death": "continue"},
        rollout={"num_servers": 2},
        learner={"checkpoint_every": 0},
    )
    servers: dict[str, int] = {}
    rc, step_at_kill, _ = _kill_during_run(
        cfg, tmp_path, out, lambda pids: servers.update(pids) or pids["r1"]
    )
    assert sorted(servers) == ["r0", "r1"]
    logs = _logs(tmp_path, out)
    assert rc == 0, logs
    assert step_at_kill < 8, "the run ended before the kill; nothing was tested"
    assert "rollout server r1 is dead" in (out / "logs" / "learner.log").read_text(), logs
    steps = _steps(out / "metrics.jsonl")
    _assert_each_sequence_once(steps, 8)
    assert steps[-1]["servers_dead"] == 1
    assert all(r["staleness_max"] <= 0 for r in steps)


def _engine_core_pid(rollout_pid: int) -> int:
    """The pid of vLLM's engine-core process under a rollout server (its title names it)."""
    import psutil

    for p in psutil.Process(rollout_pid).children(recursive=True):
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                return p.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no EngineCore process under {rollout_pid}")


@pytest.mark.slow
def test_engine_core_kill9_is_reported_and_the_server_restarted(tiny_model, tmp_path):
    """vLLM's engine-core process of the only server is killed: the server sees its engine
    dead, tells the learner (which holds the server's orders for the restart) and exits with
    ENGINE_DEAD_EXIT, naming the death in its last log line; the launcher restarts it and the
    run finishes with every prompt trained once, on-policy."""
    from climbrl.rollout.server import ENGINE_DEAD_EXIT

    out = tmp_path / "run"
    cfg = _config(
        tmp_path,
        tiny_model,
        out,
        steps=5,
        run={"on_child_death": "restart"},
        learner={"checkpoint_every": 0},
    )
    servers: dict[str, int] = {}
    rc, step_at_kill, _ = _kill_during_run(
        cfg, tmp_path, out, lambda pids: servers.update(pids) or _engine_core_pid(pids["r0"])
    )
    server = servers["r0"]
    logs = _logs(tmp_path, out)
    assert rc == 0, logs
    assert step_at_kill < 5, "the run ended before the kill; nothing was tested"
    launcher = (tmp_path / "launcher.log").read_text()
    assert f"rollout-0 (pid {server}) died with {ENGINE_DEAD_EXIT}" in launcher, logs
    assert "restarted rollout-0" in launcher, logs
    ours = [
        ln
        for ln in (out / "logs" / "rollout-0.log").read_text().splitlines()
        if " climbrl.rollout[" in ln
    ]
    first_life = ours[: [i for i, ln in enumerate(ours) if " up, connected to " in ln][1]]
    assert "vLLM engine died: MPClient: engine core exited unexpectedly" in first_life[-1], logs
    assert "vLLM engine died" in (out / "logs" / "learner.log").read_text(), logs
    steps = _steps(out / "metrics.jsonl")
    _assert_each_sequence_once(steps, 5)
    assert all(r["staleness_max"] <= 0 and r["mismatch_mean"] < 1e-4 for r in steps)

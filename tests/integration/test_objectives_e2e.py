"""`climbrl run` with the GSPO and PPO example configs: real learner, real vLLM rollout server.

Both runs start at once (module fixture ``example_runs``): a run's start-up (imports, engine
start) keeps about one core busy, so the two start-ups overlap on a 2-core machine.

    flock /tmp/climbrl-engine.lock .venv/bin/pytest tests/integration/test_objectives_e2e.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import start_cli, wait_cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXTRA = {
    "gspo": ["learner.batch_groups=4", "learner.group_size=4"],
    "ppo": ["learner.batch_groups=12"],
}


@pytest.fixture(scope="module")
def example_runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each example run for 3 steps, both at once: example -> exit code, output folder, log."""
    tmp = tmp_path_factory.mktemp("objectives")
    procs = {}
    for example, extra in EXTRA.items():
        out = tmp / example
        sets = [
            f"model.path={tiny_model}",
            f"run.output_dir={out}",
            "learner.total_steps=3",
            "learner.eval_size=4",
            "learner.max_staleness=0",
            "learner.checkpoint_every=2",
            "rollout.kv_cache_gb=0.5",
            *extra,
        ]
        args = ["run", str(ROOT / "examples" / f"{example}.toml"), "--no-live"]
        for s in sets:
            args += ["--set", s]
        log = tmp / f"{example}.log"
        procs[example] = (start_cli(args, log), out, log)
    runs = {}
    try:
        for example, (proc, out, log) in procs.items():
            runs[example] = {"rc": wait_cli(proc, timeout=600), "out": out, "log": log}
    finally:
        for proc, _, _ in procs.values():
            wait_cli(proc, timeout=60)  # stops a run left behind by a failure above
    return runs


def _steps(run: dict) -> list[dict]:
    out, log = run["out"], run["log"]
    learner_log = out / "logs" / "learner.log"
    assert run["rc"] == 0, log.read_text()[-3000:] + (
        learner_log.read_text()[-3000:] if learner_log.exists() else ""
    )
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


def test_gspo_trains_end_to_end(example_runs):
    steps = _steps(example_runs["gspo"])
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["clip_high"] == pytest.approx(4e-4)  # the example's GSPO bounds are in force
        assert r["grad_norm"] > 0 and r["staleness_max"] == 0
        assert r["mismatch_tokens"] > 0 and r["mismatch_mean"] < 1e-3  # fp32 engine vs learner
        assert r["mismatch_kl"] >= 0 and r["offpolicy_masked_frac"] == 0


def test_ppo_with_critic_trains_end_to_end_and_checkpoints_the_critic(example_runs):
    out = example_runs["ppo"]["out"]
    steps = _steps(example_runs["ppo"])
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["value_loss"] > 0 and r["critic_grad_norm"] > 0 and r["grad_norm"] > 0
        assert r["mismatch_mean"] < 1e-3
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step_3" and (ckpt / "critic.safetensors").is_file()
    assert (out / "checkpoints" / "step_2" / "critic_optimizer.pt").is_file()
    assert json.loads((ckpt / "learner_state.json").read_text())["objective"]["clip_high"] == 0.2

"""`climbrl run` with the GSPO and PPO example configs: real learner, real vLLM rollout server.

    flock /tmp/climbrl-engine.lock .venv/bin/pytest tests/integration/test_objectives_e2e.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _run(example: str, tiny_model: Path, tmp_path: Path, extra: list[str]) -> tuple[Path, list[dict]]:
    out = tmp_path / example
    sets = [f"model.path={tiny_model}", f"run.output_dir={out}", "learner.total_steps=3",
            "learner.eval_size=4", "learner.max_staleness=0", "learner.checkpoint_every=2",
            "rollout.kv_cache_gb=0.5", *extra]
    args = ["run", str(ROOT / "examples" / f"{example}.toml"), "--no-live"]
    for s in sets:
        args += ["--set", s]
    log = tmp_path / f"{example}.log"
    rc = run_cli(args, log, timeout=600)
    learner_log = out / "logs" / "learner.log"
    assert rc == 0, log.read_text()[-3000:] + (
        learner_log.read_text()[-3000:] if learner_log.exists() else "")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in recs if "loss" in r]


def test_gspo_trains_end_to_end(tiny_model, tmp_path):
    out, steps = _run("gspo", tiny_model, tmp_path,
                      ["learner.batch_groups=4", "learner.group_size=4"])
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["clip_high"] == pytest.approx(4e-4)  # the example's GSPO bounds are in force
        assert r["grad_norm"] > 0 and r["staleness_max"] == 0
        assert r["mismatch_tokens"] > 0 and r["mismatch_mean"] < 1e-3  # fp32 engine vs learner
        assert r["mismatch_kl"] >= 0 and r["offpolicy_masked_frac"] == 0


def test_ppo_with_critic_trains_end_to_end_and_checkpoints_the_critic(tiny_model, tmp_path):
    out, steps = _run("ppo", tiny_model, tmp_path, ["learner.batch_groups=12"])
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["value_loss"] > 0 and r["critic_grad_norm"] > 0 and r["grad_norm"] > 0
        assert r["mismatch_mean"] < 1e-3
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step_3" and (ckpt / "critic.safetensors").is_file()
    assert (out / "checkpoints" / "step_2" / "critic_optimizer.pt").is_file()
    assert json.loads((ckpt / "learner_state.json").read_text())["objective"]["clip_high"] == 0.2

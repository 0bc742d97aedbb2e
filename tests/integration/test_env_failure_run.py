"""`climbrl run` with an environment whose reset always raises: the run ends by itself, soon,
with a message that quotes the env's error, whether the held-out evaluation is on (a failed
eval episode scores 0 and the evaluation ends) or off."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CAUSE = "reset is broken: table 'tasks' is missing"
BROKEN_ENV = f"""
from climbrl.envs.base import Env, StepResult, Task


class ResetRaises(Env):
    def num_tasks(self, split):
        return 16

    def get_task(self, split, index):
        return Task(task_id=f"{{split}}/{{index}}", split=split, prompt="abc")

    async def reset(self, task):
        raise RuntimeError({CAUSE!r})

    async def step(self, completion):
        return StepResult(reward=0.0, done=True)
"""


@pytest.mark.parametrize(
    "eval_size", [4, pytest.param(0, marks=pytest.mark.slow)], ids=["eval_on", "eval_off"]
)  # eval_on walks both paths: eval, then training
def test_an_env_that_always_raises_ends_the_run_with_its_error(tiny_model, tmp_path, eval_size):
    (tmp_path / "broken_env.py").write_text(BROKEN_ENV)
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model,
        out,
        env={"name": f"{tmp_path / 'broken_env.py'}:ResetRaises"},
        learner={
            "total_steps": 2,
            "batch_groups": 2,
            "group_size": 2,
            "max_staleness": 0,
            "eval_size": eval_size,
        },
        rollout={"max_model_len": 64, "max_tokens": 4, "kv_cache_gb": 0.5},
        wire={"max_env_failures": 8},
    )
    log = tmp_path / "launcher.log"
    # an engine start and a few orders; past the timeout it hangs, and the test fails
    rc = run_cli(["run", str(cfg), "--no-live"], log, timeout=180, cwd=ROOT)
    text = log.read_text()
    learner_log = (out / "logs" / "learner.log").read_text()
    assert rc == 1, text[-3000:] + learner_log[-3000:]
    # the launcher's last lines: the learner's error, quoting the env's, and where the logs are
    report = text[text.rindex("climbrl: run failed") :]
    assert "the learner stopped: the environment" in report, text[-3000:]
    assert "failed 8 training episodes in a row" in report and CAUSE in report
    assert "climbrl env-check" in report and "logs/" in report
    if eval_size:  # the evaluation before training ended: every episode scored 0
        assert "eval test at step 0: 4 of 4 episodes failed and score 0" in learner_log
        assert CAUSE in learner_log
    assert not (out / "summary.json").exists()

"""What `climbrl run` prints: one line per step (env_errors where not 0) and, at its end, the
held-out accuracy before and after with the McNemar p, the learner's error if it stopped, and
where the outputs are."""

from __future__ import annotations

import json

from climbrl.launcher import LEARNER_ERROR, run_report, step_line


def test_step_line_shows_env_errors_only_where_there_are_some():
    rec = {"step": 3, "reward": 0.5, "env_errors": 0.0}
    assert step_line(rec, 10).startswith("step 3/10 reward=0.5 ")
    assert "env_errors" not in step_line(rec, 10)
    assert step_line({**rec, "env_errors": 2.0}, 10).endswith(" env_errors=2")


def _run_dir(tmp_path, summary):
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "learner.log").write_text("")
    (out / "logs" / "rollout-0.log").write_text("")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "latest").write_text("step_4\n")
    (out / "tensorboard").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary))
    return out


def test_report_of_a_finished_run(tmp_path):
    out = _run_dir(
        tmp_path,
        {
            "steps": 4,
            "accuracy_before": 0.25,
            "accuracy_after": 0.5,
            "elapsed_s": 61.2,
            "eval_env_errors": 1,
            "eval_timeouts": 0,
            "heldout_change": {"tasks": 8, "fixed": 3, "broken": 1, "mcnemar_p": 0.625},
        },
    )
    text = run_report(out, 0)
    assert "run finished: 4 steps in 61s" in text
    assert (
        "held-out accuracy: 25.0% before, 50.0% after on 8 tasks: 3 fixed, 1 broken, "
        "McNemar p = 0.625"
    ) in text
    assert "eval episodes that failed and scored 0: 1 in the env" in text
    for entry in (
        "summary.json",
        "metrics.jsonl",
        "checkpoints/",
        "latest step_4",
        "logs/",
        "learner.log, rollout-0.log",
        "tensorboard/",
        f"--logdir {out}/tensorboard",
    ):
        assert entry in text, entry


def test_report_without_evaluation(tmp_path):
    out = _run_dir(
        tmp_path,
        {
            "steps": 4,
            "accuracy_before": None,
            "accuracy_after": None,
            "elapsed_s": 5.0,
            "eval_env_errors": 0,
            "eval_timeouts": 0,
        },
    )
    text = run_report(out, 0)
    assert "held-out accuracy: not measured (learner.eval_size = 0)" in text
    assert "eval episodes that failed" not in text


def test_report_of_a_failed_run_quotes_the_learner_error(tmp_path):
    out = _run_dir(tmp_path, None)
    (out / "logs" / "learner.log").write_text(
        "12:00:00 INFO climbrl.learner[1]: started\n"
        f"{LEARNER_ERROR}the environment 'x' failed 8 training episodes in a row: boom\n"
    )
    text = run_report(out, 1)
    assert "run failed (exit code 1)" in text
    assert "the learner stopped: the environment 'x' failed 8 training episodes" in text
    assert "logs/" in text and "summary.json" not in text

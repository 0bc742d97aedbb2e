"""Progress of long work (climbrl/progress.py): a live rich bar with an ETA on a terminal, the
plain one-line-per-step log elsewhere; for pretraining, the run's view (steps and held-out
evaluation) and the demo's phases."""

from __future__ import annotations

import logging
import re
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from climbrl.progress import EVAL_PROGRESS_FILE, Steps, read_eval_progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Buffer(StringIO):
    def getvalue(self) -> str:  # the text without the terminal's escape codes
        return ANSI.sub("", super().getvalue())


def _console(terminal: bool) -> tuple[Console, StringIO]:
    buf = _Buffer()
    return Console(file=buf, force_terminal=terminal, width=120), buf


def test_steps_without_a_terminal_print_only_the_log_lines() -> None:
    console, buf = _console(False)
    with Steps("pretraining", 4, console) as steps:
        assert not steps.live
        for i in range(1, 5):
            steps.update(i)
            steps.log(f"step {i} loss 1.0")
    assert buf.getvalue().splitlines() == [f"step {i} loss 1.0" for i in range(1, 5)]


def test_steps_on_a_terminal_render_a_bar_with_an_eta_and_keep_the_lines() -> None:
    console, buf = _console(True)
    with Steps("pretraining", 4, console) as steps:
        assert steps.live
        for i in range(1, 5):
            steps.update(i)
            steps.log(f"step {i} loss 1.0")
    out = buf.getvalue()
    assert "pretraining" in out and "ETA" in out and "4/4" in out
    assert all(f"step {i} loss 1.0" in out for i in range(1, 5))


def test_steps_live_false_prints_plain_lines_on_a_terminal() -> None:
    console, buf = _console(True)
    with Steps("pretraining", 2, console, live=False) as steps:
        steps.update(2)
        steps.log("done")
    assert "ETA" not in buf.getvalue() and "done" in buf.getvalue()


TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "model.max_position_embeddings=64",
    "data.num_docs=200",
    "data.vocab_size=280",
    "data.tokenizer_train_docs=100",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.steps=3",
    "train.warmup_steps=1",
    "train.eval_every=100",
    "train.ckpt_every=100",
    "train.log_every=1",
    "train.threads=1",
    "eval_task_examples=0",
]


@pytest.mark.parametrize("terminal", [False, True], ids=["file", "terminal"])
def test_pretraining_shows_a_bar_only_on_a_terminal(
    terminal: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from climbrl.pretrain.config import load_config
    from climbrl.pretrain.train import train

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TTY_COMPATIBLE", "1" if terminal else "0")  # rich's is_terminal
    train(load_config(None, [*TINY, f"run_dir={tmp_path}"]))
    err = ANSI.sub("", capsys.readouterr().err)
    assert all(f"step {i:6d} loss" in err for i in (1, 2, 3)), err  # the log stays
    assert ("ETA" in err and "pretraining" in err) == terminal, err


def test_eval_progress_file_lives_while_the_evaluation_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from climbrl.learner.evaluation import EvalProgress

    caplog.set_level(logging.INFO, logger="climbrl.learner")
    with EvalProgress(tmp_path, "test", 7, 20, every_s=0.0) as progress:
        assert read_eval_progress(tmp_path) == {"split": "test", "step": 7, "done": 0, "total": 20}
        for done in range(1, 20):
            progress.update(done)
        assert read_eval_progress(tmp_path)["done"] == 19  # type: ignore[index]
    assert not (tmp_path / EVAL_PROGRESS_FILE).exists()
    assert read_eval_progress(tmp_path) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "eval test at step 7: 2/20 tasks" and len(lines) == 9  # one per tenth
    with EvalProgress(tmp_path / "absent", "test", 0, 3) as progress:  # no output folder
        progress.update(1)


def test_the_run_view_adds_a_bar_for_a_running_evaluation(tmp_path: Path) -> None:
    from climbrl.config import load_config
    from climbrl.launcher import RunView

    cfg = load_config(None, ["model.path=m", f"run.output_dir={tmp_path}"])
    console, buf = _console(True)
    view = RunView(cfg, console)
    (tmp_path / EVAL_PROGRESS_FILE).write_text(
        '{"split": "test", "step": 0, "done": 5, "total": 50}'
    )
    console.print(view.render())
    assert "eval test @ step 0" in buf.getvalue() and "5/50" in buf.getvalue()
    assert "steps" in buf.getvalue() and "ETA" in buf.getvalue()
    (tmp_path / EVAL_PROGRESS_FILE).unlink()
    view.render()
    assert view.eval_task is None and len(view.bar.tasks) == 1  # the eval bar is gone


@pytest.mark.parametrize("terminal", [False, True], ids=["file", "terminal"])
def test_demo_phases_have_a_header(terminal: bool) -> None:
    from climbrl.demo import phase

    console, buf = _console(terminal)
    phase(1, 2, "the pretrained base", console)
    out = buf.getvalue()
    assert "climbrl demo 1/2: the pretrained base" in out
    assert ("─" in out) == terminal  # a rule on a terminal, one plain line elsewhere

"""``learner.max_train_minutes``: the training loop's wall-clock budget (benchmarks/vs_trl.py
gives climbrl and TRL the same one). The loop itself runs in
``tests/integration/test_benchmarks.py::test_vs_trl_benchmark_runs_both_sides_on_a_tiny_model``."""

from __future__ import annotations

import pytest

from climbrl.config import load_config


def test_budget_defaults_off_and_takes_fractions_of_a_minute():
    assert load_config(None, ["model.path=m"]).learner.max_train_minutes == 0
    cfg = load_config(None, ["model.path=m", "learner.max_train_minutes=0.5"])
    assert cfg.learner.max_train_minutes == 0.5


def test_negative_budget_is_refused_by_name():
    with pytest.raises(ValueError, match="learner.max_train_minutes"):
        load_config(None, ["model.path=m", "learner.max_train_minutes=-1"])

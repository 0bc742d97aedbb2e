"""`climbrl demo`'s base model: built once per recipe, reused from the output folder after.

pytest tests/unit/test_pretrain_demo.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from climbrl import demo
from climbrl.pretrain.presets import demo_run_config


def test_base_is_reused_only_for_the_same_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []

    def fake_build(out_dir: str, *, seed: int) -> dict:
        calls.append(seed)
        (Path(out_dir) / "model").mkdir(parents=True)
        (Path(out_dir) / "model" / "config.json").write_text("{}")
        s = {"heldout_accuracy": 0.3, "params": 1, "steps": 5, "heldout_samples": []}
        (Path(out_dir) / "summary.json").write_text(json.dumps(s))
        return s

    monkeypatch.setattr("climbrl.pretrain.demo.build_demo_base", fake_build)
    base = tmp_path / "base"
    first = demo.pretrained_base(base, seed=0)
    assert calls == [0] and not first.get("reused") and "heldout_samples" not in first
    again = demo.pretrained_base(base, seed=0)
    assert calls == [0] and again["reused"] and again["heldout_accuracy"] == 0.3
    # Another recipe (here: another seed) rebuilds from scratch.
    demo.pretrained_base(base, seed=1)
    assert calls == [0, 1]
    # So does a half-written base.
    (base / "model" / "config.json").unlink()
    demo.pretrained_base(base, seed=1)
    assert calls == [0, 1, 1]


def test_demo_base_recipe_matches_the_example_config() -> None:
    """examples/pretrain_demo.toml is the demo base as a file: keep the two in step."""
    import tomllib

    example = tomllib.loads(
        (Path(__file__).parents[2] / "examples" / "pretrain_demo.toml").read_text()
    )
    preset = demo_run_config("x")
    assert example["data"] == preset["data"]
    skip = {"seed"}
    assert {k: v for k, v in example["train"].items() if k not in skip} == {
        k: v for k, v in preset["train"].items() if k not in skip
    }
    assert example["model"] == preset["model"]
    assert example["eval_task_examples"] == preset["eval_task_examples"]

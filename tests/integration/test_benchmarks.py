"""The rollout benchmark with the long-prompt setting (chat prompts of 127-161 tokens, seeded):
both paths produce tokens and the benchmark reports a ratio. No timing is asserted. Both
variants start two engines and are ``slow``; the default suite puts the same 64 long seeded
requests on one engine in test_rollout_engine.py, and checks vs_trl's arguments and ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "tasks,group,max_tokens",
    [
        pytest.param(8, 8, 8, marks=pytest.mark.slow, id="64-requests"),
        pytest.param(2, 4, 4, marks=pytest.mark.slow, id="8-requests"),
    ],
)
def test_rollout_benchmark_with_long_seeded_chat_prompts(tasks: int, group: int, max_tokens: int):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/rollout_overhead.py",
            "--env",
            "math",
            "--tasks",
            str(tasks),
            "--group",
            str(group),
            "--max-tokens",
            str(max_tokens),
            "--rounds",
            "1",
            "--no-results-file",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["env"] == "math" and res["prompt_tokens"][0] > 100
    (rnd,) = res["rounds"]
    assert rnd["raw"][0] > 0 and rnd["climbrl"][0] > 0  # tokens generated on each path
    assert res["ratio"] > 0


@pytest.mark.slow
def test_vs_trl_benchmark_runs_both_sides_on_a_tiny_model(tmp_path: Path):
    """benchmarks/vs_trl.py on a random tiny Qwen3 with a 0.1-minute budget per side (about
    two minutes): TRL's GRPOTrainer and `climbrl run` each take optimizer steps, one evaluator
    scores the same held-out tasks for both, and the JSON line carries every figure."""
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/vs_trl.py",
            "--model",
            "tiny",
            "--minutes",
            "0.1",
            "--eval-size",
            "4",
            "--batch-groups",
            "2",
            "--group-size",
            "4",
            "--out",
            str(tmp_path),
            "--no-results-file",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for side in ("trl", "climbrl"):
        r = res[side]
        assert r["steps"] >= 1 and r["steps_per_minute"] > 0, r
        assert r["heldout_change"]["tasks"] == 4 and 0 <= r["heldout_change"]["mcnemar_p"] <= 1
        assert r["accuracy_before"] == res["trl"]["accuracy_before"]  # one evaluator, one base
    # a random model gains nothing, so the ratio is undefined and says why
    if res["trl"]["gain"] <= 0:
        assert res["gain_per_minute_ratio"] is None and "TRL" in res["ratio_note"]


def test_vs_trl_ratio_and_bad_arguments():
    from benchmarks.vs_trl import _args, ratio

    assert ratio(0.06, 0.02) == (pytest.approx(3.0), None)
    for trl, word in ((0.0, "zero"), (-0.01, "negative")):
        r, why = ratio(0.05, trl)
        assert r is None and word in why
    with pytest.raises(SystemExit):
        _args(["--minutes", "0"])
    with pytest.raises(SystemExit):
        _args(["--group-size", "1"])

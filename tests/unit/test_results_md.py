"""benchmarks/make_results.py: RESULTS.md from results files, and the committed page is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.make_results import key_figures, render, write

REPO = Path(__file__).resolve().parents[2]
MACHINE = {"host": "box", "cpu": "Test CPU", "cpus": 4, "memory_gib": 15.6}


def _record(date: str, command: str, result: dict) -> str:
    return json.dumps({"date": date, "machine": MACHINE, "command": command, "result": result})


def _two_files(results: Path) -> None:
    results.mkdir()
    (results / "weight_sync-20270102T030405Z.json").write_text(
        _record(
            "2027-01-02T03:04:05+00:00",
            "python benchmarks/weight_sync.py --sizes 5m",
            {
                "benchmark": "weight_sync",
                "repeats": 3,
                "goal_met": True,
                "label": "not a figure",
                "5m": {
                    "ratio": 1.23,
                    "zmq_ratio": 3.5,
                    "floor_s": 0.0042,
                    "modes": {"lora": {"bytes": 1000, "bytes_ratio": 0.047}},
                },
            },
        )
    )
    (results / "demo_runs-20270203T040506Z.json").write_text(
        _record(
            "2027-02-03T04:05:06+00:00",
            "python benchmarks/demo_runs.py runs/a runs/b",
            {
                "benchmark": "demo_runs",
                "note": "n",
                "runs": [
                    {
                        "run": "a",
                        "changed_from_demo_toml": {},
                        "base_heldout_accuracy": 0.5,
                        "accuracy_before": 0.51,
                        "accuracy_after": 0.62,
                        "gain_points": 11.0,
                        "fixed": 300,
                        "broken": 80,
                        "tasks": 2000,
                        "mcnemar_p": 1.5e-30,
                        "rl_steps": 110,
                        "wall_seconds": 250.0,
                        "base_reused": False,
                    },
                    {
                        "run": "b",
                        "changed_from_demo_toml": {"learner.lr": 0.0001},
                        "accuracy_before": 0.51,
                        "accuracy_after": 0.49,
                        "gain_points": -2.0,
                        "fixed": 100,
                        "broken": 140,
                        "mcnemar_p": 0.012,
                    },
                ],
            },
        )
    )


def test_render_two_files(tmp_path: Path) -> None:
    _two_files(tmp_path / "results")
    out = write(tmp_path / "results", tmp_path / "RESULTS.md")
    md = out.read_text()
    assert md == render(tmp_path / "results")
    # one section per benchmark, in name order, each entry with date, machine and command
    assert md.index("## demo_runs") < md.index("## weight_sync")
    assert "### 2027-01-02T03:04:05+00:00" in md and "### 2027-02-03T04:05:06+00:00" in md
    assert "box, Test CPU, 4 CPUs, 15.6 GiB memory" in md
    assert "`python benchmarks/weight_sync.py --sizes 5m`" in md
    # nested ratios by dotted path; numeric and boolean top-level fields; nothing else
    assert "| `5m.ratio` | 1.23 |" in md
    assert "| `5m.zmq_ratio` | 3.5 |" in md
    assert "| `5m.modes.lora.bytes_ratio` | 0.047 |" in md
    assert "| `repeats` | 3 |" in md and "| `goal_met` | yes |" in md
    assert "floor_s" not in md and "not a figure" not in md
    # demo_runs: a table of runs
    assert "| a | - | 0.5 | 0.51 | 0.62 | 11.0 | 300 / 80 | 1.5e-30 | 110 | 250.0 |" in md
    assert '| b | `{"learner.lr": 0.0001}` | - | 0.51 | 0.49 | -2.0 | 100 / 140 | 0.012 |' in md


def test_newest_first_and_deterministic(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _two_files(results)
    (results / "weight_sync-20270301T000000Z.json").write_text(
        _record(
            "2027-03-01T00:00:00+00:00", "python benchmarks/weight_sync.py", {"5m": {"ratio": 0.9}}
        )
    )
    md = render(results)
    assert md.index("2027-03-01T00:00:00") < md.index("2027-01-02T03:04:05")
    assert render(results) == md


def test_key_figures_flattens_ratio_dicts() -> None:
    figs = key_figures(
        {
            "rounds": 3,
            "model": "m",
            "per_round": [1.0, 2.0],
            "ratio_vs_base": {"a": 1.0, "b": 0.97},
            "levels": [{"p50_ratio": 1.01}],
        }
    )
    assert figs == [
        ("rounds", 3),
        ("ratio_vs_base.a", 1.0),
        ("ratio_vs_base.b", 0.97),
        ("levels[0].p50_ratio", 1.01),
    ]


def test_committed_results_md_is_current() -> None:
    committed = REPO / "benchmarks" / "RESULTS.md"
    assert committed.exists(), "run: python benchmarks/make_results.py"
    assert committed.read_text() == render(REPO / "benchmarks" / "results"), (
        "benchmarks/RESULTS.md is stale against benchmarks/results/*.json; "
        "run: python benchmarks/make_results.py"
    )


def test_check_flag(tmp_path: Path) -> None:
    _two_files(tmp_path / "results")
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "make_results.py"),
        "--results-dir",
        str(tmp_path / "results"),
        "--out",
        str(tmp_path / "R.md"),
    ]
    assert subprocess.run([*cmd, "--check"], capture_output=True).returncode == 1
    subprocess.run(cmd, check=True, capture_output=True)
    assert subprocess.run([*cmd, "--check"], capture_output=True).returncode == 0


def test_two_results_in_the_same_second_keep_both_files(tmp_path, monkeypatch):
    import datetime

    from benchmarks import common
    from benchmarks.make_results import benchmark_name

    fixed = datetime.datetime(2027, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206 - datetime's own signature
            return fixed

    monkeypatch.setattr(datetime, "datetime", Clock)
    monkeypatch.setattr(common, "__file__", str(tmp_path / "common.py"))
    a = common.write_result("demo_runs", {"run": "a"})
    b = common.write_result("demo_runs", {"run": "b"})
    assert (a.name, b.name) == (
        "demo_runs-20270102T030405Z.json",
        "demo_runs-20270102T030405Z-2.json",
    )
    assert [json.loads(p.read_text())["result"]["run"] for p in (a, b)] == ["a", "b"]
    assert benchmark_name(b) == "demo_runs"

"""Collect `climbrl demo` runs into one results file: what each run changed and what it gained.

    python benchmarks/demo_runs.py runs/demo_a runs/e_lr1e4 ... [--note "what was compared"]

Reads each folder's ``demo_summary.json`` and ``config.resolved.toml`` and writes, with the
date, machine and command, ``benchmarks/results/demo_runs-<time>.json``: per run the learner
and env settings that differ from ``climbrl/configs/demo.toml``, the held-out accuracy before
and after, the tasks fixed and broken and the exact McNemar p (``climbrl demo --model smollm2``
runs also their strict-format rate, against ``climbrl/configs/demo_smollm2.toml``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "args":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    from benchmarks.common import write_result

    configs = resources.files("climbrl") / "configs"
    demos = {
        name: _flat(tomllib.loads((configs / f"{name}.toml").read_text()))
        for name in ("demo", "demo_smollm2")
    }
    rows = []
    for run in map(Path, a.runs):
        s = json.loads((run / "demo_summary.json").read_text())
        cfg = _flat(tomllib.loads((run / "config.resolved.toml").read_text()))
        demo = demos["demo_smollm2" if "model" in s else "demo"]  # the config it started from
        changed = {
            k: v
            for k, v in cfg.items()
            if k.startswith(("learner.", "env.", "rollout.")) and k in demo and demo[k] != v
        }
        ch = s.get("heldout_change") or {}
        rows.append(
            {
                "run": run.name,
                "model": s.get("model", "demo base"),
                "changed_from_demo_toml": changed,
                "base_heldout_accuracy": s.get("base_heldout_accuracy"),
                "accuracy_before": s["accuracy_before"],
                "accuracy_after": s["accuracy_after"],
                "gain_points": round(100 * (s["accuracy_after"] - s["accuracy_before"]), 2),
                "fixed": ch.get("fixed"),
                "broken": ch.get("broken"),
                "tasks": ch.get("tasks"),
                "mcnemar_p": ch.get("mcnemar_p"),
                "rl_steps": s["rl_steps"],
                "wall_seconds": round(s["wall_seconds"], 1),
                "base_reused": s.get("base_reused"),
            }
        )
        if "strict_before" in s:  # the SmolLM2 demo: strict format, next to answer-correct
            rows[-1].update(strict_before=s["strict_before"], strict_after=s["strict_after"])
    result = {"benchmark": "demo_runs", "note": a.note, "runs": rows}
    print(json.dumps(result))
    print(write_result("demo_runs", result), file=sys.stderr)


if __name__ == "__main__":
    main()

"""Metrics sink: one JSON object per line in ``OUT/metrics.jsonl`` and TensorBoard scalars.

The launcher tails the JSONL file for its progress display; ``summary.json`` holds the final
summary of a run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, out: Path, resume: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "metrics.jsonl"
        self._f = open(self.path, "a" if resume else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; tolerate a broken install
            self._tb = None

    def write(self, rec: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in rec.items()
        }
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = int(rec.get("step", 0))
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k if "/" in k else f"train/{k}", v, step)

    def summary(self, s: dict[str, Any]) -> None:
        """``summary.json``, strict JSON: a NaN or infinite number is written as null."""
        (self.out / "summary.json").write_text(json.dumps(_strict(s), indent=2, allow_nan=False))

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _strict(v: Any) -> Any:
    """``v`` with every non-finite float, at any depth, replaced by None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_strict(x) for x in v]
    return v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return out


def paired_change(before: list[float], after: list[float]) -> dict[str, Any]:
    """Before/after correctness on the same held-out tasks: how many the run fixed and broke,
    and the exact McNemar p-value (scipy's two-sided binomial test on the discordant pairs) of
    the change being chance. Accuracy differences of a few points on a held-out set of a few
    thousand are within a standard error or two; the paired test tells them from noise."""
    from scipy.stats import binomtest

    if len(before) != len(after):
        raise ValueError(f"paired_change: {len(before)} outcomes before, {len(after)} after")
    fixed = sum(1 for b, a in zip(before, after) if a >= 0.5 > b)
    broken = sum(1 for b, a in zip(before, after) if b >= 0.5 > a)
    p = binomtest(fixed, fixed + broken, 0.5).pvalue if fixed + broken else 1.0
    return {"tasks": len(before), "fixed": fixed, "broken": broken, "mcnemar_p": float(p)}

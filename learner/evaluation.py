"""Scoring a held-out evaluation: greedy episodes, one per task, through the rollout engines.

A task's outcome is its episode's ``correct`` metric (or reward at the env's maximum). An
episode that failed in the env, or got no answer within ``wire.order_timeout_s``, scores 0.
The env's other numeric metrics are averaged over the tasks, a failed one counting 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from climbrl.wire import ENV_ERROR, Trajectory


@dataclass
class EvalScore:
    outcomes: list[float]  # per task, in task order
    accuracy: float
    metrics: dict[str, float]  # the env's other metrics, averaged over the tasks
    env_errors: int
    timeouts: int

    def record(self, step: int, split: str, failed: bool) -> dict[str, float | int]:
        """The ``metrics.jsonl`` record of this evaluation (failure counts when any)."""
        rec: dict[str, float | int] = {"step": step, f"eval/{split}_accuracy": self.accuracy}
        rec.update({f"eval/{split}_{k}": v for k, v in self.metrics.items()})
        if failed:  # (the live table's caption shows every eval/ key)
            rec[f"eval/{split}_env_errors"] = self.env_errors
            rec[f"eval/{split}_timeouts"] = self.timeouts
        return rec


def score(
    n: int,
    results: dict[int, Trajectory],
    failures: dict[int, tuple[str, str]],
    reward_max: float,
) -> EvalScore:
    """Score tasks 0..n-1 from their trajectories (``results``) and failed orders
    (``failures``: task -> (why, error), why = "env" or "timeout"); an episode that failed in
    the env is added to ``failures``."""
    outcomes = [0.0] * n  # a failed episode scores 0
    sums: dict[str, float] = {}
    for task, t in results.items():
        vals = []
        for s in t.samples:
            if s.finish_reason == ENV_ERROR:
                failures.setdefault(task, ("env", s.error))
                vals.append(0.0)
                continue
            vals.append(s.metrics.get("correct", float(s.reward >= reward_max)))
            for k, v in s.metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + float(v) / len(t.samples)
        outcomes[task] = sum(vals) / max(len(vals), 1)
    kinds = [why for why, _ in failures.values()]
    return EvalScore(
        outcomes=outcomes,
        accuracy=sum(outcomes) / n,
        metrics={k: v / n for k, v in sorted(sums.items()) if k != "correct"},
        env_errors=kinds.count("env"),
        timeouts=kinds.count("timeout"),
    )

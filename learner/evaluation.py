"""Scoring a held-out evaluation: greedy episodes, one per task, through the rollout engines.

A task's outcome is its episode's ``correct`` metric (or reward at the env's maximum). An
episode that failed in the env, or got no answer within ``wire.order_timeout_s``, scores 0.
The env's other numeric metrics are averaged over the tasks, a failed one counting 0.

While it runs, ``EvalProgress`` says how far it is: in ``OUTPUT_DIR/eval_progress.json``,
which ``climbrl run``'s live view shows as a bar with an ETA, and in a plain line per tenth of
the tasks in the learner's log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from climbrl.metrics import paired_change
from climbrl.progress import EVAL_PROGRESS_FILE
from climbrl.wire import ENV_ERROR, Trajectory

log = logging.getLogger("climbrl.learner")


class EvalProgress:
    """How far one held-out evaluation is: ``OUT/eval_progress.json`` (split, step, done,
    total), rewritten at most every ``every_s`` while it runs and removed when it ends, and a
    log line per tenth of the tasks.

        with EvalProgress(out, "test", step, n) as progress:
            while not finished:
                ...
                progress.update(done)
    """

    def __init__(
        self, out: Path | None, split: str, step: int, total: int, every_s: float = 0.5
    ) -> None:
        # (no file where the learner has no output folder: unit tests build one without)
        self.path = Path(out) / EVAL_PROGRESS_FILE if out and Path(out).is_dir() else None
        self.split, self.step, self.total, self.every_s = split, step, total, every_s
        self.done = -1
        self._written = 0.0
        self._logged = 0  # tenths logged

    def __enter__(self) -> EvalProgress:
        self.update(0)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def update(self, done: int) -> None:
        if done == self.done:
            return
        self.done = done
        # (perf_counter: the learner's deadlines read time.monotonic, which tests may drive)
        now = time.perf_counter() if self.path is not None else 0.0
        if self.path is not None and (now - self._written >= self.every_s or done >= self.total):
            self._written = now
            rec = {"split": self.split, "step": self.step, "done": done, "total": self.total}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, self.path)
        tenths = 10 * done // max(self.total, 1)
        if tenths > self._logged:
            self._logged = tenths
            log.info("eval %s at step %d: %d/%d tasks", self.split, self.step, done, self.total)


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


def report_eval(
    sc: EvalScore, split: str, step: int, n: int, failures: dict[int, tuple[str, str]]
) -> None:
    """The learner log's lines for one evaluation: its accuracy, and a warning with the first
    failure where episodes failed."""
    if failures:
        log.warning(
            "eval %s at step %d: %d of %d episodes failed and score 0 (%d in the "
            "env, %d past wire.order_timeout_s); the first: %s",
            split,
            step,
            len(failures),
            n,
            sc.env_errors,
            sc.timeouts,
            failures[min(failures)][1],
        )
    log.info("eval %s accuracy at step %d: %.3f", split, step, sc.accuracy)


def run_summary(
    steps: int,
    before: float | None,
    after: float,
    *,
    elapsed_s: float,
    train_loop_s: float | None,
    counters: dict[str, int],
    eval_metrics: dict[int, dict[str, float]],
    outcomes: tuple[list[float] | None, list[float] | None],
) -> dict[str, Any]:
    """``summary.json`` of a run: held-out accuracy before and after (null, not NaN, where no
    evaluation ran: ``learner.eval_size = 0``, or a resumed run), the env's other metrics at
    the first and the last evaluation, and, where both evaluations ran on the same tasks,
    which tasks the run fixed and broke with the exact McNemar p (``heldout_change``)."""
    summary: dict[str, Any] = {
        "steps": steps,
        "accuracy_before": _finite(before),
        "accuracy_after": _finite(after),
        "elapsed_s": elapsed_s,
        "train_loop_s": train_loop_s,
        **counters,
    }
    if eval_metrics:
        if before is not None:
            summary["eval_metrics_before"] = eval_metrics[min(eval_metrics)]
        summary["eval_metrics_after"] = eval_metrics[max(eval_metrics)]
    before_outcomes, after_outcomes = outcomes
    if before_outcomes is not None and after_outcomes is not None:
        summary["heldout_change"] = paired_change(before_outcomes, after_outcomes)
    return summary


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None

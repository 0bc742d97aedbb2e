"""Live progress for long work: a rich bar with an ETA on a terminal, plain lines elsewhere.

    with Steps("pretraining", total=700, console=console) as steps:
        for step in range(1, 701):
            ...
            steps.update(step)
            if step % 50 == 0:
                steps.log(f"step {step} loss {loss:.4f}")

On a terminal (rich's ``Console.is_terminal``) the bar holds the bottom line and ``log``'s
lines scroll above it. In a file or CI there is no bar, and ``log`` prints the same lines,
so a log keeps its one line per step. ``climbrl run``'s live view, ``climbrl pretrain``,
``climbrl demo`` and held-out evaluation all use ``progress_bar``.

A held-out evaluation runs in the learner, whose output goes to a log file: it writes how far
it is to ``OUTPUT_DIR/eval_progress.json`` (``climbrl.learner.evaluation.EvalProgress``), and
the run's live view reads it here (``read_eval_progress``) to show a bar for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(console: Console, transient: bool = False) -> Progress:
    """A bar per task: its description, done/total, elapsed time and ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


class Steps:
    """One long job of ``total`` steps: a live bar on a terminal, plain ``log`` lines always.

    ``live = False`` (``--no-live``, ``quiet``) keeps the plain lines on a terminal too."""

    def __init__(
        self,
        description: str,
        total: float | None,
        console: Console | None = None,
        *,
        completed: int = 0,
        live: bool = True,
    ) -> None:
        self.console = console or Console(stderr=True)
        self.description = description
        self.total = total
        self.completed = completed
        self.bar = progress_bar(self.console) if live and self.console.is_terminal else None
        self._task: TaskID | None = None

    @property
    def live(self) -> bool:
        """Whether a bar shows (a terminal, and live asked for)."""
        return self.bar is not None

    def __enter__(self) -> Steps:
        if self.bar is not None:
            self.bar.start()
            self._task = self.bar.add_task(
                self.description, total=self.total, completed=self.completed
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(
        self, completed: int, total: float | None = None, description: str | None = None
    ) -> None:
        """Set how much is done (and the total or description, when they change)."""
        self.completed = completed
        if total is not None:
            self.total = total
        if self.bar is not None and self._task is not None:
            kw: dict[str, Any] = {"completed": completed}
            if total is not None:
                kw["total"] = total
            if description is not None:
                kw["description"] = description
            self.bar.update(self._task, **kw)

    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)

    def log(self, *objects: Any, **kw: Any) -> None:
        """Print a line: above the bar on a terminal, as it is elsewhere (``Console.print``)."""
        self.console.print(*objects, **kw)


EVAL_PROGRESS_FILE = "eval_progress.json"


def read_eval_progress(out: Path) -> dict[str, Any] | None:
    """The running evaluation's progress in ``out`` (split, step, done, total), or None."""
    try:
        rec = json.loads((Path(out) / EVAL_PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and {"split", "done", "total"} <= rec.keys() else None

"""How long a rollout server's event loop was blocked, and by what.

Orders, env episodes, weight updates and HTTP requests share the server's one event loop, so
anything that blocks it (an env doing synchronous work in an async method, say) delays them all.
``LoopLagMonitor.run`` is a task that sleeps ``period`` at a time and measures how late it
wakes: that lateness is the lag. A watchdog thread looks at the loop's thread while a wake-up is
overdue by ``sample_after_s`` and records the innermost frames it is running (outside the
standard library), so the worst lag comes with where the time went, e.g.
``slow_score (my_env.py:12) <- MyEnv.respond (my_env.py:30)``. The rollout server sends both
with each heartbeat; the learner logs them per step and warns past ``rollout.loop_lag_warn_s``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import sysconfig
import threading
import time
from types import FrameType

_STDLIB = tuple(
    {os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib")}
)
_HERE = os.path.realpath(__file__)


def _short(path: str) -> str:
    for mark in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if mark in path:
            return path.split(mark, 1)[1]
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def describe(frame: FrameType | None, depth: int = 3) -> str:
    """The innermost ``depth`` frames of a stack that are not standard library code, innermost
    first: ``func (file:line) <- caller (file:line)``; "" for no frame."""
    parts: list[str] = []
    while frame is not None and len(parts) < depth:
        path = os.path.realpath(frame.f_code.co_filename)
        if not path.startswith(_STDLIB) and path != _HERE:
            parts.append(f"{frame.f_code.co_qualname} ({_short(path)}:{frame.f_lineno})")
        frame = frame.f_back
    return " <- ".join(parts)


class LoopLagMonitor:
    """``take()`` returns the worst lag since the previous call and where the loop was then."""

    def __init__(self, period: float = 0.05, sample_after_s: float = 0.1):
        self.period = period
        self.sample_after_s = sample_after_s
        self._worst = 0.0
        self._worst_where = ""
        self._tick = time.monotonic()  # when the measuring task last went to sleep
        self._stall: tuple[float, str] = (0.0, "")  # (tick it belongs to, frames seen)
        self._loop_thread = 0

    def take(self) -> tuple[float, str]:
        out = (self._worst, self._worst_where)
        self._worst, self._worst_where = 0.0, ""
        return out

    async def run(self, stop: asyncio.Event) -> None:
        """Measure until ``stop`` is set (a task on the loop to watch)."""
        self._loop_thread = threading.get_ident()
        done = threading.Event()
        watchdog = threading.Thread(
            target=self._watch, args=(done,), daemon=True, name="climbrl-loop-lag"
        )
        watchdog.start()
        try:
            while not stop.is_set():
                t = time.perf_counter()
                self._tick = tick = time.monotonic()
                await asyncio.sleep(self.period)
                lag = time.perf_counter() - t - self.period
                if lag > self._worst:
                    stall_tick, where = self._stall
                    self._worst = lag
                    self._worst_where = where if stall_tick == tick else ""
        finally:
            done.set()

    def _watch(self, done: threading.Event) -> None:
        while not done.wait(self.sample_after_s / 2):
            tick = self._tick
            if time.monotonic() - tick < self.sample_after_s + self.period:
                continue
            where = describe(sys._current_frames().get(self._loop_thread))
            if self._tick == tick and where:  # still the same stall: keep its latest frames
                self._stall = (tick, where)

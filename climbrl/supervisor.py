"""One supervisor for a run's processes, shared by the local and the Ray launcher.

A launcher starts the learner and the rollout servers and hands their handles here. It keeps
only how a child starts, stops and is polled (``launcher.Child``: a process group on this
machine; ``launcher_ray.RayChild``: a process in a Ray actor); the policy lives here. The
supervisor polls every child and applies ``run.on_child_death`` to a rollout server that dies:

- ``stop``: the run ends with exit code 1;
- ``continue``: the death is reported once and the learner carries on without the server (its
  heartbeat check reassigns the server's orders);
- ``restart``: the server is stopped (with whatever it left behind) and started again with the
  same command under the same server id, up to ``run.max_restarts`` times per server; the
  learner brings it to the current weights when it says Hello.

The run ends when the learner exits (with its exit code), on SIGINT/SIGTERM (130), or as
above. A death is reported on stderr with the tail of the child's log. At the end the launcher
calls ``stop_all``: every child, newest first, each by its own PID.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Generic, Literal, Protocol, TypeVar

from rich.console import Console
from rich.text import Text

SIGNAL_EXIT = 130  # the run's exit code when SIGINT or SIGTERM stopped it


class ChildHandle(Protocol):
    """What the supervisor needs of a child: a launcher's handle on one process."""

    name: str

    @property
    def pid(self) -> int: ...

    def track(self) -> None:
        """Record the child's descendants now (they are stopped with it)."""
        ...

    def poll(self) -> int | None:
        """Its exit code, or None while it runs."""
        ...

    def tail(self, n: int = 25) -> str:
        """The last ``n`` lines of its log."""
        ...

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, ``grace_s`` to exit, then SIGKILL to it and its recorded descendants."""
        ...


C = TypeVar("C", bound=ChildHandle)


class Supervisor(Generic[C]):
    """Watches ``children`` (the learner among them) and applies ``run.on_child_death``.

    ``restart(child)`` starts a dead child's command again and returns its new handle, which
    replaces the old one in ``children`` (the launcher's own list, so what it stops at the end
    is what runs)."""

    def __init__(
        self,
        children: list[C],
        learner: C,
        restart: Callable[[C], C],
        *,
        on_child_death: Literal["stop", "continue", "restart"],
        max_restarts: int,
        console: Console | None = None,
    ) -> None:
        if on_child_death not in ("stop", "continue", "restart"):
            raise ValueError(
                f"run.on_child_death = {on_child_death!r}: choose 'stop', 'continue' or 'restart'"
            )
        self.children = children
        self.learner = learner
        self.restart = restart
        self.policy = on_child_death
        self.max_restarts = max_restarts
        self.console = console or Console(stderr=True)
        self.restarts: dict[str, int] = {}  # server name -> restarts so far
        self.reported: set[str] = set()  # servers whose death is reported ('continue')

    def say(self, msg: str, style: str = "", tail: str = "") -> None:
        """One report on the console (plain text: a log tail may hold brackets)."""
        self.console.print(Text(f"climbrl: {msg}", style=style), soft_wrap=True)
        if tail:
            self.console.print(Text(tail), soft_wrap=True, highlight=False)

    def check(self, signum: int | None = None) -> int | None:
        """One look at every child; the run's exit code once it should end, else None.
        ``signum``: the signal that asks the run to stop, if one came."""
        for c in self.children:
            c.track()
        if signum is not None:
            self.say(f"signal {signum}: stopping every process", "yellow")
            return SIGNAL_EXIT
        lrc = self.learner.poll()
        if lrc is not None:
            if lrc != 0:
                self.say(f"learner exited with {lrc}", "red", self.learner.tail())
            return lrc
        for i, c in enumerate(self.children):
            if c is self.learner or c.name in self.reported:
                continue
            rc = c.poll()
            if rc is None:
                continue
            self.say(f"{c.name} (pid {c.pid}) died with {rc}", "red", c.tail())
            if self.policy == "stop":
                return 1
            if self.policy == "continue":
                self.reported.add(c.name)  # reported once; the learner carries on without it
                continue
            n = self.restarts.get(c.name, 0)
            if n >= self.max_restarts:
                self.say(
                    f"{c.name} died {n + 1} times (run.max_restarts = {self.max_restarts}): "
                    "stopping",
                    "red",
                )
                return 1
            self.restarts[c.name] = n + 1
            c.stop(grace_s=2.0)  # its engine core and anything else it left behind
            self.children[i] = self.restart(c)
            self.say(
                f"restarted {c.name} as pid {self.children[i].pid} "
                f"(restart {n + 1}/{self.max_restarts})",
                "yellow",
            )
        return None

    def watch(
        self,
        signum: Callable[[], int | None],
        every_s: float = 1.0,
        on_tick: Callable[[], None] | None = None,
    ) -> int:
        """``check`` every ``every_s`` until the run ends (``on_tick`` after each look, for
        progress); returns the run's exit code."""
        while (rc := self.check(signum())) is None:
            time.sleep(every_s)
            if on_tick is not None:
                on_tick()
        return rc


def stop_all(children: Sequence[ChildHandle], grace_s: float = 10.0) -> None:
    """Stop every child, newest first (the servers before the learner)."""
    for c in reversed(children):
        c.stop(grace_s)

"""climbrl/supervisor.py: the one policy both launchers apply to their children (stop,
continue, restart up to run.max_restarts), driven here with fake children (no processes)."""

from __future__ import annotations

from io import StringIO

import pytest
from rich.console import Console

from climbrl.supervisor import SIGNAL_EXIT, Supervisor, stop_all


class FakeChild:
    """A child whose exit code the test sets; it records the calls the supervisor makes."""

    started = 0

    def __init__(self, name: str) -> None:
        FakeChild.started += 1
        self.name, self.pid, self.rc = name, 1000 + FakeChild.started, None
        self.stopped: list[float] = []
        self.tracked = 0

    def track(self) -> None:
        self.tracked += 1

    def poll(self) -> int | None:
        return self.rc

    def tail(self, n: int = 25) -> str:
        return f"[{self.name} log] Traceback ..."  # brackets: printed as text, not markup

    def stop(self, grace_s: float = 10.0) -> None:
        self.stopped.append(grace_s)


def _run(policy: str, max_restarts: int = 2) -> tuple[Supervisor[FakeChild], StringIO]:
    buf = StringIO()
    learner, server = FakeChild("learner"), FakeChild("rollout-0")
    sup = Supervisor(
        [learner, server],
        learner,
        lambda c: FakeChild(c.name),
        on_child_death=policy,  # type: ignore[arg-type]
        max_restarts=max_restarts,
        console=Console(file=buf, width=200),
    )
    return sup, buf


def test_stop_ends_the_run_when_a_server_dies() -> None:
    sup, buf = _run("stop")
    assert sup.check() is None
    server = sup.children[1]
    server.rc = -9
    assert sup.check() == 1
    out = buf.getvalue()
    assert f"climbrl: rollout-0 (pid {server.pid}) died with -9" in out
    assert "[rollout-0 log] Traceback" in out  # the log tail, brackets and all
    assert all(c.tracked == 2 for c in sup.children)


def test_continue_reports_a_death_once_and_runs_until_the_learner_ends() -> None:
    sup, buf = _run("continue")
    sup.children[1].rc = 1
    assert sup.check() is None and sup.check() is None
    assert buf.getvalue().count("died with 1") == 1
    sup.learner.rc = 0
    assert sup.check() == 0


def test_restart_replaces_the_server_up_to_the_budget_then_stops() -> None:
    sup, buf = _run("restart", max_restarts=2)
    first = sup.children[1]
    for k in (1, 2):
        dead = sup.children[1]
        dead.rc = -9
        assert sup.check() is None
        assert dead.stopped == [2.0]  # cleaned up before its replacement starts
        assert sup.children[1] is not dead and sup.children[1].name == "rollout-0"
        assert f"restarted rollout-0 as pid {sup.children[1].pid} (restart {k}/2)" in buf.getvalue()
    sup.children[1].rc = -9
    assert sup.check() == 1
    assert "rollout-0 died 3 times (run.max_restarts = 2): stopping" in buf.getvalue()
    assert first is not sup.children[1]


def test_the_learner_exit_code_ends_the_run_with_its_log_when_nonzero() -> None:
    sup, buf = _run("restart")
    sup.learner.rc = 3
    assert sup.check() == 3
    assert "learner exited with 3" in buf.getvalue() and "[learner log]" in buf.getvalue()


def test_a_signal_stops_the_run_and_stop_all_stops_every_child_newest_first() -> None:
    sup, buf = _run("stop")
    assert sup.watch(lambda: 15, every_s=0.0) == SIGNAL_EXIT
    assert "signal 15: stopping every process" in buf.getvalue()
    order: list[str] = []
    for c in sup.children:
        c.stop = lambda grace_s=10.0, c=c: order.append(c.name)  # type: ignore[method-assign]
    stop_all(sup.children)
    assert order == ["rollout-0", "learner"]


def test_an_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="run.on_child_death"):
        _run("ignore")

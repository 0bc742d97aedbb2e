"""climbrl.reaper: the whole session of a command ends when the process that started it dies.

A stand-in for the Ray actor (a plain Python process) starts a command in a session of its own
that leaves a grandchild in the session (as a rollout server leaves vLLM's engine core), and a
reaper next to it. SIGKILL of the stand-in's process group (as Ray's raylet kills a dead worker's group) must end
the command and the grandchild, even right after the start (the reaper holds SIGTERM until its
handler is set).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from climbrl.reaper import session_pids

# The "actor": starts the command (own session, parent-death SIGTERM, like launcher.Child) and
# the reaper next to it, prints the command's pid, then waits to be killed.
ACTOR = """
import subprocess, sys, time
from climbrl import reaper
from climbrl.launcher import _die_with_parent
cmd = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1]], start_new_session=True, preexec_fn=_die_with_parent
)
reaper.start(cmd.pid, grace_s=0.5)
print(cmd.pid, flush=True)
time.sleep(600)
"""
# The "command": a grandchild in the same session that ignores SIGTERM (only SIGKILL ends it).
COMMAND = """
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
time.sleep(600)
"""


def _wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def _start_actor() -> tuple[subprocess.Popen, int]:
    actor = subprocess.Popen(
        [sys.executable, "-c", ACTOR, COMMAND],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        start_new_session=True,
    )
    sid = int(actor.stdout.readline())
    assert _wait_for(lambda: len(session_pids(sid)) == 2, 30), session_pids(sid)
    return actor, sid


def _kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        os.kill(pid, signal.SIGKILL)


def test_actor_death_ends_the_commands_whole_session() -> None:
    actor, sid = _start_actor()
    try:
        os.killpg(actor.pid, signal.SIGKILL)  # the actor and its process group
        actor.wait()
        # the grandchild ignores SIGTERM: the reaper's SIGKILL after its grace ends it
        assert _wait_for(lambda: session_pids(sid) == [], 20), session_pids(sid)
    finally:
        _kill_session(sid)


def test_the_reaper_exits_when_the_session_ends_by_itself() -> None:
    import psutil

    actor, sid = _start_actor()
    try:
        reaper = next(
            c for c in psutil.Process(actor.pid).children() if "climbrl.reaper" in c.cmdline()
        )
        _kill_session(sid)
        assert _wait_for(lambda: not reaper.is_running() or reaper.status() == "zombie", 10)
    finally:
        _kill_session(sid)
        actor.kill()
        actor.wait()


def test_bad_arguments_are_refused() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "climbrl.reaper", "x"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "usage" in r.stderr

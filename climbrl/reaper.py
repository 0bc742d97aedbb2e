"""Session reaper: ends a command's whole session when the process that started it dies.

    python -m climbrl.reaper SID PARENT_PID [GRACE_S]

The Ray launcher's ``ProcessActor`` starts one next to each command it runs. The command leads
a session of its own (``start_new_session``) and its descendants stay in it: vLLM's engine core
and workers too. When the actor dies (killed, its worker crashed, or Ray ends it because the
driver is gone) nothing on that node would stop them: the parent-death signal reaches the
command alone, and a rollout server that dies of it leaves its engine core running. The reaper
gets that same signal (SIGTERM, ``PR_SET_PDEATHSIG``), sends SIGTERM to every process of the
session, waits ``GRACE_S`` (default 5) and SIGKILLs what is left. It exits by itself once the
session is empty (the actor stopped the command the ordinary way).

Only the standard library: it starts in a fraction of a second and holds little memory.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 5.0
POLL_S = 1.0


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``. A session id is not reused while a
    process of the session lives, so a match is always one of the command's processes."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.getsid(int(p.name)) == sid and (p / "stat").read_text().split()[2] != "Z":
                out.append(int(p.name))
        except (OSError, IndexError):
            pass
    return out


def reap(sid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM every process of the session, then SIGKILL those left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _preexec() -> None:
    """In the forked reaper before exec: SIGTERM stays blocked (pending) until the reaper's
    handler is set, so a parent that dies at once still gets its session reaped; and the
    parent's death sends SIGTERM (Linux PR_SET_PDEATHSIG)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def start(sid: int, grace_s: float = GRACE_S) -> subprocess.Popen:
    """Start a reaper for session ``sid``, bound to the calling thread's life. It leads a
    session of its own: Ray kills a dead worker's process group, and the reaper must outlive
    the worker to do its job."""
    return subprocess.Popen(
        [sys.executable, "-m", "climbrl.reaper", str(sid), str(os.getpid()), str(grace_s)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_preexec,
    )


def main(argv: list[str]) -> int:
    try:
        sid, parent = int(argv[0]), int(argv[1])
        grace_s = float(argv[2]) if len(argv) == 3 else GRACE_S
        assert len(argv) in (2, 3)
    except (IndexError, ValueError, AssertionError):
        print("usage: python -m climbrl.reaper SID PARENT_PID [GRACE_S]", file=sys.stderr)
        return 2
    parent_died = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal parent_died
        parent_died = True

    signal.signal(signal.SIGTERM, on_term)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a pending one arrives now
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the driver's terminal is not ours
    while not parent_died and os.getppid() == parent:  # ppid changes if the parent died first
        if not session_pids(sid):
            return 0
        time.sleep(POLL_S)
    reap(sid, grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The processes behind ``climbrl.envs.sandbox``: sandboxes started ahead, the Landlock fork
server, and the clean-up of finished sandboxes off the run's path.

- ``_Pool``: per configuration, ``warm`` sandboxes started ahead on one long-lived daemon thread
  (bwrap's --die-with-parent follows the thread that started it); each serves one run only.
- ``_ForkServer``: ``_landlock.serve`` on the payload's interpreter, forking one helper per
  Landlock sandbox (``_Helper``: waited on through a pidfd, since it is not our child).
- ``_reap``: a finished sandbox's own exit (bwrap's namespaces going down, the helper's exit), its
  cgroup and work folder are handled on a background thread.
- ``close_pools``: stops the sandboxes started ahead and waits for the clean-ups (also at exit).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import marshal
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import _cgroup

# The Landlock fork server (``_landlock.serve``), imported so that its bytecode is cached.
_LANDLOCK_SERVER = (
    f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
    "import _landlock; _landlock.serve(int(sys.argv[1]))"
)
# A sandbox started ahead waits at most this long for its run, then is replaced.
_MAX_IDLE_S = 900.0
# Configurations (interpreter, limits, ...) with sandboxes started ahead, at most.
_MAX_POOLS = 4


@dataclass
class _Spec:
    argv: list[str]
    fds: list[int]
    status_fd: int | None
    cwd: str | None
    env: dict[str, str] | None
    workdir: str | None
    user: int | None = None
    helper_cfg: dict | None = None
    """Landlock: the helper's configuration, for the fork server (``argv`` is unused)."""


def _killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Helper:
    """A Landlock helper: a child of the fork server, not of this process, so it is waited on
    through a pidfd (its exit code is the one it reports on the status fd)."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)  # it waits for its request: its pid is not reused yet
        self.stdin = os.fdopen(stdin, "wb", buffering=0)
        self.stdout = os.fdopen(stdout, "rb", buffering=0)
        self.stderr = os.fdopen(stderr, "rb", buffering=0)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            if not select.select([self.pidfd], [], [], timeout)[0]:
                if timeout == 0:
                    return None
                raise subprocess.TimeoutExpired("landlock helper", timeout or 0)
            self.returncode = 0
            os.close(self.pidfd)
        return self.returncode

    def release(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)


class _ForkServer:
    """``_landlock.serve`` on one interpreter: forks a Landlock helper per sandbox."""

    def __init__(self, python: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [python, "-s", "-E", "-c", _LANDLOCK_SERVER, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
                cwd="/",
                env={},
            )
        self.sock = ours
        self.lock = threading.Lock()

    def spawn(self, cfg: dict, fds: Sequence[int]) -> _Helper:
        """Fork a helper for ``cfg`` with the run's new stdin, stdout and stderr pipes, then
        ``fds`` (status, seccomp, cgroup)."""
        pipes = [os.pipe() for _ in range(3)]
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
        try:
            with self.lock:
                socket.send_fds(self.sock, [marshal.dumps(cfg)], [*theirs, *fds])
                answer = self.sock.recv(8)
        except OSError:
            answer = b""
        finally:
            for fd in theirs:
                os.close(fd)
        if len(answer) != 8:
            for fd in (pipes[0][1], pipes[1][0], pipes[2][0]):
                os.close(fd)
            raise RuntimeError("the Landlock fork server is gone; it restarts on the next run")
        return _Helper(int.from_bytes(answer, "little"), pipes[0][1], pipes[1][0], pipes[2][0])

    def close(self) -> None:
        self.sock.close()  # it exits on EOF
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_FORK_SERVERS: dict[str, _ForkServer] = {}


def _fork_server(python: str) -> _ForkServer:
    with _POOLS_LOCK:
        server = _FORK_SERVERS.get(python)
        if server is None or server.proc.poll() is not None:
            if server is not None:
                server.sock.close()
            server = _FORK_SERVERS[python] = _ForkServer(python)
            _register_atexit()
        return server


@dataclass
class _Started:
    """A sandbox started ahead of its request: the interpreter waits on stdin."""

    popen: subprocess.Popen | _Helper | None
    spec: _Spec | None
    cg: _cgroup.EpisodeCgroup | None
    backend: str
    at: float

    def stop(self, grace_s: float = 0.0) -> None:
        """End it if it still runs after ``grace_s`` (the landlock helper sweeps on SIGTERM),
        and reap it."""
        if self.popen is None or self.popen.poll() is not None:
            return
        if grace_s:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace_s)
                return
        _killpg(self.popen.pid, signal.SIGTERM if self.backend == "landlock" else signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            _killpg(self.popen.pid)
            self.popen.wait()

    def cleanup(self) -> None:
        """Free what the run held: pipes, the status fd, the work folder, the cgroup."""
        if self.popen is not None:
            for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                with contextlib.suppress(OSError):
                    if pipe is not None:
                        pipe.close()
            if isinstance(self.popen, _Helper):
                self.popen.release()
        if self.spec is not None:
            if self.spec.status_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.spec.status_fd)
            if self.spec.workdir:
                shutil.rmtree(self.spec.workdir, ignore_errors=True)
        if self.cg is not None:
            self.cg.remove()


class _Pool:
    """Sandboxes of one configuration started ahead, each used for one run only.

    Starts run on one long-lived daemon thread: bwrap's --die-with-parent and the Landlock
    helper's parent-death signal follow the thread that started them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ready: collections.deque[_Started] = collections.deque()
        self.starting = 0
        self.closed = False
        self.lock = threading.Lock()

    def take(self) -> _Started | None:
        with self.lock:
            while self.ready:
                started = self.ready.popleft()
                alive = started.popen is not None and started.popen.poll() is None
                if alive and time.monotonic() - started.at < _MAX_IDLE_S - 60:
                    return started
                _discard(started)
        return None

    def refill(self, start: Callable[[], _Started]) -> None:
        with self.lock:
            n = self.size - len(self.ready) - self.starting
            self.starting += max(0, n)
        for _ in range(n):
            _starter().put((self, start))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            while self.ready:
                _discard(self.ready.popleft())


_POOLS: dict[tuple, _Pool] = {}
_POOLS_LOCK = threading.Lock()
_STARTS: queue.Queue | None = None


def _pool(key: tuple, size: int) -> _Pool:
    """The pool of this configuration; the least recently used past ``_MAX_POOLS`` closes."""
    with _POOLS_LOCK:
        pool = _POOLS.pop(key, None) or _Pool(size)
        _POOLS[key] = pool  # dicts keep insertion order: the first is the least recently used
        pool.size = max(pool.size, size)
        stale = [_POOLS.pop(k) for k in list(_POOLS)[: max(0, len(_POOLS) - _MAX_POOLS)]]
    for old in stale:
        old.close()
    return pool


def _worker_queue(
    current: queue.Queue | None, loop: Callable[[queue.Queue], None], name: str
) -> queue.Queue:
    """``current``, or a new queue served by ``loop`` on a daemon thread (call under
    ``_POOLS_LOCK``)."""
    if current is not None:
        return current
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=loop, args=(jobs,), daemon=True, name=name).start()
    _register_atexit()
    return jobs


def _starter() -> queue.Queue:
    global _STARTS
    with _POOLS_LOCK:
        _STARTS = _worker_queue(_STARTS, _start_loop, "climbrl-sandbox-pool")
        return _STARTS


@functools.cache
def _register_atexit() -> None:
    atexit.register(_at_exit)


def _at_exit() -> None:
    close_pools()
    with _POOLS_LOCK:
        servers = list(_FORK_SERVERS.values())
        _FORK_SERVERS.clear()
    for server in servers:
        server.close()


def _start_loop(jobs: queue.Queue) -> None:
    while True:
        pool, start = jobs.get()
        started = None
        try:
            started = start()
        except Exception:  # noqa: BLE001 - a failed start shows again, cold, in the next run
            pass
        try:
            with pool.lock:
                pool.starting -= 1
                if started is not None and not pool.closed:
                    pool.ready.append(started)
                    started = None
            if started is not None:
                _discard(started)
        finally:
            jobs.task_done()


def _discard(started: _Started) -> None:
    started.stop()
    started.cleanup()


_REAPS: queue.Queue | None = None


def _reap(started: _Started) -> None:
    """Let a finished sandbox exit (bwrap tears its namespaces down, the helper exits) and free
    its cgroup and work folder, on a background thread: not on the run's path."""
    global _REAPS
    with _POOLS_LOCK:
        _REAPS = _worker_queue(_REAPS, _reap_loop, "climbrl-sandbox-reaper")
    _REAPS.put(started)


def _reap_loop(jobs: queue.Queue) -> None:
    while True:
        started = jobs.get()
        try:
            started.stop(grace_s=2.0)  # its processes are gone: this is its own exit
            started.cleanup()
        except Exception:  # noqa: BLE001 - one sandbox's clean-up must not stop the others
            pass
        finally:
            jobs.task_done()


def close_pools() -> None:
    """Stop every sandbox started ahead, and wait for the clean-up of finished ones (runs at
    exit; call it to free them sooner)."""
    if _STARTS is not None:
        _STARTS.join()  # the starts under way land in their pool, closed next
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()
    if _REAPS is not None:
        _REAPS.join()

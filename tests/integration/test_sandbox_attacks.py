"""Escape attempts against the sandbox, as root and as an ordinary user, on each backend.

Each attack runs in a real sandbox; the test then checks both the result and the host: a canary
file outside is unchanged, nothing new appeared in /tmp, a host listener got no connection, no
process of the sandbox is left (by pid namespace or by pid, never by name), and the limits held.
As root, the "ordinary user" runs drive the sandbox from a copy of the module under ``setpriv``
as uid 65534 (``climbrl-sandbox`` if scripts/install_sandbox_deps.sh made it).

    pytest tests/integration/test_sandbox_attacks.py -v
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest
from climbrl.envs import sandbox as sbmod

pytestmark = pytest.mark.integration

LIMITS = {
    "wall_s": 4.0,
    "cpu_s": 2,
    "memory_mb": 256,
    "nproc": 16,
    "output_bytes": 20_000,
    "disk_mb": 8,
    "nofile": 64,
}
ENVS_DIR = Path(sbmod.__file__).parent

ATTACKS: dict[str, str] = {
    "fork_hold": """
import os, time
n = 0
try:
    while n < 200:
        if os.fork() == 0:
            time.sleep(30); os._exit(0)
        n += 1
except OSError:
    pass
print("FORKED", n)
""",
    "fork_bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n",
    "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(10**7)); print('MB', 10 * len(x), flush=True)\n",
    "endless_loop": "while True: pass\n",
    "sleeper": "import time; time.sleep(600)\n",
    "detached": """
import os, time
try: print("PIDNS", os.readlink("/proc/self/ns/pid"))
except OSError: pass
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode()); time.sleep(600); os._exit(0)
    os._exit(0)
print("CHILD", os.read(r, 32).decode(), flush=True)
""",
    "huge_output": "import sys\nwhile True: sys.stdout.write('y' * 65536)\n",
    "fill_disk": """
n = 0
try:
    with open("fill.bin", "wb") as f:
        while n < 10**9:
            f.write(b"z" * 2**20); f.flush(); n += 2**20
except OSError as e:
    print("STOPPED", n, e.errno)
""",
    "network": """
import socket
for fam, addr in ((socket.AF_INET, ("127.0.0.1", PORT)), (socket.AF_INET6, ("::1", PORT))):
    try:
        s = socket.socket(fam); s.settimeout(1); s.connect(addr); print("CONNECTED", fam)
    except OSError as e:
        print("NET-BLOCKED", e.errno)
""",
    "read_secrets": """
for p in ("SECRET", "/etc/shadow", "/proc/1/environ", "/root/.bashrc"):
    try: print("READ", p, open(p).read())
    except OSError as e: print("DENIED", p, e.errno)
""",
    "write_outside": """
import os
for p in ("CANARY", "CANARYDIR/new", "/tmp/PWNED", "/work/PWNED"):
    try: open(p, "a").write("pwned"); print("WROTE", p)
    except OSError as e: print("DENIED", p, e.errno)
try: os.unlink("CANARY"); print("WROTE unlink")
except OSError as e: print("DENIED unlink", e.errno)
""",
    "syscalls": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
calls = {"ptrace": (101, 16, 1, 0, 0), "mount": (165, b"none", b"/tmp", b"tmpfs", 0, 0),
         "bpf": (321, 0, 0, 0), "io_uring_setup": (425, 8, 0), "unshare": (272, 0x10000000),
         "keyctl": (250, 0, 0, 0), "perf_event_open": (298, 0, 0, -1, -1, 0),
         "setns": (308, 0, 0), "kexec_load": (246, 0, 0, 0, 0)}
for name, (nr, *args) in calls.items():
    rc = libc.syscall(nr, *args)
    print("SYSCALL", name, rc, ctypes.get_errno())
""",
}


@dataclasses.dataclass
class Host:
    tmp: Path
    canary: Path
    secret: Path
    port: int
    listener: socket.socket
    token: str


@pytest.fixture
def host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    d = Path(tempfile.mkdtemp(prefix="climbrl-attack-"))
    d.chmod(0o777)  # writable by anyone: only the sandbox may stop a write
    canary = d / "canary.txt"
    canary.write_text("untouched\n")
    canary.chmod(0o666)
    secret = d / "secret.txt"
    secret.write_text("TOPSECRET-" + uuid.uuid4().hex)
    secret.chmod(0o644)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield Host(d, canary, secret, listener.getsockname()[1], listener, uuid.uuid4().hex[:8])
    listener.close()
    shutil.rmtree(d, ignore_errors=True)


def _code(name: str, h: Host) -> str:
    return (
        ATTACKS[name]
        .replace("SECRET", str(h.secret))
        .replace("CANARYDIR", str(h.tmp))
        .replace("CANARY", str(h.canary))
        .replace("PWNED", f"pwned-{h.token}")
        .replace("PORT", str(h.port))
    )


def _unprivileged_uid() -> int:
    try:
        return pwd.getpwnam("climbrl-sandbox").pw_uid
    except KeyError:
        return 65534


def _run_battery(backend: str, as_user: bool, h: Host) -> dict[str, dict]:
    names = list(ATTACKS)
    if not as_user:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                sb = sbmod.Sandbox(sbmod.SandboxLimits(**LIMITS), backend=backend)
            except sbmod.SandboxUnavailableError as e:
                pytest.skip(f"{backend} is unavailable here: {e}")
        return {n: dataclasses.asdict(sb.run_python_sync(_code(n, h))) for n in names}
    uid = _unprivileged_uid()
    pkg = Path(tempfile.mkdtemp(prefix="climbrl-attack-pkg-"))
    try:
        (pkg / "sbx").mkdir()
        for f in ("__init__.py", "sandbox.py", "_seccomp.py", "_landlock.py"):
            src = ENVS_DIR / f if f != "__init__.py" else None
            (pkg / "sbx" / f).write_text(src.read_text() if src else "")
        for p in (pkg, *pkg.rglob("*")):
            p.chmod(0o755)
        python = next((p for p in (sys.executable, "/usr/bin/python3") if _runs_as(uid, p)), None)
        if python is None:
            pytest.skip(f"no Python interpreter is runnable by uid {uid}")
        reqs = "".join(json.dumps({"code": _code(n, h), "limits": LIMITS}) + "\n" for n in names)
        cmd = [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--inh-caps=-all",
            python,
            "-W",
            "ignore",
            "-c",
            f"import sys; sys.path.insert(0, {str(pkg)!r}); "
            "from sbx.sandbox import main; main(sys.argv[1:])",
            "--jsonl",
            "--backend",
            backend,
        ]
        out = subprocess.run(cmd, input=reqs, capture_output=True, text=True, timeout=180, cwd="/")
        if "SandboxUnavailableError" in out.stderr:
            pytest.skip(f"{backend} is unavailable to uid {uid}: {out.stderr[-500:]}")
        assert out.returncode == 0, out.stderr[-2000:]
        return dict(zip(names, map(json.loads, out.stdout.splitlines()), strict=True))
    finally:
        shutil.rmtree(pkg, ignore_errors=True)


def _runs_as(uid: int, python: str) -> bool:
    check = "import os, sys; sys.exit(0 if os.access(sys.executable, os.X_OK) else 1)"
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, "-c", check]
    return subprocess.run(cmd, capture_output=True, cwd="/").returncode == 0


def _pids_in_pidns(ns: str) -> list[int]:
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/ns/pid") == ns:
                    found.append(int(p))
            except OSError:
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except OSError:
        return False


def _eventually(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _modes() -> list:
    """As root: the battery driven by root, and by an ordinary user. Otherwise: by ourselves."""
    users = (False, True) if os.geteuid() == 0 else (False,)
    return [
        pytest.param(b, u, id=f"{b}-{'user' if u else os.getenv('USER', 'self')}")
        for b in ("bwrap", "landlock")
        for u in users
    ]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers are x86_64's")
@pytest.mark.parametrize("backend,as_user", _modes())
def test_attack_battery_is_contained(backend: str, as_user: bool, host: Host) -> None:
    tmp_before = {n for n in os.listdir("/tmp") if n.startswith("climbrl-sandbox-")}
    res = _run_battery(backend, as_user, host)
    for name, r in res.items():
        assert r["error"] is None, (name, r)
        assert r["backend"] == backend

    # Limits: processes, memory, time, output, disk.
    forked = int(res["fork_hold"]["stdout"].split()[-1])
    # The landlock fallback counts per uid (base + nproc, measured at start): approximate.
    assert forked <= LIMITS["nproc"] - (backend == "bwrap"), res["fork_hold"]
    assert res["fork_bomb"]["killed_reason"] in ("timeout", "cpu"), res["fork_bomb"]
    mem = res["memory_bomb"]
    assert mem["killed_reason"] in ("memory", "timeout"), mem  # timeout: a loaded machine
    assert int(mem["stdout"].split()[-1]) <= LIMITS["memory_mb"] * 1.05, mem["stdout"][-100:]
    assert res["endless_loop"]["killed_reason"] in ("timeout", "cpu"), res["endless_loop"]
    assert res["sleeper"]["timed_out"] and res["sleeper"]["killed_reason"] == "timeout"
    assert res["sleeper"]["duration_s"] < LIMITS["wall_s"] + 10
    out = res["huge_output"]
    assert out["killed_reason"] == "output" and out["truncated"], out
    assert len(out["stdout"]) + len(out["stderr"]) <= LIMITS["output_bytes"]
    stopped = res["fill_disk"]["stdout"].split()
    assert stopped[0] == "STOPPED" and int(stopped[1]) <= LIMITS["disk_mb"] << 20, stopped

    # Network: blocked, and the host listener saw nothing.
    assert "CONNECTED" not in res["network"]["stdout"], res["network"]
    with pytest.raises(BlockingIOError):
        host.listener.accept()

    # Secrets and writes outside.
    sec = res["read_secrets"]["stdout"]
    assert host.secret.read_text() not in sec, sec
    for path in (host.secret, "/etc/shadow", "/root/.bashrc"):
        assert f"READ {path}" not in sec, sec
    try:  # the host's init; the sandbox's /proc shows its own
        host_env = Path("/proc/1/environ").read_text(errors="replace").strip("\0")
    except OSError:
        host_env = ""
    assert not host_env or host_env not in sec, sec
    wr = res["write_outside"]["stdout"]
    own_tmp = f"WROTE /tmp/pwned-{host.token}"  # bwrap's /tmp is the sandbox's own tmpfs
    assert "WROTE" not in wr.replace(own_tmp if backend == "bwrap" else "\0", ""), wr
    assert host.canary.read_text() == "untouched\n"
    assert sorted(os.listdir(host.tmp)) == ["canary.txt", "secret.txt"]
    assert not Path(f"/tmp/pwned-{host.token}").exists()
    assert not Path(f"/work/pwned-{host.token}").exists()

    # Dangerous system calls answer EPERM (1).
    calls = [line.split() for line in res["syscalls"]["stdout"].splitlines()]
    assert len(calls) == 9, res["syscalls"]
    for _, name, rc, err in calls:
        assert (int(rc), int(err)) == (-1, 1), (name, rc, err)

    # No process outlives its sandbox: by pid namespace (bwrap) or by pid (landlock).
    det = dict(line.split(maxsplit=1) for line in res["detached"]["stdout"].splitlines())
    assert "CHILD" in det, res["detached"]
    if backend == "bwrap":
        ns = det["PIDNS"]
        assert _eventually(lambda: not _pids_in_pidns(ns)), _pids_in_pidns(ns)
    else:
        pid = int(det["CHILD"])
        assert _eventually(lambda: not _alive(pid)), f"detached child {pid} survived"
    tmp_after = {n for n in os.listdir("/tmp") if n.startswith("climbrl-sandbox-")}
    assert tmp_after <= tmp_before, tmp_after - tmp_before

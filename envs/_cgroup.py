"""One cgroup per sandboxed run: the memory and the processes of all its processes together.

RLIMIT_AS bounds each process and RLIMIT_NPROC counts per user (namespace); neither stops a
payload that forks ``nproc`` children of ``memory_mb`` each. A cgroup does: ``memory.max`` (v2)
or ``memory.limit_in_bytes`` (v1) caps the memory of every process in it together, the tmpfs
pages they write included, and ``pids.max`` its processes and threads. The driver makes one per
run as a child of its own cgroup (v2; the ``memory`` and ``pids`` controllers must be enabled
in its ``cgroup.subtree_control``, as systemd's ``Delegate=yes`` does) or in the v1
``memory`` and ``pids`` hierarchies, and the sandbox's interpreter (or the Landlock helper)
moves itself in, through a ``cgroup.procs`` the driver opened, before the payload's code runs.
After the run, whatever is left in it is killed and the cgroup removed.

Where no cgroup can be made (no permission, no controller), ``EpisodeCgroup.create`` returns
None and the sandbox documents its fallback (``climbrl.envs.sandbox``).

Check this host: ``python -m climbrl.envs._cgroup``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
import uuid
from dataclasses import dataclass

ROOT = "/sys/fs/cgroup"


@dataclass
class EpisodeCgroup:
    """A cgroup made for one run (v2: one folder; v1: one in each of memory and pids)."""

    dirs: list[str]
    version: int

    @property
    def procs(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes 0 to, to move itself in."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    @classmethod
    def create(cls, memory_bytes: int, pids: int) -> EpisodeCgroup | None:
        """A new cgroup with these limits, or None where this host gives none."""
        parents = _parents()
        if parents is None:
            return None
        version, places = parents
        name = f"climbrl-sandbox-{uuid.uuid4().hex[:12]}"
        cg = cls([os.path.join(p, name) for p in places], version)
        try:
            for d in cg.dirs:
                os.mkdir(d)
            if version == 2:
                _write(cg.dirs[0], "memory.max", memory_bytes)
                _write(cg.dirs[0], "memory.swap.max", 0, missing_ok=True)
                _write(cg.dirs[0], "pids.max", pids)
            else:
                mem, pid = cg.dirs
                _write(mem, "memory.limit_in_bytes", memory_bytes)
                _write(mem, "memory.memsw.limit_in_bytes", memory_bytes, missing_ok=True)
                _write(pid, "pids.max", pids)
        except OSError:
            cg.remove()
            return None
        return cg

    def open_procs(self) -> list[int]:
        """Its ``cgroup.procs`` files opened for writing: a process that inherits one moves
        itself in by writing 0, with the permissions of this opener (Linux 5.16+ checks the
        open-time credentials)."""
        return [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in self.procs]

    def oom_kills(self) -> int:
        """How many processes the kernel killed in it for memory."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.dirs[0], name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def kill_all(self) -> None:
        """SIGKILL every process still in it."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(self.dirs[0], "cgroup.kill", 1)
                return
        for path in self.procs:
            with contextlib.suppress(OSError), open(path) as f:
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid), signal.SIGKILL)

    def remove(self) -> None:
        """Kill what is left, then remove the folders (a dying process delays it briefly)."""
        for d in self.dirs:
            for attempt in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    self.kill_all()
                    time.sleep(0.01 * min(attempt + 1, 10))


def _write(folder: str, name: str, value: int, missing_ok: bool = False) -> None:
    try:
        with open(os.path.join(folder, name), "w") as f:
            f.write(str(value))
    except FileNotFoundError:
        if not missing_ok:
            raise


def _own_paths() -> dict[str, str]:
    """This process's cgroup per controller ("" for v2), from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


@functools.cache
def _parents() -> tuple[int, list[str]] | None:
    """Where this process may make child cgroups with memory and pids limits, once probed."""
    try:
        own = _own_paths()
    except OSError:
        return None
    candidates: list[tuple[int, list[str]]] = []
    if os.path.exists(os.path.join(ROOT, "cgroup.controllers")) and "" in own:
        candidates.append((2, [os.path.join(ROOT, own[""].lstrip("/"))]))
    if "memory" in own and "pids" in own:
        mem = os.path.join(ROOT, "memory", own["memory"].lstrip("/"))
        pid = os.path.join(ROOT, "pids", own["pids"].lstrip("/"))
        candidates.append((1, [mem, pid]))
    for version, places in candidates:
        needed = ("memory.max", "pids.max") if version == 2 else ("memory.limit_in_bytes",)
        probe = EpisodeCgroup(
            [os.path.join(p, f"climbrl-probe-{os.getpid()}") for p in places], version
        )
        try:
            for d in probe.dirs:
                os.mkdir(d)
            if all(os.path.exists(os.path.join(probe.dirs[0], n)) for n in needed) and (
                version == 2 or os.path.exists(os.path.join(probe.dirs[1], "pids.max"))
            ):
                return version, places
        except OSError:
            pass
        finally:
            probe.remove()
    return None


def available() -> str | None:
    """Where per-run cgroups are made ("v2 /sys/fs/cgroup/..."), or None."""
    found = _parents()
    return None if found is None else f"v{found[0]} " + " ".join(found[1])


if __name__ == "__main__":
    print(available() or "no cgroup for sandboxed runs here: see climbrl.envs.sandbox")

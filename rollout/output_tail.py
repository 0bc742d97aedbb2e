"""The last lines this process and its children print, kept to name an engine's death.

vLLM's engine core and worker run in child processes that inherit file descriptors 1 and 2
(vLLM logs to stdout, Python tracebacks go to stderr). When they die, the frontend only raises
``EngineDeadError("EngineCore encountered an issue. See stack trace (above) ...")``: the cause
(``RuntimeError: ...``) exists only in the children's output. ``OutputTail`` puts a pipe in
place of each descriptor before the engine starts; a thread copies every byte to where it went
before, unchanged, and keeps the last lines, so that the rollout server can quote the cause in
its own last log line.

    tail = OutputTail.install()
    ...
    tail.last_exception()   # "RuntimeError: CPU Generator does not use offset", or None
    tail.close()            # descriptors restored, what is left in the pipes passed through
"""

from __future__ import annotations

import collections
import os
import re
import select
import sys
import threading

# "RuntimeError: ...", "torch.OutOfMemoryError: ...", after any log prefix of vLLM's
_EXC_LINE = re.compile(r"(?:^|\s)((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)\b:?.*)$")
_EXC_NAME = re.compile(r"[\w.]+")
# vLLM's own wrappers, which say nothing of the cause
_GENERIC = ("EngineDeadError", "EngineGenerateError")
# what vLLM's frontend logs when the engine-core process vanishes without a word (kill -9, OOM)
_VANISHED = "exited unexpectedly"


class OutputTail:
    def __init__(self, routes: dict[int, tuple[int, int]], max_lines: int) -> None:
        """``routes``: read end of a pipe -> (the descriptor it replaced, a copy of the
        original)."""
        self._routes = routes
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._partial = {r: b"" for r in routes}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="climbrl-output-tail", daemon=True)
        self._thread.start()

    @classmethod
    def install(cls, fds: tuple[int, ...] = (1, 2), max_lines: int = 400) -> OutputTail:
        """Route ``fds`` through the tail (call before the engine's processes start)."""
        sys.stdout.flush()
        sys.stderr.flush()
        routes = {}
        for fd in fds:
            orig = os.dup(fd)
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            routes[r] = (fd, orig)
        return cls(routes, max_lines)

    def _pump(self) -> None:
        open_fds = list(self._routes)
        while open_fds:
            ready, _, _ = select.select(open_fds, [], [], 0.1)
            if not ready and self._closing.is_set():
                return  # restored, and nothing more came within 0.1 s
            for r in ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    open_fds.remove(r)
                    continue
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._routes[r][1], view) :]
                with self._lock:
                    *done, rest = (self._partial[r] + chunk).split(b"\n")
                    self._partial[r] = rest[-8192:]
                    self._lines.extend(x.decode(errors="replace") for x in done)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines) + [
                p.decode(errors="replace") for p in self._partial.values() if p
            ]

    def last_exception(self) -> str | None:
        """The last line that names an exception other than vLLM's generic wrappers, without
        the log prefix; else vLLM's note that the engine-core process exited unexpectedly (it
        was killed, by a signal or the OOM killer, before it could say why); None if neither."""
        lines = self.lines()
        for line in reversed(lines):
            m = _EXC_LINE.search(line.rstrip())
            if m is None:
                continue
            name = _EXC_NAME.match(m.group(1))
            assert name is not None  # group 1 starts with a letter
            if name.group(0).rsplit(".", 1)[-1] not in _GENERIC:
                return m.group(1).strip()
        for line in reversed(lines):
            if _VANISHED in line:
                return line.rsplit("] ", 1)[-1].strip() + " (no error message: killed?)"
        return None

    def close(self) -> None:
        """Put the original descriptors back and pass through what is still in the pipes."""
        if self._closing.is_set():
            return
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, orig in self._routes.values():
            os.dup2(orig, fd)
        self._closing.set()
        self._thread.join(timeout=2.0)

"""What the learner's hub admits from its socket, one message at a time.

``Gate.admit(sid, frames, now)`` decodes a message and checks it names its sender and this run,
runs the ``Hello`` handshake against the ``PeerTable`` (welcome, repeat, or refuse a server id
that a live process holds), and notes everything else in the table. It answers what to send back
and whether the training thread sees the message; it touches no socket, so a test drives it
with encoded frames. Rejected messages and refused ``Hello``s are counted and logged at most
once per ``LOG_EVERY_S`` per peer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from climbrl.learner.peers import PeerTable
from climbrl.wire import (
    HELLO_REFUSED,
    LEARNER_ACCEPTS,
    Codec,
    Control,
    Error,
    Heartbeat,
    Hello,
    LogLimiter,
    WireError,
)

log = logging.getLogger("climbrl.learner.hub")
LOG_EVERY_S = 10.0


@dataclass
class Admitted:
    """What to do with one inbound message."""

    reply: Any = None
    """A message to send back to the sender (``welcome``, or the refusal of a ``Hello``)."""
    deliver: tuple[Any, list[Any]] | None = None
    """(message, tensor frames) for the training thread, or None."""


class Gate:
    """Admits inbound messages of the run ``run_id`` and keeps ``peers`` up to date."""

    def __init__(self, peers: PeerTable, run_id: str) -> None:
        self.peers = peers
        self.run_id = run_id
        self.codec = Codec(LEARNER_ACCEPTS)
        self.rejected = 0  # frames dropped: malformed, foreign, unknown peer, wrong run
        self.refused_hellos = 0
        self._limit = LogLimiter(log, LOG_EVERY_S)

    def admit(self, sid: str, frames: list[Any], now: float) -> Admitted:
        """Take the body ``frames`` that ``sid`` sent at ``now`` (time.monotonic())."""
        try:
            msg, tensors = self.codec.decode(frames)
        except WireError as e:
            return self._reject(sid, str(e))
        named = getattr(msg, "server_id", sid)
        if named != sid:
            return self._reject(
                sid, f"{type(msg).__name__} names server {named[:64]!r}, not its sender"
            )
        if msg.run_id != self.run_id and not (isinstance(msg, Hello) and msg.run_id == ""):
            return self._reject(
                sid,
                f"{type(msg).__name__} of run {msg.run_id[:64]!r}, not of this run {self.run_id!r}",
            )
        if isinstance(msg, Hello):
            verdict, st = self.peers.hello(sid, msg, now)
            if verdict == "refused":
                assert st is not None
                self.refused_hellos += 1
                self._limit(
                    logging.WARNING,
                    f"hello:{sid[:64]}",
                    "refused a Hello from %r (pid %d on %s): server %r is alive (pid %d on %s)",
                    sid[:64],
                    msg.pid,
                    msg.hostname[:64],
                    sid[:64],
                    st.pid,
                    st.hostname,
                )
                return Admitted(
                    reply=Error(
                        run_id=self.run_id,
                        origin="learner",
                        code=HELLO_REFUSED,
                        message=f"server id {sid!r} is alive (pid {st.pid} on {st.hostname}); "
                        f"retry after it has been silent for {self.peers.dead_after_s:g}s",
                    )
                )
            welcome = Control(command="welcome", run_id=self.run_id)
            return Admitted(welcome, None if verdict == "again" else (msg, tensors))
        if not self.peers.seen(sid, msg, now):
            return self._reject(sid, f"{type(msg).__name__} from a server that has not said Hello")
        if not isinstance(msg, Heartbeat) or msg.engine_error:  # a dead engine: the learner acts
            return Admitted(deliver=(msg, tensors))
        return Admitted()

    def _reject(self, sid: str, why: str) -> Admitted:
        self.rejected += 1
        self._limit(
            logging.ERROR, f"reject:{sid[:64]}", "rejected a message from %r: %s", sid[:64], why
        )
        return Admitted()

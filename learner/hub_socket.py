"""The learner hub's socket thread: the only code that touches the ROUTER.

It sends what the training thread queued on the inproc outbox, reads the ROUTER into the bounded
inbox through the ``Gate``, and pings every live server each ``heartbeat_s``. When the inbox is
full it stops reading the socket, so ZeroMQ holds back the senders (up to ``ZMQ_RCVHWM``
messages per peer). A peer that is gone (``ROUTER_MANDATORY``) is logged once, not raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import zmq

from climbrl.learner.gate import LOG_EVERY_S, Gate
from climbrl.wire import Codec, Control, LogLimiter

log = logging.getLogger("climbrl.learner.hub")


class HubSocket:
    """Runs the hub's socket loop on a daemon thread, from ``start()`` until ``stop``."""

    def __init__(
        self,
        router: zmq.Socket,
        outbox: zmq.Socket,
        inbox: queue.Queue[tuple[str, Any, list[Any], float]],
        gate: Gate,
        heartbeat_s: float,
    ) -> None:
        """``router`` and ``outbox`` (the PULL end of the training thread's PUSH) belong to the
        thread from ``start()`` on, which closes them when it ends."""
        self.router = router
        self.outbox = outbox
        self.inbox = inbox
        self.gate = gate
        self.heartbeat_s = heartbeat_s
        self.inbox_full = 0  # times the thread stopped reading because the inbox was full
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="climbrl-hub")
        self._unreachable: set[str] = set()
        self._limit = LogLimiter(log, LOG_EVERY_S)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        next_ping = time.monotonic()
        reading_paused = False
        try:
            while not self.stop.is_set():
                # a full inbox: leave the socket unread, so ZeroMQ holds back the senders
                full = self.inbox.full()
                if full != reading_paused:
                    reading_paused = full
                    if full:
                        self.inbox_full += 1
                        self._limit(
                            logging.WARNING,
                            "inbox",
                            "learner inbox full (%d "
                            "messages): not reading the socket until the training "
                            "thread catches up",
                            self.inbox.maxsize,
                        )
                    poller.modify(self.router, 0 if full else zmq.POLLIN)
                events = dict(poller.poll(timeout=int(self.heartbeat_s * 1000 / 2)))
                if self.outbox in events:
                    while True:
                        try:
                            frames = self.outbox.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._route(frames)
                if self.router in events:
                    while not self.inbox.full():
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                if time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + self.heartbeat_s
                    for sid in self.gate.peers.alive():
                        ping = Control(command="ping", run_id=self.gate.run_id)
                        self._route([sid.encode(), *Codec.encode(ping)])
        finally:
            self.outbox.close(linger=0)
            self.router.close(linger=0)

    def _on_frames(self, frames: list[Any]) -> None:
        sid = frames[0].bytes.decode(errors="replace")
        now = time.monotonic()
        admitted = self.gate.admit(sid, frames[1:], now)
        if admitted.reply is not None:
            self._route([sid.encode(), *Codec.encode(admitted.reply)])
        if admitted.deliver is not None:
            msg, tensors = admitted.deliver
            self.inbox.put((sid, msg, tensors, now))

    def _route(self, frames: list[Any]) -> None:
        sid = bytes(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0]).decode()
        try:
            self.router.send_multipart(frames, copy=False)
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY): report, don't crash
            if sid not in self._unreachable:
                self._unreachable.add(sid)
                log.warning("cannot send to %s: %s", sid, e)
            return
        self._unreachable.discard(sid)

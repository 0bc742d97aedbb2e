"""The rollout server's socket to the learner: a ZeroMQ DEALER and nothing else.

``LearnerClient`` connects (CURVE or PLAIN, ``climbrl.wirekeys``), sends with a bound
(``wire.send_timeout_s``: a learner that stops reading fills ZeroMQ's queue up to its high-water
mark, and a send past it would wait forever), receives and checks each message's session (the
learner's welcome gives the run id; until then the server repeats its Hello and takes no other
message), and beats: a heartbeat every ``wire.heartbeat_s``, and a stop once the learner has
been silent for ``wire.dead_after_s``. What a message means is the server's business: the
client hands each one to a callback, and asks the server what each beat says.

Tests: ``pytest tests/unit/test_auth_wire.py tests/unit/test_failure_paths_waits.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from climbrl.config import WireCfg
from climbrl.wire import (
    HELLO_REFUSED,
    ROLLOUT_ACCEPTS,
    Codec,
    Control,
    Error,
    LogLimiter,
    WireError,
    term_context,
)

log = logging.getLogger("climbrl.rollout")

# what the client hands each checked message to: (message, tensor frames, arrival time.time())
Handler = Callable[[Any, list[Any], float], Awaitable[None]]


class LearnerStuck(Exception):
    """A send to the learner waited past ``wire.send_timeout_s``: the server stops."""


class LearnerClient:
    """The DEALER socket to the learner at ``endpoint``, with routing id ``server_id``.
    ``stop`` is the server's: set here when the learner goes silent, stops reading, or the
    socket is closed."""

    def __init__(self, wire: WireCfg, endpoint: str, server_id: str, stop: asyncio.Event):
        self.wire = wire
        self.endpoint = endpoint
        self.server_id = server_id
        self.stop = stop
        self.codec = Codec(ROLLOUT_ACCEPTS)
        self.send_lock = asyncio.Lock()
        self.ctx: zmq.asyncio.Context | None = None
        self.sock: zmq.asyncio.Socket | None = None
        self.last_msg = time.monotonic()  # when the learner was last heard from
        self.learner_stuck: str | None = None  # why, once a send to the learner timed out
        # the learner's run id, from its welcome (climbrl.wire)
        self.run_id = ""
        self.welcomed = asyncio.Event()
        self._limit = LogLimiter(log)

    def connect(self, keys_dir: Path) -> None:
        """Open the socket with the run's credentials (``CLIMBRL_WIRE_KEYS``, else the run
        folder ``keys_dir``) and connect it."""
        from climbrl.wirekeys import ENV_VAR, curve_enabled, rollout_keys, secure_client

        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.server_id.encode())
        self.sock.setsockopt(zmq.RCVHWM, self.wire.recv_hwm)
        keys = rollout_keys(self.wire, keys_dir)
        curve = curve_enabled(self.wire)
        secure_client(self.sock, keys, curve)
        log.info(
            "wire: %s client of the learner (credentials from %s)",
            "CURVE" if curve else "PLAIN",
            ENV_VAR if os.environ.get(ENV_VAR) else "the run folder",
        )
        self.sock.connect(self.endpoint)
        self.last_msg = time.monotonic()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        if self.ctx is not None:
            term_context(self.ctx, 5.0)

    async def send(self, msg: Any, tensors: list[Any] | None = None) -> None:
        """Send to the learner, waiting at most ``wire.send_timeout_s`` (the wait for the
        send lock included). Past the limit the server stops (``LearnerStuck``)."""
        msg.run_id = self.run_id
        if self.learner_stuck is not None:
            raise LearnerStuck(self.learner_stuck)
        frames = Codec.encode(msg, tensors)

        sock = self.sock
        assert sock is not None, "connect() first"

        async def locked() -> None:
            async with self.send_lock:
                await sock.send_multipart(frames, copy=False)

        t = self.wire.send_timeout_s
        try:
            await asyncio.wait_for(locked(), timeout=t)
        except TimeoutError:
            if self.learner_stuck is None:
                self.learner_stuck = (
                    f"a send to the learner waited {t:g}s (wire.send_timeout_s): it stopped reading"
                )
                log.error("%s; this server stops", self.learner_stuck)
            self.stop.set()
            raise LearnerStuck(self.learner_stuck) from None

    async def heartbeat_loop(self, beat: Callable[[], Awaitable[None]]) -> None:
        """Call ``beat`` (which sends this beat's message) every ``wire.heartbeat_s`` until
        the stop; stop once the learner has been silent for ``wire.dead_after_s``."""
        w = self.wire
        while not self.stop.is_set():
            await beat()
            if time.monotonic() - self.last_msg > w.dead_after_s:
                log.error("learner silent for %.0fs: shutting down", w.dead_after_s)
                self.stop.set()
                return
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=w.heartbeat_s)
            except TimeoutError:
                pass

    async def recv_loop(self, handle: Handler) -> None:
        """Receive until the stop; hand each message of this server's session to ``handle``.
        A malformed or foreign message is answered with a ``bad_message`` error."""
        sock = self.sock
        assert sock is not None, "connect() first"
        poll_s = self.wire.heartbeat_s
        while not self.stop.is_set():
            if not await sock.poll(timeout=int(poll_s * 1000)):
                continue  # timeout: the heartbeat loop decides whether the learner is dead
            frames = await sock.recv_multipart(copy=False)
            arrived = time.time()
            self.last_msg = time.monotonic()
            try:
                msg, tensor_frames = self.codec.decode(frames)
                msg = self.check_session(msg)
            except WireError as e:
                self._limit(logging.ERROR, "bad", "rejected a message from the learner: %s", e)
                await self.send(Error(origin=self.server_id, code="bad_message", message=str(e)))
                continue
            if msg is not None:
                await handle(msg, tensor_frames, arrived)

    def check_session(self, msg: Any) -> Any:
        """The learner's welcome (its run id), and every later message of that run; None for
        a message that needs no handling. Raises WireError for a message of another run."""
        if isinstance(msg, Control) and msg.command == "welcome":
            if not self.welcomed.is_set():
                self.run_id = msg.run_id
                self.welcomed.set()
                log.info("rollout %s welcomed by the learner (run %s)", self.server_id, msg.run_id)
            elif msg.run_id != self.run_id:
                raise WireError(
                    f"a welcome of run {msg.run_id[:64]!r}, not of this server's "
                    f"run {self.run_id!r}"
                )
            return None
        if not self.welcomed.is_set():
            if isinstance(msg, Error) and msg.code == HELLO_REFUSED:
                self._limit(
                    logging.WARNING,
                    "hello",
                    "the learner refused this server's Hello: %s",
                    msg.message,
                )
            else:
                self._limit(
                    logging.WARNING,
                    "early",
                    "%s before the learner's welcome ignored",
                    type(msg).__name__,
                )
            return None
        if msg.run_id != self.run_id:
            raise WireError(
                f"{type(msg).__name__} of run {msg.run_id[:64]!r}, not of this "
                f"server's run {self.run_id!r}"
            )
        return msg

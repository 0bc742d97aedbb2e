"""The learner's socket: a ROUTER that rollout servers connect to, run on its own thread.

The training thread never touches ZeroMQ. It calls ``send`` (which hands frames to the socket
thread over an inproc PUSH/PULL pair, so encoding overlaps compute) and ``recv`` (a queue with
a timeout). ``LearnerHub`` builds the sockets and offers that API; the work is split by job:

- ``hub_socket.HubSocket``: the socket thread (outbox, inbox bounding, pings).
- ``gate.Gate``: admission of each inbound message and the ``Hello`` handshake.
- ``peers.PeerTable``: every server's last heartbeat and liveness.

Every peer is authenticated before ZeroMQ attaches its connection (``climbrl.wirekeys``: CURVE
off loopback, the run's secret over PLAIN on loopback), so only a process holding the run's
credentials can take a server id over (``ROUTER_HANDOVER``, for a restarted server); a
``Hello`` for a server id the hub still counts alive is refused with an ``Error``
(``hello_refused``), and the newcomer repeats it until the old process counts as dead, while
the old connection's messages arrive under a new routing id and are rejected. A ``Hello``
repeated by the same process (pid, host) is answered again. The hub answers an accepted ``Hello``
with ``Control("welcome")``, which carries the run's id; every later message must carry it
too. Inbound frames are capped (``ZMQ_MAXMSGSIZE``: a bigger one drops its connection), queued
up to ``ZMQ_RCVHWM`` messages per peer, and the inbox the training thread reads is bounded:
when it is full the hub stops reading the socket, so ZeroMQ holds back the senders. Rejected
messages and refused ``Hello``s are counted and logged at most once per ``LOG_EVERY_S`` per
peer.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from typing import Any

import zmq

from climbrl.learner.gate import LOG_EVERY_S, Gate
from climbrl.learner.hub_socket import HubSocket
from climbrl.learner.peers import PeerTable, ServerState
from climbrl.wire import Codec, term_context

__all__ = ["LOG_EVERY_S", "HubError", "LearnerHub", "ServerState"]

log = logging.getLogger("climbrl.learner.hub")


class HubError(RuntimeError):
    """The hub cannot do its job (its socket thread stopped taking messages)."""


class LearnerHub:
    """The training thread's side of the learner's socket: send, receive, and who is alive."""

    def __init__(
        self,
        host: str,
        port: int,
        heartbeat_s: float = 1.0,
        run_id: str = "",
        keys: Any = None,
        curve: bool | None = None,
        dead_after_s: float = 10.0,
        max_message_mb: float = 256.0,
        recv_hwm: int = 1000,
        inbox_max: int = 10_000,
        send_timeout_s: float = 60.0,
    ) -> None:
        """``keys``: the run's ``RunKeys`` (fresh ones when None: peers then need
        ``client_env()``); ``curve``: CURVE instead of PLAIN (default: off loopback)."""
        from climbrl.wirekeys import RunKeys, is_loopback, secure_server

        if max_message_mb <= 0 or recv_hwm < 1 or inbox_max < 1:
            raise ValueError(
                "wire.max_message_mb must be > 0 and wire.recv_hwm and wire.inbox_max at least 1"
            )
        self.keys = keys if keys is not None else RunKeys.generate()
        self.curve = (not is_loopback(host)) if curve is None else curve
        self.ctx = zmq.Context()
        router = self.ctx.socket(zmq.ROUTER)
        self._auth = secure_server(self.ctx, router, self.keys, self.curve)
        log.info(
            "wire: %s",
            "CURVE on, only peers with this run's client key are admitted"
            if self.curve
            else "PLAIN, only peers with this run's secret are admitted",
        )
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a restarted server reconnects under its old id: the new (authenticated) connection
        # takes it, and its Hello is accepted once the old process counts as dead
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        router.setsockopt(zmq.MAXMSGSIZE, int(max_message_mb * 2**20))
        router.setsockopt(zmq.RCVHWM, recv_hwm)
        # ZMTP pings drop a connection whose peer vanished without closing it (a dead node),
        # so that its server id is free for the restarted server
        router.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat_s * 1000)))
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(dead_after_s * 1000)))
        if port == 0:
            self.port = router.bind_to_random_port(f"tcp://{host}")
        else:
            router.bind(f"tcp://{host}:{port}")
            self.port = port
        self.endpoint = f"tcp://{host}:{self.port}"
        outbox_addr = f"inproc://climbrl-outbox-{id(self)}"
        pull = self.ctx.socket(zmq.PULL)
        pull.bind(outbox_addr)
        self._push = self.ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        # a socket thread that stops draining the outbox fills it to its high-water mark: a
        # send then fails after this long instead of blocking the training thread for good
        self._push.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
        self.send_timeout_s = send_timeout_s
        self._push.connect(outbox_addr)
        self._push_lock = threading.Lock()
        self.inbox: queue.Queue[tuple[str, Any, list[Any], float]] = queue.Queue(inbox_max)
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.run_id = run_id
        self.peers = PeerTable(dead_after_s)
        self.gate = Gate(self.peers, run_id)
        self._io = HubSocket(router, pull, self.inbox, self.gate, heartbeat_s)
        self._stop, self._thread = self._io.stop, self._io.thread
        self._io.start()
        self._finalizer = weakref.finalize(self, LearnerHub._cleanup, self._stop, self._thread)

    @classmethod
    def from_config(cls, wire: Any, run_id: str, keys: Any) -> LearnerHub:
        """The hub of a run, from its ``WireCfg``."""
        from climbrl.wirekeys import curve_enabled

        return cls(
            wire.host,
            wire.port,
            wire.heartbeat_s,
            run_id,
            keys=keys,
            curve=curve_enabled(wire),
            dead_after_s=wire.dead_after_s,
            max_message_mb=wire.max_message_mb,
            recv_hwm=wire.recv_hwm,
            inbox_max=wire.inbox_max,
            send_timeout_s=wire.send_timeout_s,
        )

    def client_env(self) -> dict[str, str]:
        """The environment a rollout server process needs to connect here."""
        from climbrl.wirekeys import ENV_VAR

        return {ENV_VAR: self.keys.client_json()}

    @staticmethod
    def _cleanup(stop: threading.Event, thread: threading.Thread) -> None:
        stop.set()
        thread.join(timeout=5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._push.close(linger=0)
        self._auth.stop()
        term_context(self.ctx, 5.0)  # the socket thread's sockets stay open if it did not stop

    # ----------------------------------------------------------- counters and peers

    @property
    def servers(self) -> dict[str, ServerState]:
        """Every server that said ``Hello``, by id (read under ``lock``)."""
        return self.peers.servers

    @property
    def lock(self) -> threading.Lock:
        return self.peers.lock

    @property
    def rejected(self) -> int:
        """Frames dropped: malformed, foreign, unknown peer, wrong run."""
        return self.gate.rejected

    @property
    def refused_hellos(self) -> int:
        return self.gate.refused_hellos

    @property
    def inbox_full(self) -> int:
        """Times the socket thread stopped reading because the inbox was full."""
        return self._io.inbox_full

    # ----------------------------------------------------------- training-thread API

    def send(self, server_id: str, msg: Any, tensors: list[Any] | None = None) -> None:
        msg.run_id = self.run_id
        self.send_frames(server_id, Codec.encode(msg, tensors))

    def send_frames(self, server_id: str, frames: list[Any]) -> None:
        """Queue already-encoded frames for ``server_id``. Only the socket thread touches the
        ROUTER (ZeroMQ sockets are not thread-safe), so every send goes through the outbox."""
        with self._push_lock:
            try:
                self._push.send_multipart([server_id.encode(), *frames], copy=False)
            except zmq.Again:
                raise HubError(
                    f"the learner's socket thread took no message for {self.send_timeout_s:g}s "
                    f"(wire.send_timeout_s; thread {'alive' if self._thread.is_alive() else 'dead'})"
                    ": the learner cannot send to its rollout servers"
                ) from None

    def recv(self, timeout: float) -> tuple[str, Any, list[Any], float] | None:
        """Next (server_id, message, tensor frames, arrival time.monotonic()), or None after
        ``timeout`` seconds."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def alive_servers(self) -> list[str]:
        return self.peers.alive()

    def take_loop_lag(self) -> dict[str, float]:
        """Each live server's worst event-loop lag (seconds) since the previous call."""
        return {s: lag for s, (lag, _) in self.take_loop_lag_where().items()}

    def take_loop_lag_where(self) -> dict[str, tuple[float, str]]:
        """Each live server's worst event-loop lag (seconds) since the previous call, and what
        its loop was running then ("" if not caught; climbrl.rollout.loop_lag)."""
        return self.peers.take_loop_lag_where()

    def asleep_servers(self) -> list[str]:
        """Live servers whose engine is in vLLM's sleep mode."""
        return self.peers.asleep()

    def order_servers(self) -> list[str]:
        """Live servers that take work orders (a server pinned for serving does not)."""
        return self.peers.taking_orders()

    def check_dead(self, dead_after_s: float) -> list[str]:
        """Mark servers silent for longer than ``dead_after_s`` dead; return the new deaths."""
        return self.peers.check_dead(dead_after_s)

"""The learner's socket: a ROUTER that rollout servers connect to, run on its own thread.

The training thread never touches ZeroMQ. It calls ``send`` (which hands frames to the hub
over an inproc PUSH/PULL pair, so encoding overlaps compute) and ``recv`` (a queue with a
timeout). The hub thread tracks every server's last heartbeat, pings servers so they can tell
the learner is alive, and logs and drops malformed or foreign frames without stopping.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import zmq

from climbrl.wire import LEARNER_ACCEPTS, Codec, Control, Heartbeat, Hello, WeightAck, WireError

log = logging.getLogger("climbrl.learner.hub")


@dataclass
class ServerState:
    server_id: str
    pid: int
    hostname: str
    version: int
    last_seen: float
    alive: bool = True
    accepting_orders: bool = True
    inflight_orders: set[str] = field(default_factory=set)
    loop_lag_max_s: float = 0.0  # worst event-loop lag reported since take_loop_lag()


class LearnerHub:
    def __init__(self, host: str, port: int, heartbeat_s: float = 1.0, run_id: str = "",
                 keys: Any = None):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self._auth = None
        if keys is not None:  # CURVE: only peers holding the run's client key get through
            from climbrl.wirekeys import secure_server

            self._auth = secure_server(self.ctx, self.router, keys)
            log.info("wire: CURVE on, only peers with this run's client key are admitted")
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a restarted rollout server reconnects under its old id: the new connection takes it
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if port == 0:
            self.port = self.router.bind_to_random_port(f"tcp://{host}")
        else:
            self.router.bind(f"tcp://{host}:{port}")
            self.port = port
        self.endpoint = f"tcp://{host}:{self.port}"
        self._outbox_addr = f"inproc://climbrl-outbox-{id(self)}"
        pull = self.ctx.socket(zmq.PULL)
        pull.bind(self._outbox_addr)
        self._push = self.ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self._outbox_addr)
        self._push_lock = threading.Lock()
        self.inbox: queue.Queue[tuple[str, Any, list[Any], float]] = queue.Queue()
        self.codec = Codec(LEARNER_ACCEPTS)
        self.servers: dict[str, ServerState] = {}
        self.lock = threading.Lock()
        self.rejected = 0
        self._unreachable: set[str] = set()
        self.heartbeat_s = heartbeat_s
        self.run_id = run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(pull,), daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, LearnerHub._cleanup, self._stop, self._thread)

    @staticmethod
    def _cleanup(stop: threading.Event, thread: threading.Thread) -> None:
        stop.set()
        thread.join(timeout=5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._push.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

    # ----------------------------------------------------------- training-thread API

    def send(self, server_id: str, msg: Any, tensors: list[Any] | None = None) -> None:
        msg.run_id = self.run_id
        self.send_frames(server_id, Codec.encode(msg, tensors))

    def send_frames(self, server_id: str, frames: list[Any]) -> None:
        """Queue already-encoded frames for ``server_id``. Only the hub thread touches the
        ROUTER (ZeroMQ sockets are not thread-safe), so every send goes through the outbox."""
        with self._push_lock:
            self._push.send_multipart([server_id.encode(), *frames], copy=False)

    def recv(self, timeout: float) -> tuple[str, Any, list[Any], float] | None:
        """Next (server_id, message, tensor frames, arrival time.monotonic()), or None after
        ``timeout`` seconds."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def alive_servers(self) -> list[str]:
        with self.lock:
            return [s for s, st in self.servers.items() if st.alive]

    def take_loop_lag(self) -> dict[str, float]:
        """Each live server's worst event-loop lag (seconds) since the previous call."""
        with self.lock:
            out = {s: st.loop_lag_max_s for s, st in self.servers.items() if st.alive}
            for st in self.servers.values():
                st.loop_lag_max_s = 0.0
        return out

    def order_servers(self) -> list[str]:
        """Live servers that take work orders (a server pinned for serving does not)."""
        with self.lock:
            return [s for s, st in self.servers.items() if st.alive and st.accepting_orders]

    def check_dead(self, dead_after_s: float) -> list[str]:
        """Mark servers silent for longer than ``dead_after_s`` dead; return the new deaths."""
        now = time.monotonic()
        died = []
        with self.lock:
            for st in self.servers.values():
                if st.alive and now - st.last_seen > dead_after_s:
                    st.alive = False
                    died.append(st.server_id)
        return died

    # ----------------------------------------------------------- hub thread

    def _loop(self, pull: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        next_ping = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(timeout=int(self.heartbeat_s * 1000 / 2)))
                if pull in events:
                    while True:
                        try:
                            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._route(frames)
                if self.router in events:
                    while True:
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                if time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + self.heartbeat_s
                    for sid in self.alive_servers():
                        self._route([sid.encode(), *Codec.encode(Control(command="ping"))])
        finally:
            pull.close(linger=0)
            self.router.close(linger=0)

    def _route(self, frames: list[Any]) -> None:
        try:
            self.router.send_multipart(frames, copy=False)
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY): report, don't crash
            sid = bytes(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0]).decode()
            if sid not in self._unreachable:
                self._unreachable.add(sid)
                log.warning("cannot send to %s: %s", sid, e)
            return
        self._unreachable.discard(frames[0].bytes.decode() if hasattr(frames[0], "bytes")
                                  else bytes(frames[0]).decode())

    def _on_frames(self, frames: list[Any]) -> None:
        sid = frames[0].bytes.decode(errors="replace")
        try:
            msg, tensors = self.codec.decode(frames[1:])
        except WireError as e:
            self.rejected += 1
            log.error("rejected a message from %r: %s", sid, e)
            return
        now = time.monotonic()
        with self.lock:
            st = self.servers.get(sid)
            if isinstance(msg, Hello):
                self.servers[sid] = ServerState(sid, msg.pid, msg.hostname, msg.policy_version, now)
            elif st is not None:
                st.last_seen = now
                if isinstance(msg, Heartbeat):
                    st.version = msg.policy_version
                    st.accepting_orders = msg.accepting_orders
                    st.loop_lag_max_s = max(st.loop_lag_max_s, msg.loop_lag_max_s)
                elif isinstance(msg, WeightAck) and msg.ok:
                    st.version = msg.version
        if st is None and not isinstance(msg, Hello):
            log.warning("message from unknown server %r ignored (%s)", sid, type(msg).__name__)
            return
        if not isinstance(msg, Heartbeat):
            self.inbox.put((sid, msg, tensors, now))

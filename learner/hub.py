"""The learner's socket: a ROUTER that rollout servers connect to, run on its own thread.

The training thread never touches ZeroMQ. It calls ``send`` (which hands frames to the hub
over an inproc PUSH/PULL pair, so encoding overlaps compute) and ``recv`` (a queue with a
timeout). The hub thread tracks every server's last heartbeat, pings servers so they can tell
the learner is alive, and logs and drops malformed or foreign frames without stopping.

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
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import zmq

from climbrl.wire import (
    HELLO_REFUSED,
    LEARNER_ACCEPTS,
    Codec,
    Control,
    Error,
    Heartbeat,
    Hello,
    LogLimiter,
    WeightAck,
    WireError,
    term_context,
)

log = logging.getLogger("climbrl.learner.hub")
LOG_EVERY_S = 10.0


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
    loop_lag_where: str = ""  # what the server's loop was running then ("" if not caught)
    asleep: bool = False  # its engine is in vLLM's sleep mode (its last heartbeat says)


class HubError(RuntimeError):
    """The hub cannot do its job (its socket thread stopped taking messages)."""


class LearnerHub:
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
    ):
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
        self.router = self.ctx.socket(zmq.ROUTER)
        self._auth = secure_server(self.ctx, self.router, self.keys, self.curve)
        log.info(
            "wire: %s",
            "CURVE on, only peers with this run's client key are admitted"
            if self.curve
            else "PLAIN, only peers with this run's secret are admitted",
        )
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a restarted server reconnects under its old id: the new (authenticated) connection
        # takes it, and its Hello is accepted once the old process counts as dead
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, int(max_message_mb * 2**20))
        self.router.setsockopt(zmq.RCVHWM, recv_hwm)
        # ZMTP pings drop a connection whose peer vanished without closing it (a dead node),
        # so that its server id is free for the restarted server
        self.router.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat_s * 1000)))
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(dead_after_s * 1000)))
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
        # a hub thread that stops draining the outbox fills it to its high-water mark: a send
        # then fails after this long instead of blocking the training thread for good
        self._push.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
        self.send_timeout_s = send_timeout_s
        self._push.connect(self._outbox_addr)
        self._push_lock = threading.Lock()
        self.inbox: queue.Queue[tuple[str, Any, list[Any], float]] = queue.Queue(inbox_max)
        self.codec = Codec(LEARNER_ACCEPTS)
        self.servers: dict[str, ServerState] = {}
        self.lock = threading.Lock()
        self.rejected = 0  # frames dropped: malformed, foreign, unknown peer, wrong run
        self.refused_hellos = 0
        self.inbox_full = 0  # times the hub stopped reading because the inbox was full
        self._limit = LogLimiter(log, LOG_EVERY_S)
        self._unreachable: set[str] = set()
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.run_id = run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(pull,), daemon=True)
        self._thread.start()
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
        term_context(self.ctx, 5.0)  # the hub thread's sockets stay open if it did not stop

    # ----------------------------------------------------------- training-thread API

    def send(self, server_id: str, msg: Any, tensors: list[Any] | None = None) -> None:
        msg.run_id = self.run_id
        self.send_frames(server_id, Codec.encode(msg, tensors))

    def send_frames(self, server_id: str, frames: list[Any]) -> None:
        """Queue already-encoded frames for ``server_id``. Only the hub thread touches the
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
        with self.lock:
            return [s for s, st in self.servers.items() if st.alive]

    def take_loop_lag(self) -> dict[str, float]:
        """Each live server's worst event-loop lag (seconds) since the previous call."""
        return {s: lag for s, (lag, _) in self.take_loop_lag_where().items()}

    def take_loop_lag_where(self) -> dict[str, tuple[float, str]]:
        """Each live server's worst event-loop lag (seconds) since the previous call, and what
        its loop was running then ("" if not caught; climbrl.rollout.loop_lag)."""
        with self.lock:
            out = {
                s: (st.loop_lag_max_s, st.loop_lag_where)
                for s, st in self.servers.items()
                if st.alive
            }
            for st in self.servers.values():
                st.loop_lag_max_s, st.loop_lag_where = 0.0, ""
        return out

    def asleep_servers(self) -> list[str]:
        """Live servers whose engine is in vLLM's sleep mode."""
        with self.lock:
            return [s for s, st in self.servers.items() if st.alive and st.asleep]

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
        reading_paused = False
        try:
            while not self._stop.is_set():
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
                if pull in events:
                    while True:
                        try:
                            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
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
                    for sid in self.alive_servers():
                        self._route(
                            [
                                sid.encode(),
                                *Codec.encode(Control(command="ping", run_id=self.run_id)),
                            ]
                        )
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
        self._unreachable.discard(
            frames[0].bytes.decode() if hasattr(frames[0], "bytes") else bytes(frames[0]).decode()
        )

    def _reject(self, sid: str, why: str) -> None:
        self.rejected += 1
        self._limit(
            logging.ERROR, f"reject:{sid[:64]}", "rejected a message from %r: %s", sid[:64], why
        )

    def _welcome(self, sid: str) -> None:
        self._route([sid.encode(), *Codec.encode(Control(command="welcome", run_id=self.run_id))])

    def _on_frames(self, frames: list[Any]) -> None:
        sid = frames[0].bytes.decode(errors="replace")
        try:
            msg, tensors = self.codec.decode(frames[1:])
        except WireError as e:
            return self._reject(sid, str(e))
        if getattr(msg, "server_id", sid) != sid:
            return self._reject(
                sid, f"{type(msg).__name__} names server {msg.server_id[:64]!r}, not its sender"
            )
        if msg.run_id != self.run_id and not (isinstance(msg, Hello) and msg.run_id == ""):
            return self._reject(
                sid,
                f"{type(msg).__name__} of run {msg.run_id[:64]!r}, not of this run {self.run_id!r}",
            )
        now = time.monotonic()
        with self.lock:
            st = self.servers.get(sid)
            if isinstance(msg, Hello):
                live = st is not None and st.alive and now - st.last_seen <= self.dead_after_s
                if live and (st.pid, st.hostname) == (msg.pid, msg.hostname):
                    st.last_seen = now  # the server repeats its Hello until it is welcomed
                    verdict = "again"
                elif live:
                    verdict = "refused"
                else:
                    self.servers[sid] = ServerState(
                        sid, msg.pid, msg.hostname, msg.policy_version, now
                    )
                    verdict = "new"
            elif st is not None:
                st.last_seen = now
                if isinstance(msg, Heartbeat):
                    st.version = msg.policy_version
                    st.accepting_orders = msg.accepting_orders
                    st.asleep = msg.asleep
                    if msg.loop_lag_max_s > st.loop_lag_max_s:
                        st.loop_lag_max_s = msg.loop_lag_max_s
                        st.loop_lag_where = msg.loop_lag_where
                elif isinstance(msg, WeightAck) and msg.ok:
                    st.version = msg.version
        if isinstance(msg, Hello):
            if verdict == "refused":
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
                self._route(
                    [
                        sid.encode(),
                        *Codec.encode(
                            Error(
                                run_id=self.run_id,
                                origin="learner",
                                code=HELLO_REFUSED,
                                message=f"server id {sid!r} is alive (pid {st.pid} on {st.hostname}); "
                                f"retry after it has been silent for {self.dead_after_s:g}s",
                            )
                        ),
                    ]
                )
                return
            self._welcome(sid)
            if verdict == "again":
                return
        elif st is None:
            return self._reject(sid, f"{type(msg).__name__} from a server that has not said Hello")
        if not isinstance(msg, Heartbeat) or msg.engine_error:  # a dead engine: the learner acts
            self.inbox.put((sid, msg, tensors, now))

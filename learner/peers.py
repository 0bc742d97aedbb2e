"""The learner's view of its rollout servers: who said ``Hello``, who is alive, what each last
reported. Pure bookkeeping behind one lock: the hub's socket thread writes it, the training
thread reads it; no sockets here, so a test drives it with plain messages.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from climbrl.wire import Heartbeat, Hello, WeightAck

HelloVerdict = Literal["new", "again", "refused"]


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


class PeerTable:
    """Every server that said ``Hello``, by server id."""

    def __init__(self, dead_after_s: float) -> None:
        self.dead_after_s = dead_after_s
        self.servers: dict[str, ServerState] = {}
        self.lock = threading.Lock()

    def hello(self, sid: str, msg: Hello, now: float) -> tuple[HelloVerdict, ServerState | None]:
        """Take ``msg`` from ``sid``: ``new`` (a server, or a restarted one whose predecessor
        counts as dead), ``again`` (the same process repeats it until it is welcomed) or
        ``refused`` (another process holds the id and is alive). Also returns the id's state
        as it is after the call (the live holder when refused)."""
        with self.lock:
            st = self.servers.get(sid)
            live = st is not None and st.alive and now - st.last_seen <= self.dead_after_s
            if st is not None and live and (st.pid, st.hostname) == (msg.pid, msg.hostname):
                st.last_seen = now
                return "again", st
            if live:
                return "refused", st
            st = self.servers[sid] = ServerState(
                sid, msg.pid, msg.hostname, msg.policy_version, now
            )
            return "new", st

    def seen(self, sid: str, msg: Any, now: float) -> bool:
        """Note a message other than ``Hello`` from ``sid``; False when ``sid`` never said
        ``Hello`` (the message is then rejected)."""
        with self.lock:
            st = self.servers.get(sid)
            if st is None:
                return False
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
            return True

    def alive(self) -> list[str]:
        with self.lock:
            return [s for s, st in self.servers.items() if st.alive]

    def asleep(self) -> list[str]:
        """Live servers whose engine is in vLLM's sleep mode."""
        with self.lock:
            return [s for s, st in self.servers.items() if st.alive and st.asleep]

    def taking_orders(self) -> list[str]:
        """Live servers that take work orders (a server pinned for serving does not)."""
        with self.lock:
            return [s for s, st in self.servers.items() if st.alive and st.accepting_orders]

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

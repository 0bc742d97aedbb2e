"""Weight updates in flight: what each rollout server was sent and has acknowledged.

A server at an unknown version gets a full sync, the others a delta or the adapters
(``learner.weights.mode``; the frames come from ``WeightPublisher`` in learner/weights.py). A
server applies updates in order and acks each one: ok (its engine runs that version),
deferred (pinned for serving; it takes the latest version when unpinned), or failed (it
stays on its version, rolled back). A failed, deferred or late update makes the server's
next update a full sync. ``sync_times`` are publish-to-ack times, ``phases`` the server's
timing of its last update.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from climbrl.learner.weights import WeightPublisher
from climbrl.wire import WeightAck

log = logging.getLogger("climbrl.learner")


class Publishing:
    def __init__(self, weights: WeightPublisher, hub: Any, counters: dict[str, int]):
        """``hub``: the learner's socket (``send``); ``counters``: the run's counters
        (weight_bytes_sent, weight_syncs_*), updated in place."""
        self.weights, self.hub, self.counters = weights, hub, counters
        # sid -> {version: publish time}: every update not yet acked (with publish_every=1 the
        # next version is often sent before the last one's ack arrives)
        self.pending: dict[str, dict[int, float]] = {}
        self.sync_times: list[float] = []
        self.phases: dict[str, float] = {}

    def publish(
        self, version: int, servers: list[str], state: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Send ``version`` to ``servers`` (``state``: the full weights gathered under FSDP)."""
        for sids, manifest, tensors in self.weights.messages(version, servers, state=state):
            size = self.weights.last[manifest.kind]
            for sid in sids:
                self.pending.setdefault(sid, {})[version] = time.monotonic()
                self.hub.send(sid, manifest, tensors)
                self.counters["weight_bytes_sent"] += size
                self.counters[f"weight_syncs_{manifest.kind}"] += 1

    def joined(self, sid: str, hostname: str) -> None:
        """A (re)started server: its next update is a full sync."""
        self.weights.join(sid, hostname)
        self.pending.pop(sid, None)

    def lost(self, sid: str) -> None:
        """A dead server: nothing it was sent is coming back (nor will it read what it was
        sent: the frames it pinned are free again)."""
        self.pending.pop(sid, None)
        self.weights.dropped(sid)

    def outstanding(self) -> bool:
        return any(self.pending.values())

    def on_ack(self, sid: str, ack: WeightAck, arrived: float) -> None:
        pend = self.pending.get(sid, {})
        if ack.deferred or not ack.ok:
            # the server takes updates in order: this answers the oldest one outstanding
            if pend:
                del pend[min(pend)]
            self.weights.forget(sid, ack.shm_unreadable)  # pinned or failed: next is a full sync
        if ack.deferred:
            log.info(
                "%s is pinned at version %d for serving; it will take the latest version "
                "when unpinned",
                sid,
                ack.version,
            )
            return
        if not ack.ok:
            self.counters["weight_syncs_failed"] += 1
            log.error(
                "weight update on %s failed, it stays on version %d%s: %s",
                sid,
                ack.version,
                " (rolled back)" if ack.rolled_back else "",
                ack.error,
            )
            return
        self.weights.acked(sid, ack.version)  # its older weights files may be rewritten
        t0 = pend.get(ack.version)
        for v in [v for v in pend if v <= ack.version]:
            del pend[v]  # acked, or superseded by a newer version that was
        if t0 is not None:
            self.sync_times.append(arrived - t0)
            self.phases = ack.phases

    def check(self, now: float, timeout_s: float) -> None:
        """An update not acked within ``timeout_s`` (``wire.weight_sync_timeout_s``) is lost,
        with the newer ones behind it: that server's next update is a full sync."""
        for sid, pend in list(self.pending.items()):
            late = [v for v, t0 in pend.items() if now - t0 > timeout_s]
            if late:
                del self.pending[sid]
                self.weights.forget(sid)
                self.counters["weight_syncs_failed"] += 1
                log.error("weight sync to %s (version %d) timed out", sid, min(late))

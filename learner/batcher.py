"""The batcher: groups that came back, waiting to be trained, and the rules that pick a batch.

A group older than ``learner.max_staleness`` versions is dropped (its prompt goes back to the
cursor) or kept for the off-policy correction (``learner.offpolicy.stale_policy``). With
dynamic sampling or a pass-rate band, a group outside it is dropped and its prompt counts as consumed, up to
``learner.shaping.filter_max_dropped`` per batch slot; past that budget the batch trains unfiltered.
A batch is ordered by cursor sequence, so it does not depend on the order groups arrive in.
"""

from __future__ import annotations

import logging
from typing import Any

from climbrl.learner.algos.shaping import keep_group, pass_rate
from climbrl.learner.data import DataCursor
from climbrl.wire import Trajectory

log = logging.getLogger("climbrl.learner")


class Batcher:
    def __init__(self, lc: Any, reward_max: float, cursor: DataCursor, counters: dict[str, int]):
        """``lc``: the learner config; ``counters``: the run's counters (stale_dropped,
        stale_corrected, filtered_groups), updated in place."""
        self.lc, self.reward_max, self.cursor, self.counters = lc, reward_max, cursor, counters
        self.ready: list[Trajectory] = []
        self.seq_of: dict[str, int] = {}  # order_id -> cursor sequence, for groups in `ready`
        self._budget: int | None = None  # filter drops left for the batch being collected

    def add(self, tr: Trajectory, seq: int) -> None:
        """A training group came back for the order of cursor sequence ``seq``."""
        self.seq_of[tr.order_id] = seq
        self.ready.append(tr)

    def take(self, n: int, version: int) -> list[Trajectory] | None:
        """``n`` groups within the staleness bound (and the filters), or None while fewer are
        ready; groups the rules drop leave ``ready``."""
        lc = self.lc
        filtering = lc.shaping.filtering  # dynamic sampling or a pass-rate band
        budget = lc.shaping.filter_max_dropped * n if self._budget is None else self._budget
        keep = []
        for tr in self.ready:
            stale = version - tr.policy_version > lc.max_staleness
            if stale and lc.offpolicy.stale_policy == "drop":
                self.counters["stale_dropped"] += 1
                self.cursor.requeue(self.seq_of.pop(tr.order_id))
                continue
            if filtering and budget > 0:
                rate = pass_rate(tr.samples, self.reward_max)
                sh = lc.shaping
                if not keep_group(rate, sh.dynamic_sampling, tuple(sh.pass_rate_band)):
                    budget -= 1
                    self.counters["filtered_groups"] += 1
                    self.cursor.done(self.seq_of.pop(tr.order_id))
                    if budget == 0:
                        log.warning(
                            "filters dropped %d groups this step; training on the next ones "
                            "unfiltered",
                            lc.shaping.filter_max_dropped * n,
                        )
                    continue
            keep.append(tr)
        self.ready, self._budget = keep, budget
        if len(self.ready) < n:
            return None
        batch, self.ready = self.ready[:n], self.ready[n:]
        self._budget = None
        # counted here, not in the scan above: take() re-scans `ready` while the batch fills
        self.counters["stale_corrected"] += sum(
            version - t.policy_version > lc.max_staleness for t in batch
        )
        return sorted(batch, key=lambda t: self.seq_of[t.order_id])  # arrival-independent

    def trained(self, groups: list[Trajectory]) -> list[int]:
        """The cursor sequences of a trained batch, marked done."""
        seqs = [self.seq_of.pop(g.order_id) for g in groups]
        for seq in seqs:
            self.cursor.done(seq)
        return seqs

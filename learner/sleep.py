"""Sleep mode of colocated rollout engines: with ``placement.mode = "colocated"`` and
``placement.sleep_level`` > 0 the engines free their GPU memory (vLLM's sleep mode) while the
learner steps, and take it back before the weight update that follows (level 2 drops the
weights too: that update is a full sync)."""

from __future__ import annotations

import time
from collections.abc import Callable

from climbrl.config import Config
from climbrl.learner.hub import LearnerHub
from climbrl.learner.orders import LearnerError
from climbrl.learner.publishing import Publishing
from climbrl.wire import Control


def set_engines_asleep(
    cfg: Config,
    hub: LearnerHub,
    publishing: Publishing | None,
    pump: Callable[[float], None],
    asleep: bool,
) -> None:
    """Send every live server ``sleep:<level>`` or ``wake`` and ``pump`` the learner's inbox
    until each one's heartbeat says so; LearnerError after ``wire.weight_sync_timeout_s``."""
    p = cfg.placement
    if p.mode != "colocated" or not p.sleep_level:
        return
    cmd = Control(command=f"sleep:{p.sleep_level}" if asleep else "wake")
    for sid in hub.alive_servers():
        hub.send(sid, cmd)
    limit = cfg.wire.weight_sync_timeout_s
    deadline = time.monotonic() + limit
    while True:
        alive, sleeping = hub.alive_servers(), set(hub.asleep_servers())
        waiting = [s for s in alive if (s in sleeping) != asleep]
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise LearnerError(
                f"rollout servers {waiting} did not {'sleep' if asleep else 'wake'} within "
                f"{limit:g}s (wire.weight_sync_timeout_s); see their logs"
            )
        pump(0.1)
    if not asleep and p.sleep_level == 2 and publishing is not None:
        for sid in alive:
            publishing.weights.forget(sid)  # its weights are gone: a full sync next

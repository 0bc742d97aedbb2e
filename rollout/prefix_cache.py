"""Resetting vLLM's prefix cache after a weight update, at a moment the reset can succeed.

vLLM resets its prefix cache only while no request holds KV blocks; otherwise it logs "Failed
to reset prefix cache because some blocks (N) are not freed yet" and keeps the cache. A rollout
server takes weight updates while episodes are in flight (pause(keep), reload, resume), so an
update's reset would fail almost every time. The reset is not needed for the rollout server's
own requests: they are salted by weight version (``cache_salt``), so KV computed by older
weights is never reused for them, and its blocks are evicted like any unused cached block.
Requests through the OpenAI API on the same engine carry no such salt, and the reset is what
keeps old KV from them.

So the server asks for the reset with each update, and ``PrefixCacheReset`` sends it only when
the engine has no unfinished request; otherwise it is marked due and sent as soon as the engine
is idle (``when_idle``, called when a request ends and with each heartbeat). While a reset is on
its way, new rollout requests wait for it (``before_request``), so they cannot take blocks
before the reset arrives.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


class PrefixCacheReset:
    """Owns the engine's prefix-cache resets. ``engine``: a vLLM ``AsyncLLM`` (or a fake with
    ``get_num_unfinished_requests()`` and ``async reset_prefix_cache() -> bool``)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.due = False  # a weight update happened since the last successful reset
        self.sent = 0  # resets sent to the engine
        self.failed = 0  # resets the engine refused (a request took blocks first)
        self._inflight: asyncio.Task | None = None

    def _idle(self) -> bool:
        return self.engine.get_num_unfinished_requests() == 0

    def after_update(self) -> asyncio.Future:
        """Ask for a reset (a new weight version is loaded): sent at once if the engine is
        idle, else due. The future is done once the reset, if sent now, is done."""
        self.due = True
        return self.when_idle()

    def when_idle(self) -> asyncio.Future:
        """Send the due reset if the engine has no unfinished request now."""
        if self._inflight is None and self.due and self._idle():
            self.due = False  # an update from now on is due again, whatever this reset finds
            self._inflight = asyncio.ensure_future(self._reset())
        if self._inflight is None:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return asyncio.shield(self._inflight)

    async def before_request(self) -> None:
        """A new request waits for a reset on its way to the engine, so it holds no blocks
        when the reset arrives."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)

    async def _reset(self) -> None:
        self.sent += 1
        try:
            ok = await self.engine.reset_prefix_cache()
        except Exception:  # the next update or idle moment tries again
            log.exception("resetting the prefix cache failed")
            ok = False
        finally:
            self._inflight = None
        if not ok:  # a request from elsewhere (the OpenAI API) took blocks first
            self.failed += 1
            self.due = True

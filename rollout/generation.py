"""The engine as an episode sees it: ``EngineGenerator.generate(ids, sampling_params)``.

Over one vLLM ``AsyncLLM`` it adds what every rollout request needs: at most
``rollout.max_concurrency`` requests at once, a request id the replay capture keys its record
by (``climbrl.rollout.replay``), a prefix cache salted by weight version (KV computed by old
weights is never reused for new requests; vLLM resets the cache only while no request holds
blocks: ``climbrl.rollout.prefix_cache``), and a deadline (``rollout.request_timeout_s``) past
which the request is aborted and fails.

Tests: ``pytest tests/unit/test_failure_paths_waits.py -k deadline``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from climbrl.rollout.prefix_cache import PrefixCacheReset

log = logging.getLogger("climbrl.rollout")


class EngineGenerator:
    """``engine``: a vLLM ``AsyncLLM``; ``version()``: the weight version it runs now.
    ``abort_timeout_s`` bounds an abort (the engine may be what hangs)."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        *,
        server_id: str,
        version: Callable[[], int],
        max_concurrency: int,
        request_timeout_s: float,
        abort_timeout_s: float,
        prefix_reset: PrefixCacheReset,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.server_id = server_id
        self._version = version
        self.request_timeout_s = request_timeout_s
        self.abort_timeout_s = abort_timeout_s
        self.prefix_reset = prefix_reset
        self.sem = asyncio.Semaphore(max_concurrency)
        self._req = 0

    @property
    def version(self) -> int:
        return self._version()

    async def generate(self, ids: list[int], sp: Any) -> tuple[Any, dict[str, Any] | None]:
        """(completion output, replay record or None: climbrl.rollout.replay.take)."""
        from vllm.inputs import TokensPrompt

        from climbrl.rollout import replay

        self._req += 1
        rid = f"{self.server_id}-{self._req}"
        replayed = replay.tag(sp, rid)
        prompt = TokensPrompt(prompt_token_ids=ids, cache_salt=f"v{self.version}")
        final = None
        limit = self.request_timeout_s
        async with self.sem:
            await self.prefix_reset.before_request()
            try:
                async with asyncio.timeout(limit):
                    async for out in self.engine.generate(prompt, sp, request_id=rid):
                        final = out
            except TimeoutError:
                await self._abort(rid)
                raise TimeoutError(
                    f"generation request {rid} ran past rollout.request_timeout_s = {limit:g}s"
                ) from None
        self.prefix_reset.when_idle()
        assert final is not None, "the engine yields at least one output"
        record = None
        if replayed:
            record = await replay.take(self.engine, rid, final.outputs[0], len(ids))
        return final.outputs[0], record

    async def _abort(self, rid: str) -> None:
        try:
            await asyncio.wait_for(self.engine.abort(rid), timeout=self.abort_timeout_s)
        except Exception as e:
            log.warning("aborting request %s: %s", rid, e or type(e).__name__)

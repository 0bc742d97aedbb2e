"""climbrl.rollout.prefix_cache: a weight update's prefix-cache reset reaches the engine only
when it can succeed, against a fake engine that refuses a reset while requests are unfinished,
as vLLM's block pool does (and logs "Failed to reset prefix cache")."""

from __future__ import annotations

import asyncio

from climbrl.rollout.prefix_cache import PrefixCacheReset


class FakeEngine:
    def __init__(self) -> None:
        self.unfinished = 0
        self.resets: list[bool] = []  # each reset the engine got, and whether it succeeded

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished

    async def reset_prefix_cache(self) -> bool:
        await asyncio.sleep(0)  # a round trip to the engine core
        self.resets.append(self.unfinished == 0)
        return self.resets[-1]


async def test_an_idle_engine_is_reset_with_the_update() -> None:
    eng = FakeEngine()
    pr = PrefixCacheReset(eng)
    await pr.after_update()
    assert eng.resets == [True] and not pr.due


async def test_a_busy_engine_is_reset_once_its_requests_end() -> None:
    eng = FakeEngine()
    pr = PrefixCacheReset(eng)
    eng.unfinished = 3
    await pr.after_update()  # in flight: nothing is sent, the reset is due
    await pr.after_update()
    assert eng.resets == [] and pr.due
    eng.unfinished = 1
    await pr.when_idle()
    assert eng.resets == []
    eng.unfinished = 0
    await pr.when_idle()  # the last request ended: one reset for both updates
    await pr.when_idle()
    assert eng.resets == [True] and not pr.due and pr.failed == 0


async def test_requests_wait_for_a_reset_on_its_way() -> None:
    eng = FakeEngine()
    pr = PrefixCacheReset(eng)
    pr.due = True
    sent = pr.when_idle()
    order: list[str] = []

    async def request() -> None:
        await pr.before_request()
        order.append("request")
        eng.unfinished += 1

    await asyncio.gather(request(), sent)
    assert eng.resets == [True] and order == ["request"]


async def test_a_refused_reset_stays_due() -> None:
    """A request from elsewhere (the OpenAI API) took blocks before the reset arrived."""
    eng = FakeEngine()
    pr = PrefixCacheReset(eng)
    pr.due = True
    sent = pr.when_idle()
    eng.unfinished = 1
    await sent
    assert eng.resets == [False] and pr.due and pr.failed == 1
    eng.unfinished = 0
    await pr.when_idle()
    assert eng.resets == [False, True] and not pr.due


async def test_an_update_during_a_reset_is_due_again() -> None:
    eng = FakeEngine()
    pr = PrefixCacheReset(eng)
    first = pr.after_update()
    second = pr.after_update()  # a newer version loaded before the first reset answered
    await asyncio.gather(first, second)
    assert eng.resets == [True] and pr.due
    await pr.when_idle()
    assert eng.resets == [True, True] and not pr.due

"""A work order's group: ``order.group_size`` episodes of one task, run concurrently.

A work order names one of the envs this server's config names (``env.name``,
``rollout.extra_envs``), never code to import, and cannot change how the env is built
(``env_args``). Each episode builds its own env; an env that fails to build, raises, hangs or
returns garbage costs its episode only (a sample with finish reason ``ENV_ERROR``), and a group
whose every episode failed fails the order.

Tests: ``pytest tests/unit/test_episode.py tests/unit/test_auth_wire.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from climbrl.config import Config
from climbrl.envs.base import make_env
from climbrl.rollout.episode import EnvFailure, failed_sample
from climbrl.wire import ENV_ERROR, Sample, WorkOrder

log = logging.getLogger("climbrl.rollout")

# one episode: (order, env, task, index) -> its sample; raises EnvFailure for the env's failures
Episode = Callable[[WorkOrder, Any, Any, int], Awaitable[Sample]]


def env_args(cfg: Config, order: WorkOrder) -> dict[str, Any]:
    """The args to build ``order.env`` with, from this server's config. Raises ValueError
    for an env the config does not name, or for args that differ from the config's."""
    e = cfg.env
    allowed = [e.name, *cfg.rollout.extra_envs]
    if order.env not in allowed:
        raise ValueError(
            f"unknown env {order.env[:200]!r} for this server: it runs work "
            f"orders for {allowed} only (env.name, rollout.extra_envs)"
        )
    args = e.args if order.env == e.name else {}
    if order.env_args and order.env_args != args:
        raise ValueError(
            f"work order env_args for {order.env!r} differ from this server's "
            "config: a work order cannot change how an env is built"
        )
    return dict(args)


async def run_group(
    order: WorkOrder,
    cfg: Config,
    episode: Episode,
    agent_episode: Episode,
) -> list[Sample]:
    """The group's samples, failed episodes included. ``agent_episode`` runs the episodes of
    a black-box env, ``episode`` all others. Raises EnvFailure if every episode failed."""
    env_probe = make_env(order.env, env_args(cfg, order))
    task = env_probe.get_task(order.split, order.task_index)
    run = agent_episode if getattr(env_probe, "black_box", False) else episode
    samples = await asyncio.gather(
        *(_guarded(run, order, cfg, task, i) for i in range(order.group_size))
    )
    failed = [s for s in samples if s.finish_reason == ENV_ERROR]
    if failed:
        log.warning(
            "order %s: %d of %d episodes failed in the env: %s",
            order.order_id,
            len(failed),
            len(samples),
            failed[0].error,
        )
    if len(failed) == len(samples):
        raise EnvFailure(f"every episode failed; first: {failed[0].error}")
    return list(samples)


async def _guarded(episode: Episode, order: WorkOrder, cfg: Config, task: Any, i: int) -> Sample:
    """One episode on an env of its own; the env's failure is this episode's only."""
    try:
        env = make_env(order.env, env_args(cfg, order))
    except Exception as e:
        return failed_sample(task, f"constructing env {order.env!r}: {type(e).__name__}: {e}")
    try:
        return await episode(order, env, task, i)
    except EnvFailure as e:
        return failed_sample(task, str(e))

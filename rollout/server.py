"""Rollout server: one vLLM AsyncLLM engine serving the learner's work orders over ZeroMQ.

    climbrl rollout --config runs/x/config.resolved.toml --endpoint tcp://127.0.0.1:5555 --server-id r0

``RolloutServer`` wires the pieces and owns the process's lifetime; each piece does one job:

- ``climbrl.rollout.client.LearnerClient``: the socket to the learner (CURVE or PLAIN), Hello
  until welcomed, bounded sends, heartbeats, the session check of each message;
- ``climbrl.rollout.group.run_group``: a work order's ``group_size`` episodes, concurrently;
- ``climbrl.rollout.episode.run_episode``: one multi-turn episode next to the engine, through
  ``climbrl.rollout.generation.EngineGenerator``;
- ``climbrl.rollout.agent_episode.run_agent_episode``: one black-box agent episode, through the
  OpenAI API on this engine (``climbrl.rollout.http_api``);
- ``climbrl.rollout.weight_receiver.WeightUpdateReceiver``: new weights loaded in place while
  requests are in flight, in phases, rolled back on failure.

The core never touches the socket: the client hands it each message, and it answers through
``client.send``. If the learner goes silent for ``wire.dead_after_s`` the server exits.

A dead engine (vLLM's ``EngineDeadError``, seen by a failed order or by the heartbeat's
check) ends the process with exit code ``ENGINE_DEAD_EXIT``. Before it stops, the server
sends the learner an ``engine_dead`` error that quotes the cause from the engine's own output
(``rollout.output_tail``), and its heartbeats carry the same cause (``engine_error``), so that
the learner moves this server's orders elsewhere at once; the last log line names the cause
too. The launcher then applies ``run.on_child_death``.

No wait is unbounded: a generation request past ``rollout.request_timeout_s`` is aborted and
fails its order; a send to a learner that stopped reading (ZeroMQ's queue at its high-water
mark) fails after ``wire.send_timeout_s``, and the server exits with ``LEARNER_STUCK_EXIT``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from climbrl.config import Config
from climbrl.rollout.agent_episode import run_agent_episode
from climbrl.rollout.client import LearnerClient, LearnerStuck
from climbrl.rollout.episode import EpisodeLimits, run_episode
from climbrl.rollout.generation import EngineGenerator
from climbrl.rollout.group import run_group
from climbrl.rollout.http_api import HttpApi, needs_http, start_http
from climbrl.rollout.loop_lag import LoopLagMonitor
from climbrl.rollout.prefix_cache import PrefixCacheReset
from climbrl.rollout.weight_receiver import WeightUpdateReceiver
from climbrl.wire import (
    Control,
    Error,
    Heartbeat,
    Hello,
    Sample,
    Trajectory,
    WeightManifest,
    WorkOrder,
)

__all__ = ["ENGINE_DEAD_EXIT", "LEARNER_STUCK_EXIT", "LearnerStuck", "RolloutServer", "serve"]

log = logging.getLogger("climbrl.rollout")
# the exit code of a rollout server whose engine died
ENGINE_DEAD_EXIT = 3
# the exit code of a rollout server whose sends the learner stopped taking (wire.send_timeout_s)
LEARNER_STUCK_EXIT = 4


class RolloutServer:
    def __init__(
        self,
        cfg: Config,
        endpoint: str,
        server_id: str,
        initial_version: int = 0,
        model_path: str | None = None,
    ):
        self.cfg = cfg
        self.server_id = server_id
        self.initial_version = initial_version
        self.model_path = model_path or cfg.model.path
        self.stop = asyncio.Event()
        self.client = LearnerClient(cfg.wire, endpoint, server_id, self.stop)
        self.inflight: set[asyncio.Task] = set()
        # worst event-loop lag since the last heartbeat, and what the loop was running then
        self.loop_lag = LoopLagMonitor(sample_after_s=min(0.1, cfg.rollout.loop_lag_warn_s / 2))
        self.http: HttpApi | None = None  # the OpenAI API on this engine, when it runs
        self.output_tail: Any = None  # rollout.output_tail.OutputTail, set by serve()
        self.engine_dead: str | None = None  # the cause, once the engine is found dead
        self.asleep = False  # the engine is in vLLM's sleep mode (Control "sleep:<level>")
        # set by attach(), once the engine is up
        self.engine: Any = None
        self.prefix_reset: PrefixCacheReset
        self.weights: WeightUpdateReceiver
        self.generator: EngineGenerator
        self.limits: EpisodeLimits

    @property
    def version(self) -> int:
        """The weight version the engine runs."""
        return self.weights.version

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        from transformers import AutoTokenizer

        from climbrl.rollout import replay
        from climbrl.rollout.engine import build_engine, engine_kwargs

        r = self.cfg.rollout
        # the config's engine size, and on a GPU its placement (memory fraction, sleep mode)
        engine = build_engine(
            self.model_path, cpu_threads=self.cfg.rollout.cpu_threads, **engine_kwargs(self.cfg)
        )
        await engine.update_weight_version(str(self.initial_version))
        replay_info = await replay.install(engine, routing=r.replay_routing)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.attach(engine, tokenizer, routing=bool(replay_info.get("routing")))
        if needs_http(self.cfg):
            self.http = await start_http(
                self.cfg,
                engine,
                tokenizer,
                model_path=self.model_path,
                server_id=self.server_id,
                version=self.version,
                on_unpin=self.weights.on_unpin,
            )
            self.weights.control = self.http.control
        self.client.connect(Path(self.cfg.run.output_dir))
        await self.client.send(self._hello())
        log.info("rollout %s up, connected to %s", self.server_id, self.client.endpoint)
        try:
            await asyncio.gather(
                self.client.recv_loop(self._dispatch),
                self.client.heartbeat_loop(self._beat),
                self.loop_lag.run(self.stop),
            )
        except LearnerStuck:
            pass  # logged once by the client; serve() exits with LEARNER_STUCK_EXIT
        finally:
            for t in list(self.inflight):
                t.cancel()
            self.client.close()
            self.weights.close()
            if self.http is not None:
                await self.http.close()
            try:
                self.engine.shutdown()
            except Exception as e:  # vLLM's own teardown; the process exits anyway
                log.debug("engine shutdown: %s", e)

    def attach(self, engine: Any, tokenizer: Any, routing: bool = False) -> None:
        """Build the pieces that drive ``engine`` (a vLLM ``AsyncLLM``, or a fake in a test);
        ``routing``: the engine captures MoE routing (climbrl.rollout.replay.install)."""
        cfg, r = self.cfg, self.cfg.rollout
        self.engine = engine
        self.prefix_reset = PrefixCacheReset(engine)
        self.weights = WeightUpdateReceiver(
            engine,
            server_id=self.server_id,
            model_path=self.model_path,
            dtype=cfg.model.dtype,
            phase_timeout_s=cfg.wire.weight_phase_timeout_s,
            version=self.initial_version,
            send=self.client.send,
            spawn=self._spawn,
            prefix_reset=self.prefix_reset,
            cpu_fast_path=r.cpu_fast_path,
            repack_delay_s=r.repack_delay_s,
        )
        self.generator = EngineGenerator(
            engine,
            tokenizer,
            server_id=self.server_id,
            version=lambda: self.weights.version,
            max_concurrency=r.max_concurrency,
            request_timeout_s=r.request_timeout_s,
            abort_timeout_s=cfg.wire.heartbeat_s,
            prefix_reset=self.prefix_reset,
        )
        self.limits = EpisodeLimits(
            max_model_len=r.max_model_len,
            step_timeout_s=cfg.env.step_timeout_s,
            replay_mask=r.replay_sampling_mask,
            replay_routing=r.replay_routing and routing,
        )

    def _hello(self) -> Hello:
        return Hello(
            server_id=self.server_id,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            policy_version=self.version,
            model=self.model_path,
            max_concurrency=self.cfg.rollout.max_concurrency,
            http_url=self.http.url if self.http is not None else "",
        )

    async def _beat(self) -> None:
        """One heartbeat: engine health, event-loop lag, orders in flight, pin."""
        if self.engine.errored:
            await self._engine_died(None)
        lag, lag_where = self.loop_lag.take()
        control = self.http.control if self.http is not None else None
        await self.client.send(
            self._hello()
            if not self.client.welcomed.is_set()
            else Heartbeat(
                server_id=self.server_id,
                policy_version=self.version,
                inflight=len(self.inflight),
                accepting_orders=self.engine_dead is None
                and (control is None or control.pinned is None),
                loop_lag_max_s=lag,
                loop_lag_where=lag_where,
                engine_error=self.engine_dead or "",
                asleep=self.asleep,
            )
        )
        self.prefix_reset.when_idle()  # an update's reset that waited for in-flight requests

    async def _dispatch(self, msg: Any, frames: list[Any], arrived: float) -> None:
        """A message of this server's session, from the client's receive loop."""
        if isinstance(msg, WorkOrder) and self.engine_dead is not None:
            await self.client.send(
                Error(
                    origin=self.server_id,
                    code="engine_dead",
                    message=self.engine_dead,
                    ref_id=msg.order_id,
                )
            )
        elif isinstance(msg, WorkOrder):
            self._spawn(self._run_order(msg))
        elif isinstance(msg, WeightManifest):
            self._spawn(self.weights.on_manifest(msg, frames, arrived))
        elif isinstance(msg, Control):
            if msg.command == "shutdown":
                log.info("shutdown requested by the learner")
                self.stop.set()
            elif msg.command.startswith("sleep:") or msg.command == "wake":
                self._spawn(self._sleep_or_wake(msg.command))
        elif isinstance(msg, Error):
            log.error("learner reported: %s: %s", msg.code, msg.message)

    async def _sleep_or_wake(self, command: str) -> None:
        """Colocated placement: vLLM's sleep mode frees the engine's GPU memory while the
        learner steps ("sleep:<level>"), "wake" takes it back. The next heartbeat, sent at
        once, tells the learner; a failure is logged and reported, and the learner's wait for
        this server ends in its error."""
        try:
            if command == "wake" and self.asleep:
                await self.engine.wake_up()
                self.asleep = False
            elif command.startswith("sleep:") and not self.asleep:
                await self.engine.sleep(int(command.partition(":")[2]))
                self.asleep = True
        except Exception as e:
            log.exception("%s failed", command)
            await self.client.send(
                Error(origin=self.server_id, code="sleep_failed", message=f"{command}: {e!r}")
            )
            return
        await self._beat()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.inflight.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task) -> None:
        self.inflight.discard(t)
        e = None if t.cancelled() else t.exception()
        if e is not None and not isinstance(e, LearnerStuck):  # (that one the client logs once)
            log.error("task %s failed", t.get_name(), exc_info=e)

    # ------------------------------------------------------------------ work orders

    async def _run_order(self, order: WorkOrder) -> None:
        t0 = time.perf_counter()
        try:
            samples = await run_group(order, self.cfg, self._episode, self._agent_episode)
        except Exception as e:  # an engine failure, or an env that failed every episode
            if self.engine.errored:
                await self._engine_died(e)
                return
            log.exception("order %s failed", order.order_id)
            await self.client.send(
                Error(
                    origin=self.server_id,
                    code="order_failed",
                    message=f"{type(e).__name__}: {e}",
                    ref_id=order.order_id,
                )
            )
            return
        gen_versions = [v for s in samples for v, m in zip(s.versions, s.completion_mask) if m]
        await self.client.send(
            Trajectory(
                run_id=order.run_id,
                order_id=order.order_id,
                server_id=self.server_id,
                policy_version=min(gen_versions) if gen_versions else self.version,
                samples=samples,
                gen_seconds=time.perf_counter() - t0,
                num_generated_tokens=len(gen_versions),
            )
        )

    async def _episode(self, order: WorkOrder, env: Any, task: Any, index: int) -> Sample:
        return await run_episode(self.generator, env, order, task, index, self.limits)

    async def _agent_episode(self, order: WorkOrder, env: Any, task: Any, index: int) -> Sample:
        if self.http is None:
            raise ValueError(
                f"env {order.env!r} runs a black-box agent, which needs the OpenAI API on this "
                "server: set serve.enabled = true"
            )
        step_timeout_s = self.cfg.env.step_timeout_s
        return await run_agent_episode(self.http, env, order, task, index, step_timeout_s)

    async def _engine_died(self, error: BaseException | None) -> None:
        """Record the engine's death and its cause, tell the learner, stop the server (once)."""
        if self.engine_dead is not None:
            return
        cause = self.output_tail.last_exception() if self.output_tail is not None else None
        if cause is None and error is not None:
            cause = f"{type(error).__name__}: {error}"
        self.engine_dead = f"vLLM engine died: {cause or 'no cause in its output'}"
        log.error("%s; this server stops", self.engine_dead)
        try:
            await self.client.send(
                Error(origin=self.server_id, code="engine_dead", message=self.engine_dead)
            )
        finally:
            self.stop.set()


def serve(cfg: Config, endpoint: str, server_id: str, initial_version: int = 0) -> int:
    """Run a rollout server until shutdown; the exit code (``ENGINE_DEAD_EXIT`` if its engine
    died, with the cause as the last log line)."""
    import uvloop

    from climbrl.rollout.output_tail import OutputTail

    server = RolloutServer(cfg, endpoint, server_id, initial_version)
    server.output_tail = OutputTail.install()
    try:
        uvloop.run(server.run())
    finally:
        # vLLM's AsyncLLM.__del__ fails if it runs during interpreter teardown: drop it here
        server.engine = None
        gc.collect()
        server.output_tail.close()
    if server.engine_dead is not None:
        log.error("rollout %s exits: %s", server_id, server.engine_dead)
        return ENGINE_DEAD_EXIT
    if server.client.learner_stuck is not None:
        log.error("rollout %s exits: %s", server_id, server.client.learner_stuck)
        return LEARNER_STUCK_EXIT
    return 0

"""Rollout server: one vLLM AsyncLLM engine serving the learner's work orders over ZeroMQ.

    climbrl rollout --config runs/x/config.resolved.toml --endpoint tcp://127.0.0.1:5555 --server-id r0

It connects a DEALER socket to the learner, says hello, heartbeats, and then runs work orders
concurrently: each order is ``group_size`` episodes of an environment, run next to the engine.
Per generated token it records the id, the sampler's log-prob (``processed_logprobs``) and the
weight version that produced it. New weights arrive as frames, are staged in a private folder
under /dev/shm (``climbrl.weightsync.private_dir``) and are loaded in place while requests are
in flight: pause(keep) -> reload -> reset prefix cache -> version -> resume, each step under
``wire.weight_phase_timeout_s``. If the learner goes silent for ``wire.dead_after_s`` the
server exits.

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
import functools
import gc
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from climbrl.config import Config
from climbrl.envs.base import Env, Turn, make_env, resolve_env
from climbrl.envs.chat import ChatRenderer, parse_tool_calls
from climbrl.wire import (
    ENV_ERROR,
    HELLO_REFUSED,
    ROLLOUT_ACCEPTS,
    Codec,
    Control,
    Error,
    Heartbeat,
    Hello,
    LogLimiter,
    Routing,
    Sample,
    Trajectory,
    WeightAck,
    WeightManifest,
    WireError,
    WorkOrder,
    term_context,
)

log = logging.getLogger("climbrl.rollout")
# a full update's background packing starts this long after its ack (_apply_weights)
REPACK_AFTER_ACK_S = 0.005
# the exit code of a rollout server whose engine died
ENGINE_DEAD_EXIT = 3
# the exit code of a rollout server whose sends the learner stopped taking (wire.send_timeout_s)
LEARNER_STUCK_EXIT = 4


class EnvFailure(Exception):
    """The environment (or a black-box agent) failed: it costs one episode."""


def _failed(task: Any, error: str) -> Sample:
    return Sample(
        prompt_ids=[],
        completion_ids=[],
        completion_mask=[],
        logprobs=[],
        versions=[],
        reward=0.0,
        finish_reason=ENV_ERROR,
        metrics={"env_error": 1.0},
        task_id=getattr(task, "task_id", ""),
        error=error[:2000],
    )


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


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
        self.endpoint = endpoint
        self.server_id = server_id
        self.version = initial_version
        self.model_path = model_path or cfg.model.path
        self.codec = Codec(ROLLOUT_ACCEPTS)
        self.inflight: set[asyncio.Task] = set()
        self.weight_lock = asyncio.Lock()
        self.send_lock = asyncio.Lock()
        self.sem = asyncio.Semaphore(cfg.rollout.max_concurrency)
        from climbrl.weightsync import private_dir, remove_orphan_files

        shm_root = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp")
        remove_orphan_files(shm_root)  # left by servers killed with -9
        # staging files go in a folder of this process (0700, a random name), removed at exit
        # and on SIGTERM (climbrl.weightsync.private_dir)
        self.shm_path = private_dir(shm_root, "climbrl-rollout") / "staged.weights"
        self._stop = asyncio.Event()
        self._last_learner_msg = time.monotonic()
        self._req = 0
        self.control: Any = None  # serving.app.ServingControl when the HTTP API is up
        self.sessions: Any = None  # serving.capture.SessionStore
        self.http_url = ""
        self._http: Any = None
        self._deferred: tuple[WeightManifest, list[Any]] | None = None
        from climbrl.weightsync import EngineWeights

        self.wstate = EngineWeights(initial_version)  # the engine's weights, for delta/rollback
        from climbrl.rollout.loop_lag import LoopLagMonitor

        # worst event-loop lag since the last heartbeat, and what the loop was running then
        self.loop_lag = LoopLagMonitor(sample_after_s=min(0.1, cfg.rollout.loop_lag_warn_s / 2))
        self._logged_full_path = False
        self._retired: dict[str, Any] | None = None  # see _apply_locked
        self._repack_pending = False  # see _apply_weights
        self._repack_timer: asyncio.TimerHandle | None = None
        self.output_tail: Any = None  # rollout.output_tail.OutputTail, set by serve()
        self.engine_dead: str | None = None  # the cause, once the engine is found dead
        self.learner_stuck: str | None = None  # why, once a send to the learner timed out
        # the learner's run id, from its welcome: until then this server repeats its Hello
        # and takes no message but the welcome (climbrl.wire)
        self.run_id = ""
        self.welcomed = asyncio.Event()
        self._limit = LogLimiter(log)

    @functools.cached_property
    def prefix_reset(self) -> Any:
        """The engine's prefix-cache resets (climbrl.rollout.prefix_cache.PrefixCacheReset)."""
        from climbrl.rollout.prefix_cache import PrefixCacheReset

        return PrefixCacheReset(self.engine)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        from transformers import AutoTokenizer

        from climbrl.rollout.engine import build_engine

        r = self.cfg.rollout
        self.engine = build_engine(
            self.model_path,
            dtype=self.cfg.model.dtype,
            kv_cache_gb=r.kv_cache_gb,
            max_model_len=r.max_model_len,
            enforce_eager=r.enforce_eager,
            max_num_seqs=r.max_concurrency,
            seed=self.cfg.run.seed,
            replay_routing=r.replay_routing,
            fp32_lm_head=r.fp32_lm_head,
        )
        await self.engine.update_weight_version(str(self.version))
        from climbrl.rollout import replay

        self.replay_info = await replay.install(self.engine, routing=r.replay_routing)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        await self._start_http()
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.server_id.encode())
        self.sock.setsockopt(zmq.RCVHWM, self.cfg.wire.recv_hwm)
        from climbrl.wirekeys import ENV_VAR, curve_enabled, rollout_keys, secure_client

        keys = rollout_keys(self.cfg.wire, Path(self.cfg.run.output_dir))
        curve = curve_enabled(self.cfg.wire)
        secure_client(self.sock, keys, curve)
        log.info(
            "wire: %s client of the learner (credentials from %s)",
            "CURVE" if curve else "PLAIN",
            ENV_VAR if os.environ.get(ENV_VAR) else "the run folder",
        )
        self.sock.connect(self.endpoint)
        self._last_learner_msg = time.monotonic()
        await self._send(self._hello())
        log.info("rollout %s up, connected to %s", self.server_id, self.endpoint)
        try:
            await asyncio.gather(
                self._recv_loop(), self._heartbeat_loop(), self.loop_lag.run(self._stop)
            )
        except LearnerStuck:
            pass  # logged once by _send; serve() exits with LEARNER_STUCK_EXIT
        finally:
            for t in list(self.inflight):
                t.cancel()
            self.sock.close(linger=0)
            term_context(self.ctx, 5.0)
            from climbrl.weightsync import remove_private_dir

            remove_private_dir(self.shm_path.parent)
            if self._http is not None:
                self._http[0].should_exit = True
                await asyncio.wait([self._http[1]], timeout=5)
            try:
                self.engine.shutdown()
            except Exception as e:  # vLLM's own teardown; the process exits anyway
                log.debug("engine shutdown: %s", e)

    def _hello(self) -> Hello:
        return Hello(
            server_id=self.server_id,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            policy_version=self.version,
            model=self.model_path,
            max_concurrency=self.cfg.rollout.max_concurrency,
            http_url=self.http_url,
        )

    async def _send(self, msg: Any, tensors: list[Any] | None = None) -> None:
        """Send to the learner, waiting at most ``wire.send_timeout_s`` (the wait for the
        send lock included): a learner that stops reading fills ZeroMQ's queue up to its
        high-water mark, and a send past it would wait forever. Past the limit the server
        stops (``LearnerStuck``)."""
        msg.run_id = self.run_id
        if self.learner_stuck is not None:
            raise LearnerStuck(self.learner_stuck)
        frames = Codec.encode(msg, tensors)

        async def locked() -> None:
            async with self.send_lock:
                await self.sock.send_multipart(frames, copy=False)

        t = self.cfg.wire.send_timeout_s
        try:
            await asyncio.wait_for(locked(), timeout=t)
        except TimeoutError:
            if self.learner_stuck is None:
                self.learner_stuck = (
                    f"a send to the learner waited {t:g}s (wire.send_timeout_s): it stopped reading"
                )
                log.error("%s; this server stops", self.learner_stuck)
            self._stop.set()
            raise LearnerStuck(self.learner_stuck) from None

    async def _heartbeat_loop(self) -> None:
        w = self.cfg.wire
        while not self._stop.is_set():
            if self.engine.errored:  # the heartbeat carries engine health
                await self._engine_died(None)
            lag, lag_where = self.loop_lag.take()
            await self._send(
                self._hello()
                if not self.welcomed.is_set()
                else Heartbeat(
                    server_id=self.server_id,
                    policy_version=self.version,
                    inflight=len(self.inflight),
                    accepting_orders=self.engine_dead is None
                    and (self.control is None or self.control.pinned is None),
                    loop_lag_max_s=lag,
                    loop_lag_where=lag_where,
                    engine_error=self.engine_dead or "",
                )
            )
            self.prefix_reset.when_idle()  # an update's reset that waited for in-flight requests
            if time.monotonic() - self._last_learner_msg > w.dead_after_s:
                log.error("learner silent for %.0fs: shutting down", w.dead_after_s)
                self._stop.set()
                return
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=w.heartbeat_s)
            except TimeoutError:
                pass

    async def _recv_loop(self) -> None:
        poll_s = self.cfg.wire.heartbeat_s
        while not self._stop.is_set():
            if not await self.sock.poll(timeout=int(poll_s * 1000)):
                continue  # timeout: the heartbeat loop decides whether the learner is dead
            frames = await self.sock.recv_multipart(copy=False)
            arrived = time.time()
            self._last_learner_msg = time.monotonic()
            try:
                msg, tensor_frames = self.codec.decode(frames)
                msg = self._check_session(msg)
            except WireError as e:
                self._limit(logging.ERROR, "bad", "rejected a message from the learner: %s", e)
                await self._send(Error(origin=self.server_id, code="bad_message", message=str(e)))
                continue
            if msg is None:
                continue
            if isinstance(msg, WorkOrder) and self.engine_dead is not None:
                await self._send(
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
                self._spawn(self._apply_weights(msg, tensor_frames, arrived))
            elif isinstance(msg, Control):
                if msg.command == "shutdown":
                    log.info("shutdown requested by the learner")
                    self._stop.set()
            elif isinstance(msg, Error):
                log.error("learner reported: %s: %s", msg.code, msg.message)

    def _check_session(self, msg: Any) -> Any:
        """The learner's welcome (its run id), and every later message of that run; None for
        a message that needs no handling. Raises WireError for a message of another run."""
        if isinstance(msg, Control) and msg.command == "welcome":
            if not self.welcomed.is_set():
                self.run_id = msg.run_id
                self.welcomed.set()
                log.info("rollout %s welcomed by the learner (run %s)", self.server_id, msg.run_id)
            elif msg.run_id != self.run_id:
                raise WireError(
                    f"a welcome of run {msg.run_id[:64]!r}, not of this server's "
                    f"run {self.run_id!r}"
                )
            return None
        if not self.welcomed.is_set():
            if isinstance(msg, Error) and msg.code == HELLO_REFUSED:
                self._limit(
                    logging.WARNING,
                    "hello",
                    "the learner refused this server's Hello: %s",
                    msg.message,
                )
            else:
                self._limit(
                    logging.WARNING,
                    "early",
                    "%s before the learner's welcome ignored",
                    type(msg).__name__,
                )
            return None
        if msg.run_id != self.run_id:
            raise WireError(
                f"{type(msg).__name__} of run {msg.run_id[:64]!r}, not of this "
                f"server's run {self.run_id!r}"
            )
        return msg

    def _env_args(self, order: WorkOrder) -> dict[str, Any]:
        """The args to build ``order.env`` with, from this server's config: a work order picks
        one of the envs the config names (env.name, rollout.extra_envs), never code to import.
        Raises ValueError for any other env."""
        e = self.cfg.env
        allowed = [e.name, *self.cfg.rollout.extra_envs]
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

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.inflight.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task) -> None:
        self.inflight.discard(t)
        e = None if t.cancelled() else t.exception()
        if e is not None and not isinstance(e, LearnerStuck):  # (that one _send logs once)
            log.error("task %s failed", t.get_name(), exc_info=e)

    # ------------------------------------------------------------------ work orders

    async def _run_order(self, order: WorkOrder) -> None:
        t0 = time.perf_counter()
        try:
            env_probe = make_env(order.env, self._env_args(order))
            task = env_probe.get_task(order.split, order.task_index)
            episode = self._agent_episode if getattr(env_probe, "black_box", False) else None
            samples = await asyncio.gather(
                *(
                    self._guarded(episode or self._episode, order, task, i)
                    for i in range(order.group_size)
                )
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
        except Exception as e:  # an engine failure, or an env that failed every episode
            if self.engine.errored:
                await self._engine_died(e)
                return
            log.exception("order %s failed", order.order_id)
            await self._send(
                Error(
                    origin=self.server_id,
                    code="order_failed",
                    message=f"{type(e).__name__}: {e}",
                    ref_id=order.order_id,
                )
            )
            return
        gen_versions = [v for s in samples for v, m in zip(s.versions, s.completion_mask) if m]
        await self._send(
            Trajectory(
                run_id=order.run_id,
                order_id=order.order_id,
                server_id=self.server_id,
                policy_version=min(gen_versions) if gen_versions else self.version,
                samples=list(samples),
                gen_seconds=time.perf_counter() - t0,
                num_generated_tokens=len(gen_versions),
            )
        )

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
            await self._send(
                Error(origin=self.server_id, code="engine_dead", message=self.engine_dead)
            )
        finally:
            self._stop.set()

    async def _guarded(self, episode: Any, order: WorkOrder, task: Any, index: int) -> Sample:
        """One episode; an environment that raises, hangs (``env.step_timeout_s``) or crashes
        costs this episode only: a Sample with finish_reason ENV_ERROR and the cause."""
        try:
            env = make_env(order.env, self._env_args(order))
        except Exception as e:
            return _failed(task, f"constructing env {order.env!r}: {type(e).__name__}: {e}")
        try:
            return await episode(order, env, task, index)
        except EnvFailure as e:
            return _failed(task, str(e))

    async def _env(self, what: str, aw: Any) -> Any:
        """Await one environment call under ``env.step_timeout_s``; its failure is the env's."""
        t = self.cfg.env.step_timeout_s
        try:
            return await asyncio.wait_for(aw, timeout=t)
        except TimeoutError:
            raise EnvFailure(f"{what} ran past env.step_timeout_s={t:g}s") from None
        except Exception as e:
            raise EnvFailure(f"{what} raised {type(e).__name__}: {e}") from e

    def _encode_prompt(self, prompt: Any, chat: ChatRenderer | None = None) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return (chat or ChatRenderer(self.tokenizer)).prompt_ids(prompt)

    async def _generate(self, ids: list[int], sp: Any) -> tuple[Any, dict[str, Any] | None]:
        """(completion output, replay record or None: climbrl.rollout.replay.take)."""
        from vllm.inputs import TokensPrompt

        from climbrl.rollout import replay

        self._req += 1
        rid = f"{self.server_id}-{self._req}"
        replayed = replay.tag(sp, rid)
        # Salting the prefix cache by weight version keeps KV computed by old weights from
        # being reused for new requests (vLLM resets the cache only while no request holds
        # blocks: climbrl.rollout.prefix_cache).
        prompt = TokensPrompt(prompt_token_ids=ids, cache_salt=f"v{self.version}")
        final = None
        limit = self.cfg.rollout.request_timeout_s
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
        record = None
        if replayed:
            record = await replay.take(self.engine, rid, final.outputs[0], len(ids))
        return final.outputs[0], record

    async def _abort(self, rid: str) -> None:
        """Abort a request in the engine (bounded: the engine may be what hangs)."""
        try:
            await asyncio.wait_for(self.engine.abort(rid), timeout=self.cfg.wire.heartbeat_s)
        except Exception as e:
            log.warning("aborting request %s: %s", rid, e or type(e).__name__)

    async def _episode(self, order: WorkOrder, env: Env, task: Any, index: int) -> Sample:
        from climbrl.rollout import replay

        s = order.sampling
        keep: list[int] = []
        routing: Routing | None = None
        try:
            prompt = await self._env("env.reset", env.reset(task))
            try:
                tools = env.tools()
            except Exception as e:
                raise EnvFailure(f"env.tools raised {type(e).__name__}: {e}") from e
            # Chat prompts are rendered with the template once; later turns append only the
            # tokens of new messages (climbrl.envs.chat), never re-tokenising sampled ones.
            chat = None if isinstance(prompt, str) else ChatRenderer(self.tokenizer, tools)
            prompt_ids = self._encode_prompt(prompt, chat)
            step_rewards: list[float] = []
            n_calls = n_call_errors = n_turns = 0
            ids: list[int] = []
            mask: list[int] = []
            lps: list[float] = []
            vers: list[int] = []
            reward, finish, text_all, info = 0.0, "length", "", {}
            max_len = self.cfg.rollout.max_model_len
            for turn in range(max(1, env.max_turns)):
                room = max_len - len(prompt_ids) - len(ids)
                if room <= 0:
                    finish = "context"
                    break
                sp = replay.sampling_params(
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    max_tokens=min(s.max_tokens, room),
                    logprobs=0,
                    seed=None if s.seed is None else _seed(s.seed, order.order_id, index, turn),
                    replay_mask=self.cfg.rollout.replay_sampling_mask,
                    replay_routing=self.cfg.rollout.replay_routing
                    and bool(self.replay_info.get("routing")),
                )
                out, rec = await self._generate(prompt_ids + ids, sp)
                toks = list(out.token_ids)
                keep += replay.keep_list(rec, len(toks))
                if rec and rec.get("routing"):
                    routing = Routing(**rec["routing"])  # the last turn's covers every position
                ids += toks
                mask += [1] * len(toks)
                lps += [lp[t].logprob for lp, t in zip(out.logprobs, toks)]
                vers += _expand_versions(out.weight_versions, len(toks), self.version)
                finish = out.finish_reason or "length"
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                text_all += text
                content, calls, errors = parse_tool_calls(text)
                n_turns, n_calls, n_call_errors = (
                    turn + 1,
                    n_calls + len(calls),
                    n_call_errors + len(errors),
                )
                res = await self._env(
                    "env.respond",
                    env.respond(
                        Turn(
                            text=text,
                            content=content,
                            tool_calls=tuple(calls),
                            tool_call_errors=tuple(errors),
                            finish_reason=finish,
                            index=turn,
                        )
                    ),
                )
                try:
                    reward, info = float(res.reward), {k: float(v) for k, v in res.info.items()}
                except (TypeError, ValueError, AttributeError) as e:
                    raise EnvFailure(f"env.respond returned a bad StepResult: {e}") from e
                if res.step_reward is not None:
                    step_rewards.append(float(res.step_reward))
                if res.done:
                    break
                if res.messages:
                    if chat is None:
                        raise EnvFailure(
                            f"env {order.env!r} returned chat messages after a text prompt: "
                            "return chat messages from reset(), or use StepResult.observation"
                        )
                    try:
                        obs = chat.continuation_ids(toks, res.messages)
                    except Exception as e:
                        raise EnvFailure(
                            f"env messages could not be rendered: {type(e).__name__}: {e}"
                        ) from e
                elif res.observation:
                    obs = self.tokenizer.encode(res.observation, add_special_tokens=False)
                else:
                    break
                if len(prompt_ids) + len(ids) + len(obs) >= max_len:
                    finish = "context"
                    break
                ids += obs
                keep += [0] * len(obs)
                mask += [0] * len(obs)
                lps += [0.0] * len(obs)
                vers += [-1] * len(obs)
        finally:
            await self._close(env)
        return Sample(
            prompt_ids=prompt_ids,
            completion_ids=ids,
            completion_mask=mask,
            logprobs=lps,
            versions=vers,
            reward=reward,
            finish_reason=finish,
            text=text_all,
            metrics={
                **info,
                "turns": float(n_turns),
                "tool_calls": float(n_calls),
                "tool_call_errors": float(n_call_errors),
            },
            task_id=task.task_id,
            step_rewards=step_rewards,
            keep_counts=keep if any(keep) else [],
            routing=routing,
        )

    # ------------------------------------------------------------------ HTTP + agents

    async def _start_http(self) -> None:
        """vLLM's OpenAI API on this engine, if the config asks for it or the env needs it."""
        sc = self.cfg.serve
        needs = getattr(_env_class(self.cfg.env.name), "black_box", False)
        if not (sc.enabled or needs):
            return
        from climbrl.serving.app import (
            API_KEY_FILE,
            ServingControl,
            bound_port,
            build_serving_app,
            check_api_keys,
            run_api_key,
            run_http,
            vllm_args,
        )

        out = Path(self.cfg.run.output_dir) / "serving"
        keys = list(sc.api_keys) + (
            [os.environ["CLIMBRL_API_KEY"]] if "CLIMBRL_API_KEY" in os.environ else []
        )
        # no key configured: one per run, next to the URL files, so the API is never open
        keys = check_api_keys(keys or [run_api_key(out)], sc.host)
        self.agent_key = keys[0]
        self.served_name = sc.served_model_name or self.model_path
        self.control = ServingControl()
        self.control.version = self.version
        self.control.on_unpin = self._on_unpin
        if sc.follow == "pinned":
            self.control.pinned = self.version
        args = vllm_args(self.model_path, list(sc.vllm_args), served_model_name=[self.served_name])
        app, self.sessions = await build_serving_app(
            self.engine, args, self.control, self.tokenizer, keys, limits=sc
        )
        index = int(self.server_id[1:]) if self.server_id[1:].isdigit() else 0
        port = sc.port + index if sc.port else 0
        self._http = await run_http(app, sc.host, port)
        self.http_url = f"http://{sc.host}:{bound_port(self._http[0])}"
        log.info("rollout %s serves the OpenAI API on %s/v1", self.server_id, self.http_url)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.server_id}.json").write_text(
            json.dumps(
                {
                    "server_id": self.server_id,
                    "url": self.http_url + "/v1",
                    "model": self.served_name,
                    "pid": os.getpid(),
                    "api_key_file": str(out / API_KEY_FILE) if not sc.api_keys else "",
                }
            )
        )

    async def _on_unpin(self) -> None:
        if self._deferred is not None:
            m, frames = self._deferred
            self._deferred = None
            await self._apply_weights(m, frames, time.time())

    async def _agent_episode(self, order: WorkOrder, env: Any, task: Any, index: int) -> Sample:
        """One black-box agent episode: a session on this engine's endpoint (envs.agent)."""
        from climbrl.envs.agent import AgentContext

        s = order.sampling
        sid = f"{order.order_id}-{index}-{uuid.uuid4().hex[:8]}"
        sess = self.sessions.open(sid, held=True)  # no flood of other sessions evicts it
        sess.sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
        ctx = AgentContext(
            base_url=self.http_url + "/v1",
            api_key=self.agent_key,
            model=self.served_name,
            session_id=sid,
        )
        try:
            await self._env_agent(env.run_agent(task, ctx))
            if sess.turns == 0:
                raise ValueError(
                    f"agent {env.agent!r} made no request in session {sid}: send "
                    "requests with the X-Session-ID header it was given"
                )
            if env.reward_mode == "env":
                res = await self._env("env.score", env.score(task, sess.last_text))
                sess.reward, sess.metrics = float(res.reward), dict(res.info)
            elif not sess.finished.is_set():
                raise ValueError(
                    f"agent {env.agent!r} returned without posting a reward for "
                    f"session {sid} (POST /v1/climbrl/sessions/{sid}/reward)"
                )
        except ValueError as e:
            raise EnvFailure(str(e)) from e
        finally:
            self.sessions.pop(sid)
            await self._close(env)
        seg = sess.segments[-1]
        return Sample(
            prompt_ids=seg.prompt_ids,
            completion_ids=seg.completion_ids,
            completion_mask=seg.mask,
            logprobs=seg.logprobs,
            versions=seg.versions,
            reward=float(sess.reward),
            finish_reason=sess.finish_reason or "stop",
            text=sess.text,
            metrics={
                **sess.metrics,
                "agent_turns": float(sess.turns),
                "agent_drift": float(sess.drift),
            },
            task_id=task.task_id,
        )

    async def _env_agent(self, aw: Any) -> None:
        """The agent's run: bounded by its own ``timeout_s``; any failure is the agent's."""
        try:
            await aw
        except Exception as e:
            raise EnvFailure(f"agent failed: {type(e).__name__}: {e}") from e

    async def _close(self, env: Any) -> None:
        try:
            await asyncio.wait_for(env.close(), timeout=self.cfg.env.step_timeout_s)
        except Exception:  # a failing close costs nothing but a log line
            log.exception("env.close failed")

    # ------------------------------------------------------------------ weights

    async def _resume_after(self, paused: asyncio.Future, phase: Any = None) -> None:
        """Resume the engine once ``paused`` (the pause of an update that failed before its
        reload went out) is done; a failure here is logged, the update's is what is reported."""
        await asyncio.wait([paused], timeout=self.cfg.wire.weight_phase_timeout_s)
        if paused.done() and not paused.cancelled():
            paused.exception()  # retrieved
        try:
            resumed = self.engine.resume_generation()
            await (resumed if phase is None else phase("resume", resumed))
        except Exception:
            log.exception("resuming the engine after a weight update failed")

    async def _apply_weights(self, m: WeightManifest, frames: list[Any], arrived: float) -> None:
        # recv: learner's send -> this socket; queue: -> this update's turn (task start, and
        # the wait behind an update still being applied)
        phases: dict[str, float] = {"recv": max(0.0, arrived - m.sent_at)}
        if self.control is not None and self.control.pinned is not None:
            self._deferred = (m, frames)  # only the newest is kept; applied on unpin
            log.info("pinned at version %d: update to version %d deferred", self.version, m.version)
            await self._send(
                WeightAck(
                    server_id=self.server_id,
                    version=self.version,
                    ok=True,
                    phases=phases,
                    deferred=True,
                )
            )
            return
        async with self.weight_lock:
            phases["queue"] = max(0.0, time.time() - arrived)
            ack = await self._apply_locked(m, frames, phases)
            await self._send(ack)
            self._retired = None
            if self._repack_pending:
                self._repack_pending = False
                # shortly after the ack: begun at once, the packing slowed the ack's way to
                # the learner (ZeroMQ's I/O threads, the learner's hub) by up to 2 ms on a
                # 2-CPU machine, idle priority or not (two hyperthreads of one core, and one
                # memory bus). A next update cancels it: its reload packs what is left.
                self._repack_timer = asyncio.get_running_loop().call_later(
                    REPACK_AFTER_ACK_S, lambda: self._spawn(self._start_repack())
                )

    async def _start_repack(self) -> None:
        try:
            await self.engine.collective_rpc("climbrl_start_repack")
        except Exception:  # the next reload packs what is left itself
            log.exception("starting the background packing of the new weights failed")

    async def _apply_locked(
        self, m: WeightManifest, frames: list[Any], phases: dict[str, float]
    ) -> WeightAck:
        """recv -> decode -> stage -> pause -> reload -> resume, each phase bounded by
        ``wire.weight_phase_timeout_s``. Any failure leaves the engine on its previous weights
        and version: a reload that fails midway is undone by reloading the previous values of
        every module it touched (``climbrl.weightsync``)."""
        from climbrl.weightsync import map_shm, stage

        pt = self.cfg.wire.weight_phase_timeout_s

        async def phase(name: str, aw: Any) -> Any:
            t = time.perf_counter()
            try:
                return await asyncio.wait_for(aw, timeout=pt)
            except TimeoutError:
                raise TimeoutError(
                    f"weight sync phase {name!r} took longer than {pt:.0f}s "
                    "(wire.weight_phase_timeout_s)"
                ) from None
            finally:
                phases[name] = time.perf_counter() - t

        async def bounded(name: str, aw: Any) -> Any:  # a phase not reported on its own
            try:
                return await asyncio.wait_for(aw, timeout=pt)
            except TimeoutError:
                raise TimeoutError(
                    f"weight sync phase {name!r} took longer than {pt:.0f}s "
                    "(wire.weight_phase_timeout_s)"
                ) from None

        if self._repack_timer is not None:  # the last update's packing: this reload does it
            self._repack_timer.cancel()
            self._repack_timer = None
        rolled_back = False
        resumed = None
        paused, t_pause = None, 0.0
        try:
            if phases["recv"] > pt:
                raise TimeoutError(
                    f"weight sync phase 'recv': the update arrived "
                    f"{phases['recv']:.0f}s after it was sent (limit {pt:.0f}s)"
                )
            ws = self.wstate
            if ws.base is None and m.kind == "full" and ws.version == self.version:
                await phase(
                    "load_initial",
                    asyncio.to_thread(ws.load_initial, self.model_path, self.cfg.model.dtype),
                )
            path, layout = str(self.shm_path), None
            if m.shm_path:  # same host: the learner's file is mapped, not copied
                if not m.adapters:
                    # nothing to copy or merge here, so the engine pauses at once, while the
                    # file is mapped and the manifest checked ("pause" is timed from this send)
                    t_pause = time.perf_counter()
                    paused = asyncio.ensure_future(_pause_keep(self.engine))
                try:
                    mapped = map_shm(m.shm_path, m.tensors, m.shm_offsets)
                except WireError as e:
                    raise _ShmUnreadable(str(e)) from None
                if m.adapters:  # LoRA factors: merged on top of the base, off the loop
                    upd = await phase("decode", asyncio.to_thread(ws.prepare, m, [], mapped))
                else:  # no bytes are touched: a few dicts, not worth a thread hop
                    t_decode = time.perf_counter()
                    upd = ws.prepare(m, [], mapped)
                    phases["decode"] = time.perf_counter() - t_decode
                views = {
                    meta.name: (meta, t, off)
                    for meta, t, off in zip(m.tensors, mapped, m.shm_offsets)
                }
                if all(views.get(n, (None, None))[1] is t for n, t in upd.load.items()):
                    path = m.shm_path  # reload straight from it (no LoRA merge in between)
                    layout = [
                        (n, views[n][0].dtype, list(views[n][0].shape), views[n][2])
                        for n in upd.load
                    ]
            else:
                upd = await phase("decode", asyncio.to_thread(ws.prepare, m, frames))
            if layout is None:
                layout = await phase("stage", asyncio.to_thread(stage, self.shm_path, upd.load))
            full = m.kind == "full" and set(upd.load) == set(upd.base)
            # the learner's file stays as it is until this server acks a newer version
            # (weightsync.ShmRing), so the engine may go on reading it after this reload;
            # this server's staging file is rewritten by the next update
            defer = path == m.shm_path
            # pause (unless already sent), reload and prefix-cache reset go out together, then
            # version and resume: the engine core handles them in order and runs no step while
            # paused, so each waits for its predecessor there instead of for a round trip
            # each. "reload" is timed from this send.
            t_sent = time.perf_counter()
            if paused is None:
                t_pause = t_sent
                paused = asyncio.ensure_future(_pause_keep(self.engine))
            reload = asyncio.ensure_future(
                self.engine.collective_rpc("climbrl_load_weights", args=(path, layout, full, defer))
            )
            # sent now if the engine is idle, else once it is (climbrl.rollout.prefix_cache)
            reset = self.prefix_reset.after_update()
            try:
                try:
                    await phase("pause", paused)
                    phases["pause"] = time.perf_counter() - t_pause
                    took = await phase("reload", reload)
                    phases["reload"] = time.perf_counter() - t_sent
                    # inside the worker; the rest of "reload" is the round trip through the
                    # engine core
                    phases["reload_worker"] = max(t for t, _ in took)
                    # a deferred packing waits for this server's ack (_apply_weights)
                    self._repack_pending = defer and took[0][1] == "cpu_full"
                    if full and took[0][1] == "cpu_full" and not self._logged_full_path:
                        self._logged_full_path = True
                        log.info(
                            "full weight updates load by the short CPU path "
                            "(climbrl.rollout.worker_ext._full_reload_cpu)"
                        )
                except Exception:
                    await asyncio.wait([reload, reset], timeout=pt)  # done with the file
                    rolled_back = await self._roll_back(upd.restore, phase)
                    raise
                t_finish = time.perf_counter()
                version = asyncio.ensure_future(self.engine.update_weight_version(str(m.version)))
                resumed = asyncio.ensure_future(self.engine.resume_generation())
                try:  # bounded: the weight lock is held meanwhile
                    await bounded("reset", reset)
                    await bounded("version", version)
                except TimeoutError:
                    # the engine runs the new weights under an unknown version label: only a
                    # full sync brings it back to a known state (the learner sends one on the
                    # failed ack)
                    ws.base = None
                    raise
                ws.commit(upd)
                # the previous weights, kept for a rollback that is not needed now: freed once
                # the ack is out (freeing the frames of a 500M update takes 0.1 s)
                self._retired, upd.restore = upd.restore, None
                phases["finish"] = time.perf_counter() - t_finish
                self.version = m.version
                if self.control is not None:
                    self.control.version = m.version
            finally:
                if resumed is None:  # failed before the resume went out
                    resumed = asyncio.ensure_future(self.engine.resume_generation())
                await phase("resume", resumed)
            digests: dict[str, str] = {}
            if m.digest:
                digests = (await self.engine.collective_rpc("climbrl_param_digest"))[0]
            return WeightAck(
                server_id=self.server_id,
                version=m.version,
                ok=True,
                phases=phases,
                param_digests=digests,
            )
        except Exception as e:
            log.exception(
                "weight update to version %d failed; staying on version %d", m.version, self.version
            )
            return WeightAck(
                server_id=self.server_id,
                version=self.version,
                ok=False,
                phases=phases,
                error=f"{type(e).__name__}: {e}",
                rolled_back=rolled_back,
                shm_unreadable=isinstance(e, _ShmUnreadable),
            )
        finally:
            if paused is not None and resumed is None:  # failed before its reload went out
                await self._resume_after(paused, phase)

    async def _roll_back(self, restore: dict[str, Any] | None, phase: Any) -> bool:
        """Reload the previous values of the modules a failed reload touched."""
        from climbrl.weightsync import stage

        if restore is None:
            self.wstate.base = None  # engine weights unknown now: only a full sync applies
            log.error("no copy of the previous weights to roll back to")
            return False
        path = self.shm_path.with_suffix(".rollback")
        try:
            layout = await asyncio.to_thread(stage, path, restore)
            await phase(
                "rollback",
                self.engine.collective_rpc("climbrl_load_weights", args=(str(path), layout)),
            )
            return True
        except Exception:
            self.wstate.base = None
            log.exception("rolling back a failed weight update failed too")
            return False
        finally:
            path.unlink(missing_ok=True)


class LearnerStuck(Exception):
    """A send to the learner waited past ``wire.send_timeout_s``: the server stops."""


class _ShmUnreadable(Exception):
    """The learner's same-host weights file could not be mapped here."""


async def _pause_keep(engine: Any) -> None:
    """Freeze in-flight requests (``mode="keep"``, caches kept) for a reload.

    ``AsyncLLM.pause_generation`` adds a fixed 20 ms sleep after the engine core has paused,
    only so that final outputs of aborted/drained requests come out first; with ``keep`` no
    request finishes, so the engine core's own pause is called directly (and the sleep, a
    sixth of a 5M-parameter sync, is skipped). Other engines go through the public call."""
    core = getattr(engine, "engine_core", None)
    pause = getattr(core, "pause_scheduler_async", None)
    if pause is None:
        await engine.pause_generation(mode="keep", clear_cache=False)
    else:
        await pause(mode="keep", clear_cache=False)


def _env_class(name: str) -> Any:
    try:
        return resolve_env(name)
    except ValueError:
        return None  # reported when the first order builds the env


def _expand_versions(spans: Any, n: int, default: int) -> list[int]:
    if not spans:
        return [default] * n
    out = [default] * n
    for sp in spans:
        v = int(sp.version) if str(sp.version).lstrip("-").isdigit() else default
        for i in range(max(0, sp.start), min(n, sp.end)):
            out[i] = v
    return out


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
    if server.learner_stuck is not None:
        log.error("rollout %s exits: %s", server_id, server.learner_stuck)
        return LEARNER_STUCK_EXIT
    return 0

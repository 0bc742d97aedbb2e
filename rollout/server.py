"""Rollout server: one vLLM AsyncLLM engine serving the learner's work orders over ZeroMQ.

    climbrl rollout --config runs/x/config.resolved.toml --endpoint tcp://127.0.0.1:5555 --server-id r0

It connects a DEALER socket to the learner, says hello, heartbeats, and then runs work orders
concurrently: each order is ``group_size`` episodes of an environment, run next to the engine.
Per generated token it records the id, the sampler's log-prob (``processed_logprobs``) and the
weight version that produced it. New weights arrive as frames, are staged in /dev/shm and are
loaded in place while requests are in flight: pause(keep) -> reload -> reset prefix cache ->
version -> resume. If the learner goes silent for ``wire.dead_after_s`` the server exits.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from climbrl.envs.base import Env, make_env

from climbrl.config import Config
from climbrl.wire import (
    ROLLOUT_ACCEPTS,
    Codec,
    Control,
    Error,
    Heartbeat,
    Hello,
    Sample,
    Trajectory,
    WeightAck,
    WeightManifest,
    WireError,
    WorkOrder,
    nbytes_of,
)

log = logging.getLogger("climbrl.rollout")


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
        self.shm_path = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / (
            f"climbrl-{os.getpid()}-{server_id}.weights"
        )
        self._stop = asyncio.Event()
        self._last_learner_msg = time.monotonic()
        self._req = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        from climbrl.rollout.engine import build_engine
        from transformers import AutoTokenizer

        r = self.cfg.rollout
        self.engine = build_engine(
            self.model_path,
            dtype=self.cfg.model.dtype,
            kv_cache_gb=r.kv_cache_gb,
            max_model_len=r.max_model_len,
            enforce_eager=r.enforce_eager,
            max_num_seqs=r.max_concurrency,
            seed=self.cfg.run.seed,
        )
        await self.engine.update_weight_version(str(self.version))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.server_id.encode())
        self.sock.connect(self.endpoint)
        self._last_learner_msg = time.monotonic()
        await self._send(
            Hello(
                server_id=self.server_id,
                pid=os.getpid(),
                hostname=socket.gethostname(),
                policy_version=self.version,
                model=self.model_path,
                max_concurrency=r.max_concurrency,
            )
        )
        log.info("rollout %s up, connected to %s", self.server_id, self.endpoint)
        try:
            await asyncio.gather(self._recv_loop(), self._heartbeat_loop())
        finally:
            for t in list(self.inflight):
                t.cancel()
            self.sock.close(linger=0)
            self.ctx.term()
            self.shm_path.unlink(missing_ok=True)
            try:
                self.engine.shutdown()
            except Exception as e:  # vLLM's own teardown; the process exits anyway
                log.debug("engine shutdown: %s", e)

    async def _send(self, msg: Any, tensors: list[Any] | None = None) -> None:
        async with self.send_lock:
            await self.sock.send_multipart(Codec.encode(msg, tensors), copy=False)

    async def _heartbeat_loop(self) -> None:
        w = self.cfg.wire
        while not self._stop.is_set():
            await self._send(
                Heartbeat(
                    server_id=self.server_id,
                    policy_version=self.version,
                    inflight=len(self.inflight),
                )
            )
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
            self._last_learner_msg = time.monotonic()
            try:
                msg, tensor_frames = self.codec.decode(frames)
            except WireError as e:
                log.error("rejected a message from the learner: %s", e)
                await self._send(
                    Error(origin=self.server_id, code="bad_message", message=str(e))
                )
                continue
            if isinstance(msg, WorkOrder):
                self._spawn(self._run_order(msg))
            elif isinstance(msg, WeightManifest):
                self._spawn(self._apply_weights(msg, tensor_frames))
            elif isinstance(msg, Control):
                if msg.command == "shutdown":
                    log.info("shutdown requested by the learner")
                    self._stop.set()
            elif isinstance(msg, Error):
                log.error("learner reported: %s: %s", msg.code, msg.message)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.inflight.add(t)
        t.add_done_callback(self.inflight.discard)

    # ------------------------------------------------------------------ work orders

    async def _run_order(self, order: WorkOrder) -> None:
        t0 = time.perf_counter()
        try:
            env_probe = make_env(order.env, order.env_args)
            task = env_probe.get_task(order.split, order.task_index)
            samples = await asyncio.gather(
                *(
                    self._episode(order, make_env(order.env, order.env_args), task, i)
                    for i in range(order.group_size)
                )
            )
        except Exception as e:  # an env or engine failure costs this order, never the server
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

    def _encode_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(
            self.tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        )

    async def _generate(self, ids: list[int], sp: Any) -> Any:
        from vllm.inputs import TokensPrompt

        self._req += 1
        rid = f"{self.server_id}-{self._req}"
        # Salting the prefix cache by weight version keeps KV computed by old weights from
        # being reused for new requests (vLLM refuses to reset it while requests hold blocks).
        prompt = TokensPrompt(prompt_token_ids=ids, cache_salt=f"v{self.version}")
        final = None
        async with self.sem:
            async for out in self.engine.generate(prompt, sp, request_id=rid):
                final = out
        return final.outputs[0]

    async def _episode(self, order: WorkOrder, env: Env, task: Any, index: int) -> Sample:
        from vllm import SamplingParams

        s = order.sampling
        try:
            prompt_ids = self._encode_prompt(await env.reset(task))
            ids: list[int] = []
            mask: list[int] = []
            lps: list[float] = []
            vers: list[int] = []
            reward, finish, text_all, info = 0.0, "length", "", {}
            max_len = self.cfg.rollout.max_model_len
            for turn in range(16):
                room = max_len - len(prompt_ids) - len(ids)
                if room <= 0:
                    finish = "context"
                    break
                sp = SamplingParams(
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    max_tokens=min(s.max_tokens, room),
                    logprobs=0,
                    seed=None if s.seed is None else _seed(s.seed, order.order_id, index, turn),
                )
                out = await self._generate(prompt_ids + ids, sp)
                toks = list(out.token_ids)
                ids += toks
                mask += [1] * len(toks)
                lps += [lp[t].logprob for lp, t in zip(out.logprobs, toks)]
                vers += _expand_versions(out.weight_versions, len(toks), self.version)
                finish = out.finish_reason or "length"
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                text_all += text
                res = await env.step(text)
                reward, info = float(res.reward), dict(res.info)
                if res.done or not res.observation:
                    break
                obs = self.tokenizer.encode(res.observation, add_special_tokens=False)
                ids += obs
                mask += [0] * len(obs)
                lps += [0.0] * len(obs)
                vers += [-1] * len(obs)
        finally:
            await env.close()
        return Sample(
            prompt_ids=prompt_ids,
            completion_ids=ids,
            completion_mask=mask,
            logprobs=lps,
            versions=vers,
            reward=reward,
            finish_reason=finish,
            text=text_all,
            metrics={k: float(v) for k, v in info.items()},
        )

    # ------------------------------------------------------------------ weights

    async def _apply_weights(self, m: WeightManifest, frames: list[Any]) -> None:
        phases: dict[str, float] = {"recv": max(0.0, time.time() - m.sent_at)}
        timeout = self.cfg.wire.weight_sync_timeout_s
        async with self.weight_lock:
            try:
                if len(frames) != len(m.tensors):
                    raise WireError(f"manifest lists {len(m.tensors)} tensors, got {len(frames)}")
                t = time.perf_counter()
                layout, off = [], 0
                with open(self.shm_path, "wb") as f:
                    for meta, fr in zip(m.tensors, frames):
                        buf = fr.buffer if hasattr(fr, "buffer") else memoryview(fr)
                        if buf.nbytes != nbytes_of(meta):
                            raise WireError(f"tensor {meta.name}: wrong byte count")
                        f.write(buf)
                        layout.append((meta.name, meta.dtype, list(meta.shape), off))
                        off += buf.nbytes
                phases["stage"] = time.perf_counter() - t
                t = time.perf_counter()
                await self.engine.pause_generation(mode="keep", clear_cache=False)
                phases["pause"] = time.perf_counter() - t
                try:
                    t = time.perf_counter()
                    await asyncio.wait_for(
                        self.engine.collective_rpc(
                            "climbrl_load_weights", args=(str(self.shm_path), layout)
                        ),
                        timeout=timeout,
                    )
                    phases["reload"] = time.perf_counter() - t
                    await self.engine.reset_prefix_cache()
                    await self.engine.update_weight_version(str(m.version))
                    self.version = m.version
                finally:
                    t = time.perf_counter()
                    await self.engine.resume_generation()
                    phases["resume"] = time.perf_counter() - t
                ack = WeightAck(server_id=self.server_id, version=m.version, ok=True, phases=phases)
            except Exception as e:
                log.exception("weight update to version %d failed", m.version)
                ack = WeightAck(
                    server_id=self.server_id,
                    version=self.version,
                    ok=False,
                    phases=phases,
                    error=f"{type(e).__name__}: {e}",
                )
        await self._send(ack)


def _expand_versions(spans: Any, n: int, default: int) -> list[int]:
    if not spans:
        return [default] * n
    out = [default] * n
    for sp in spans:
        v = int(sp.version) if str(sp.version).lstrip("-").isdigit() else default
        for i in range(max(0, sp.start), min(n, sp.end)):
            out[i] = v
    return out


def serve(cfg: Config, endpoint: str, server_id: str, initial_version: int = 0) -> None:
    import uvloop

    server = RolloutServer(cfg, endpoint, server_id, initial_version)
    uvloop.run(server.run())

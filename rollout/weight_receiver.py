"""New weights into a live engine, in phases: ``WeightUpdateReceiver``.

An update is a ``WeightManifest`` from the learner, with the tensors as frames or, on the
learner's host, in a file under /dev/shm. It is loaded while requests are in flight, and one
update at a time (the weight lock), each phase under ``wire.weight_phase_timeout_s``:

1. **receive**: the update's age on arrival, the engine's current weights if this server does
   not know them yet (delta and LoRA updates apply on top of them), then the new tensors:
   the learner's file mapped, or the frames decoded and staged in this server's private file
   (``climbrl.weights.files.private_dir``);
2. **load**: pause (``keep``: requests stay in flight, caches kept), the worker extension's
   reload (``climbrl_load_weights``, ``climbrl.rollout.worker_ext``) and the prefix-cache reset
   (``climbrl.rollout.prefix_cache``) go out together;
3. **commit**: the new version label and the resume go out together; once the reset and the
   label are done, the engine's weights are committed (``climbrl.weights.codecs.EngineWeights``);
4. **resume**: awaited whatever happened before;
5. **verify**: parameter digests, when the learner asks for them;
6. **ack**: a ``WeightAck`` with the phase timings.

On failure the engine stays on its previous weights and version: a reload that fails midway
is **rolled back** by reloading the previous values of every module it touched, and the ack
says so. A failure that leaves the weights unknown makes the next update a full one.

While a client of the OpenAI API pins the served version, updates are deferred (only the
newest is kept) and acked ``deferred``; the unpin applies it.

Tests: ``pytest tests/unit/test_server_weights.py tests/unit/test_failure_paths_waits.py``;
with a real engine, ``tests/integration/test_weight_sync_engine.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from climbrl.rollout.prefix_cache import PrefixCacheReset
from climbrl.wire import WeightAck, WeightManifest, WireError

log = logging.getLogger("climbrl.rollout")


class ShmUnreadable(Exception):
    """The learner's same-host weights file could not be mapped here."""


@dataclass
class _Update:
    """One update on its way to the engine: its manifest, phase timings and futures."""

    m: WeightManifest
    phases: dict[str, float]
    timeout_s: float  # each phase's (wire.weight_phase_timeout_s)
    upd: Any = None  # the prepared update (climbrl.weights.codecs.EngineWeights.prepare)
    path: str = ""  # the file the engine reloads from
    layout: list[Any] | None = None  # (name, dtype, shape, offset) of each tensor in it
    full: bool = False  # every weight is replaced
    defer: bool = False  # the engine reloads straight from the learner's file
    paused: asyncio.Future | None = None
    t_pause: float = 0.0
    t_sent: float = 0.0
    resumed: asyncio.Future | None = None
    rolled_back: bool = False

    async def bounded(self, name: str, aw: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(aw, timeout=self.timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"weight sync phase {name!r} took longer than {self.timeout_s:.0f}s "
                "(wire.weight_phase_timeout_s)"
            ) from None

    async def timed(self, name: str, aw: Awaitable[Any]) -> Any:
        """``bounded``, and its duration in ``phases[name]``."""
        t = time.perf_counter()
        try:
            return await self.bounded(name, aw)
        finally:
            self.phases[name] = time.perf_counter() - t


class WeightUpdateReceiver:
    """The weights of ``engine`` (a vLLM ``AsyncLLM`` with climbrl's worker extension) and
    their ``version``. ``send`` takes each ack to the learner; ``spawn`` runs a background
    task of the server's."""

    def __init__(
        self,
        engine: Any,
        *,
        server_id: str,
        model_path: str,
        dtype: str,
        phase_timeout_s: float,
        version: int,
        send: Callable[[WeightAck], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        prefix_reset: PrefixCacheReset | None = None,
        cpu_fast_path: bool = True,
        repack_delay_s: float = 0.005,
    ):
        from climbrl.weights.codecs import EngineWeights
        from climbrl.weights.files import FrameLanding, private_dir, remove_orphan_files

        self.engine = engine
        self.server_id = server_id
        self.model_path = model_path
        self.dtype = dtype
        self.phase_timeout_s = phase_timeout_s
        self.version = version
        self.send = send
        self.spawn = spawn
        self.prefix_reset = prefix_reset or PrefixCacheReset(engine)
        # rollout.cpu_fast_path: the worker's reload may use climbrl.weights.vllm_cpu
        self.cpu_fast_path = cpu_fast_path
        # rollout.repack_delay_s: a full update's background packing starts this long after
        # its ack (on_manifest), so the ack leaves first
        self.repack_delay_s = repack_delay_s
        self.control: Any = None  # serving.app.ServingControl when the HTTP API is up (pin)
        self.lock = asyncio.Lock()
        self.wstate = EngineWeights(version)  # the engine's weights, for delta/rollback
        shm_root = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp")
        remove_orphan_files(shm_root)  # left by servers killed with -9
        # staging files go in a folder of this process (0700, a random name), removed at exit
        # and on SIGTERM (climbrl.weights.files.private_dir)
        self.shm_path = private_dir(shm_root, "climbrl-rollout") / "staged.weights"
        # a full update's frames land in one of two files here, loaded as the learner's own
        # file on this host would be (climbrl.weights.files.FrameLanding)
        self.landing = FrameLanding(self.shm_path.parent)
        self._deferred: tuple[WeightManifest, list[Any]] | None = None
        self._retired: dict[str, Any] | None = None  # the previous weights, freed after the ack
        self._repack_pending = False
        self._repack_timer: asyncio.TimerHandle | None = None
        self._logged_full_path = False

    def close(self) -> None:
        from climbrl.weights.files import remove_private_dir

        self.landing.close()
        remove_private_dir(self.shm_path.parent)

    # ------------------------------------------------------------------ an update's way

    async def on_manifest(self, m: WeightManifest, frames: list[Any], arrived: float) -> None:
        """Apply an update (or defer it while pinned) and ack it."""
        # recv: learner's send -> this socket; queue: -> this update's turn (task start, and
        # the wait behind an update still being applied)
        phases: dict[str, float] = {"recv": max(0.0, arrived - m.sent_at)}
        if self.control is not None and self.control.pinned is not None:
            self._deferred = (m, frames)  # only the newest is kept; applied on unpin
            log.info("pinned at version %d: update to version %d deferred", self.version, m.version)
            await self.send(
                WeightAck(
                    server_id=self.server_id,
                    version=self.version,
                    ok=True,
                    phases=phases,
                    deferred=True,
                )
            )
            return
        async with self.lock:
            phases["queue"] = max(0.0, time.time() - arrived)
            ack = await self._update(m, frames, phases)
            await self.send(ack)
            self._retired = None
            if self._repack_pending:
                self._repack_pending = False
                # shortly after the ack: begun at once, the packing slows the ack's way to
                # the learner (ZeroMQ's I/O threads, the learner's hub) by up to 2 ms on a
                # 2-CPU machine, idle priority or not (two hyperthreads of one core, and one
                # memory bus). A next update cancels it: its reload packs what is left.
                self._repack_timer = asyncio.get_running_loop().call_later(
                    self.repack_delay_s, lambda: self.spawn(self._start_repack())
                )

    async def on_unpin(self) -> None:
        if self._deferred is not None:
            m, frames = self._deferred
            self._deferred = None
            await self.on_manifest(m, frames, time.time())

    async def _update(
        self, m: WeightManifest, frames: list[Any], phases: dict[str, float]
    ) -> WeightAck:
        """receive -> load -> commit -> resume -> verify -> ack; on failure, roll back."""
        if self._repack_timer is not None:  # the last update's packing: this reload does it
            self._repack_timer.cancel()
            self._repack_timer = None
        u = _Update(m, phases, self.phase_timeout_s)
        try:
            await self._receive(u, frames)
            reload, reset = self._send_load(u)
            try:
                await self._load(u, reload, reset)
                await self._commit(u, reset)
            finally:
                await self._resume(u)
            digests = await self._verify(m)
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
                rolled_back=u.rolled_back,
                shm_unreadable=isinstance(e, ShmUnreadable),
            )
        finally:
            if u.paused is not None and u.resumed is None:  # failed before its reload went out
                await self._resume_after(u)

    # ------------------------------------------------------------------ the phases

    async def _receive(self, u: _Update, frames: list[Any]) -> None:
        """The new tensors, mapped from the learner's file or decoded and staged here."""
        from climbrl.weights.files import stage
        from climbrl.weights.transport import ShmReceiver

        m, ws = u.m, self.wstate
        if u.phases["recv"] > u.timeout_s:
            raise TimeoutError(
                f"weight sync phase 'recv': the update arrived "
                f"{u.phases['recv']:.0f}s after it was sent (limit {u.timeout_s:.0f}s)"
            )
        if ws.base is None and m.kind == "full" and ws.version == self.version:
            await u.timed(
                "load_initial", asyncio.to_thread(ws.load_initial, self.model_path, self.dtype)
            )
        if self.landing.takes(m):  # frames of a full update: written once, into a file here
            landed = await u.timed(
                "land", asyncio.to_thread(self.landing.land, m, frames, ws.files_in_use())
            )
            if landed is not None:
                u.m = m = landed
                frames = []
        u.path = str(self.shm_path)
        if m.shm_path:  # the learner's file on this host, or the frames' landing file here
            if not m.adapters:
                # nothing to copy or merge here, so the engine pauses at once, while the
                # file is mapped and the manifest checked ("pause" is timed from this send)
                u.t_pause = time.perf_counter()
                u.paused = asyncio.ensure_future(_pause_keep(self.engine))
            try:
                mapped = ShmReceiver().receive(m, [])  # read-only views of the file
            except WireError as e:
                raise ShmUnreadable(str(e)) from None
            if m.adapters:  # LoRA factors: merged on top of the base, off the loop
                u.upd = await u.timed("decode", asyncio.to_thread(ws.prepare, m, [], mapped))
            else:  # no bytes are touched: a few dicts, not worth a thread hop
                t_decode = time.perf_counter()
                u.upd = ws.prepare(m, [], mapped)
                u.phases["decode"] = time.perf_counter() - t_decode
            views = {
                meta.name: (meta, t, off) for meta, t, off in zip(m.tensors, mapped, m.shm_offsets)
            }
            if all(views.get(n, (None, None))[1] is t for n, t in u.upd.load.items()):
                u.path = m.shm_path  # reload straight from it (no LoRA merge in between)
                u.layout = [
                    (n, views[n][0].dtype, list(views[n][0].shape), views[n][2]) for n in u.upd.load
                ]
        else:
            u.upd = await u.timed("decode", asyncio.to_thread(ws.prepare, m, frames))
        if u.layout is None:
            u.layout = await u.timed("stage", asyncio.to_thread(stage, self.shm_path, u.upd.load))
        u.full = m.kind == "full" and set(u.upd.load) == set(u.upd.base)
        # the learner's file stays as it is until this server acks a newer version
        # (weights.files.ShmRing), so the engine may go on reading it after this reload;
        # this server's staging file is rewritten by the next update
        u.defer = u.path == m.shm_path

    def _send_load(self, u: _Update) -> tuple[asyncio.Future, asyncio.Future]:
        """Pause (unless already sent), reload and prefix-cache reset go out together: the
        engine core handles them in order and runs no step while paused, so each waits for
        its predecessor there instead of for a round trip each. "reload" is timed from here."""
        u.t_sent = time.perf_counter()
        if u.paused is None:
            u.t_pause = u.t_sent
            u.paused = asyncio.ensure_future(_pause_keep(self.engine))
        reload = asyncio.ensure_future(
            self.engine.collective_rpc(
                "climbrl_load_weights",
                args=(u.path, u.layout, u.full, u.defer, self.cpu_fast_path),
            )
        )
        # sent now if the engine is idle, else once it is (climbrl.rollout.prefix_cache)
        reset = self.prefix_reset.after_update()
        return reload, reset

    async def _load(self, u: _Update, reload: asyncio.Future, reset: asyncio.Future) -> None:
        """The pause and the reload, awaited; a failure rolls the engine back."""
        assert u.paused is not None
        try:
            await u.timed("pause", u.paused)
            u.phases["pause"] = time.perf_counter() - u.t_pause
            took = await u.timed("reload", reload)
            u.phases["reload"] = time.perf_counter() - u.t_sent
            # inside the worker; the rest of "reload" is the round trip through the engine core
            u.phases["reload_worker"] = max(t for t, _ in took)
            # a deferred packing waits for this server's ack (on_manifest)
            self._repack_pending = u.defer and took[0][1] == "cpu_full"
            if u.full and took[0][1] == "cpu_full" and not self._logged_full_path:
                self._logged_full_path = True
                log.info(
                    "full weight updates load by the short CPU path "
                    "(climbrl.weights.vllm_cpu.CpuFastPath.full_reload)"
                )
        except Exception:
            await asyncio.wait([reload, reset], timeout=u.timeout_s)  # done with the file
            u.rolled_back = await self._roll_back(u)
            raise

    async def _commit(self, u: _Update, reset: asyncio.Future) -> None:
        """The version label and the resume go out together; the new weights are this
        server's once the reset and the label are done (bounded: the weight lock is held)."""
        t_finish = time.perf_counter()
        version = asyncio.ensure_future(self.engine.update_weight_version(str(u.m.version)))
        u.resumed = asyncio.ensure_future(self.engine.resume_generation())
        try:
            await u.bounded("reset", reset)
            await u.bounded("version", version)
        except TimeoutError:
            # the engine runs the new weights under an unknown version label: only a full
            # sync brings it back to a known state (the learner sends one on the failed ack)
            self.wstate.base = None
            raise
        self.wstate.commit(u.upd)
        # the previous weights, kept for a rollback that is not needed now: freed once the
        # ack is out (freeing the frames of a 500M update takes 0.1 s)
        self._retired, u.upd.restore = u.upd.restore, None
        u.phases["finish"] = time.perf_counter() - t_finish
        self.version = u.m.version
        if self.control is not None:
            self.control.version = u.m.version

    async def _resume(self, u: _Update) -> None:
        resumed = u.resumed
        if resumed is None:  # failed before the resume went out
            resumed = u.resumed = asyncio.ensure_future(self.engine.resume_generation())
        await u.timed("resume", resumed)

    async def _verify(self, m: WeightManifest) -> dict[str, str]:
        """The engine's parameter digests, if the learner asked for them."""
        if not m.digest:
            return {}
        return (await self.engine.collective_rpc("climbrl_param_digest"))[0]

    # ------------------------------------------------------------------ failure paths

    async def _roll_back(self, u: _Update) -> bool:
        """Reload the previous values of the modules a failed reload touched."""
        from climbrl.weights.files import stage

        restore = u.upd.restore
        if restore is None:
            self.wstate.base = None  # engine weights unknown now: only a full sync applies
            log.error("no copy of the previous weights to roll back to")
            return False
        path = self.shm_path.with_suffix(".rollback")
        try:
            layout = await asyncio.to_thread(stage, path, restore)
            await u.timed(
                "rollback",
                self.engine.collective_rpc(
                    "climbrl_load_weights",
                    args=(str(path), layout, False, False, self.cpu_fast_path),
                ),
            )
            return True
        except Exception:
            self.wstate.base = None
            log.exception("rolling back a failed weight update failed too")
            return False
        finally:
            path.unlink(missing_ok=True)

    async def _resume_after(self, u: _Update) -> None:
        """Resume the engine once its pause (of an update that failed before its reload went
        out) is done; a failure here is logged, the update's is what is reported."""
        paused = u.paused
        assert paused is not None
        await asyncio.wait([paused], timeout=u.timeout_s)
        if paused.done() and not paused.cancelled():
            paused.exception()  # retrieved
        try:
            await u.timed("resume", self.engine.resume_generation())
        except Exception:
            log.exception("resuming the engine after a weight update failed")

    async def _start_repack(self) -> None:
        try:
            await self.engine.collective_rpc("climbrl_start_repack")
        except Exception:  # the next reload packs what is left itself
            log.exception("starting the background packing of the new weights failed")


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

"""The rollout server's weight update, against a fake engine that records its calls
(``rollout.weight_receiver.WeightUpdateReceiver.on_manifest``): the order of the engine calls,
the background packing started only after the ack, and the resume of an update that fails
before its reload. The real engine's side is in tests/integration/test_weight_sync_engine.py."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import torch

from climbrl.config import load_config
from climbrl.learner.weights import WeightPublisher
from climbrl.rollout.weight_receiver import WeightUpdateReceiver


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.args: dict[str, tuple] = {}  # the last call's arguments, by method
        self.engine_core = self

    async def pause_scheduler_async(self, mode: str, clear_cache: bool) -> None:
        assert mode == "keep" and not clear_cache
        self.calls.append("pause")

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append(method)
        self.args[method] = args
        return [(0.001, "cpu_full")] if method == "climbrl_load_weights" else [None]

    def get_num_unfinished_requests(self) -> int:
        return 0  # idle: an update's prefix-cache reset goes out with it

    async def reset_prefix_cache(self) -> bool:
        self.calls.append("reset")
        return True

    async def update_weight_version(self, version: str) -> None:
        self.calls.append(f"version {version}")

    async def resume_generation(self) -> None:
        self.calls.append("resume")


def receiver(tmp_path, engine, send, *overrides: str) -> WeightUpdateReceiver:
    """A receiver for server r0 whose engine's weights are known (no initial load)."""
    cfg = load_config(None, [f'model.path="{tmp_path}"', *overrides])
    tasks: list[asyncio.Task] = []
    rx = WeightUpdateReceiver(
        engine,
        server_id="r0",
        model_path=str(tmp_path),
        dtype=cfg.model.dtype,
        phase_timeout_s=cfg.wire.weight_phase_timeout_s,
        version=0,
        send=send,
        spawn=lambda coro: tasks.append(asyncio.ensure_future(coro)),
        cpu_fast_path=cfg.rollout.cpu_fast_path,
        repack_delay_s=cfg.rollout.repack_delay_s,
    )
    rx.wstate.base = {}
    return rx


@pytest.fixture
def rig(tmp_path):
    engine = FakeEngine()

    async def send(msg, tensors=None):
        engine.calls.append(f"ack {msg.version} {'ok' if msg.ok else 'failed'}")

    srv = receiver(tmp_path, engine, send)
    pub = WeightPublisher(torch.nn.Linear(4, 3), "full", shm_dir=str(tmp_path))
    pub.join("r0", socket.gethostname())  # same host: full syncs through a weights file
    yield srv, pub
    pub.close()
    srv.close()


async def _started(engine, deadline_s=10.0):
    """Wait for the server's timed packing start to reach the engine."""
    t = time.monotonic()
    while "climbrl_start_repack" not in engine.calls:
        assert time.monotonic() - t < deadline_s, engine.calls
        await asyncio.sleep(0.01)


def _update(pub, version):
    ((_, m, frames),) = pub.messages(version, ["r0"])
    assert m.shm_path and frames == []
    return m


@pytest.mark.parametrize("on", [True, False])
async def test_the_cpu_fast_path_flag_reaches_the_worker(tmp_path, on):
    """``rollout.cpu_fast_path`` travels with every reload (climbrl.weights.vllm_cpu)."""
    engine = FakeEngine()

    async def send(msg, tensors=None):
        engine.calls.append(f"ack {msg.version} {'ok' if msg.ok else 'failed'}")

    srv = receiver(tmp_path, engine, send, f"rollout.cpu_fast_path={str(on).lower()}")
    pub = WeightPublisher(torch.nn.Linear(4, 3), "full", shm_dir=str(tmp_path))
    pub.join("r0", socket.gethostname())
    try:
        await srv.on_manifest(_update(pub, 1), [], time.time())
        assert "ack 1 ok" in engine.calls
        path, layout, full, defer, fast = engine.args["climbrl_load_weights"]
        assert full and defer and fast is on
    finally:
        pub.close()
        srv.close()


async def test_same_host_update_calls_the_engine_in_order_and_packs_after_the_ack(rig):
    srv, pub = rig
    await srv.on_manifest(_update(pub, 1), [], time.time())
    assert srv.engine.calls == [
        "pause",
        "climbrl_load_weights",
        "reset",
        "version 1",
        "resume",
        "ack 1 ok",
    ]
    await _started(srv.engine)
    assert srv.engine.calls[6:] == ["climbrl_start_repack"]


async def test_a_next_update_takes_over_the_packing_not_started_yet(rig, monkeypatch):
    srv, pub = rig
    srv.repack_delay_s = 0.5  # the next update comes first
    await srv.on_manifest(_update(pub, 1), [], time.time())
    pub.acked("r0", 1)
    await srv.on_manifest(_update(pub, 2), [], time.time())
    await _started(srv.engine)
    await asyncio.sleep(srv.repack_delay_s + 0.05)  # the first one's, had it stayed
    calls = srv.engine.calls
    assert calls.count("climbrl_start_repack") == 1  # the first one's was cancelled
    assert calls.index("climbrl_start_repack") > calls.index("ack 2 ok")


def test_the_repack_delay_is_the_configs(tmp_path):
    rx = receiver(tmp_path, FakeEngine(), None, "rollout.repack_delay_s=0.25")
    assert rx.repack_delay_s == 0.25


async def test_an_update_failing_before_its_reload_resumes_the_engine(rig, tmp_path):
    srv, pub = rig
    m = _update(pub, 1)
    m.shm_path = str(tmp_path / "gone.weights")
    await srv.on_manifest(m, [], time.time())
    assert srv.engine.calls == ["pause", "resume", "ack 0 failed"]
    await asyncio.sleep(srv.repack_delay_s + 0.05)
    assert "climbrl_start_repack" not in srv.engine.calls


class _ReloadFails(FakeEngine):
    """The first reload fails midway; the rollback's reload goes through."""

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        if method == "climbrl_load_weights" and method not in self.calls:
            self.calls.append(method)
            raise RuntimeError("reload failed midway")
        return await super().collective_rpc(method, args)


async def test_a_failed_reload_is_rolled_back_and_acked_so(tmp_path):
    model = torch.nn.Linear(4, 3)
    engine = _ReloadFails()
    acks = []

    async def send(msg, tensors=None):
        acks.append(msg)

    rx = receiver(tmp_path, engine, send)
    rx.wstate.base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pub = WeightPublisher(model, "full", shm_dir=str(tmp_path))
    pub.join("r0", socket.gethostname())
    try:
        await rx.on_manifest(_update(pub, 1), [], time.time())
    finally:
        pub.close()
        rx.close()
    (ack,) = acks
    assert not ack.ok and ack.rolled_back and ack.version == 0
    assert "reload failed midway" in ack.error and "rollback" in ack.phases
    assert engine.calls == [
        "pause",
        "climbrl_load_weights",
        "reset",
        "climbrl_load_weights",  # the previous weights, back
        "resume",
    ]
    assert rx.version == 0 and rx.wstate.base is not None and not rx.lock.locked()


async def test_frames_of_a_full_update_land_in_a_file_and_pack_after_the_ack(tmp_path):
    """Another host's full update comes as frames: the receiver writes them once into a file
    of its own (weights.files.FrameLanding) and reloads from it like the learner's file on this
    host, so the engine's packing waits until after the ack."""
    engine = FakeEngine()

    async def send(msg, tensors=None):
        engine.calls.append(f"ack {msg.version} {'ok' if msg.ok else 'failed'}")

    srv = receiver(tmp_path, engine, send)
    pub = WeightPublisher(torch.nn.Linear(4, 3), "full", shm_dir=str(tmp_path))
    pub.join("r0", "another-host")
    try:
        ((_, m, frames),) = pub.messages(1, ["r0"])
        assert not m.shm_path and frames  # frames on the wire
        await srv.on_manifest(m, [memoryview(f.numpy()).cast("B") for f in frames], time.time())
        assert engine.calls[:6] == [
            "pause",
            "climbrl_load_weights",
            "reset",
            "version 1",
            "resume",
            "ack 1 ok",
        ]
        await _started(engine)  # deferred, as for a file on this host
        assert srv.wstate.files_in_use()  # the engine's weights view a landed file
    finally:
        pub.close()
        srv.close()

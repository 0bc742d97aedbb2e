"""The rollout server's weight update, against a fake engine that records its calls
(``rollout.server.RolloutServer._apply_weights``): the order of the engine calls, the
background packing started only after the ack, and the resume of an update that fails before
its reload. The real engine's side is in tests/integration/test_weight_sync_engine.py."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import torch

from climbrl.config import load_config
from climbrl.learner.weights import WeightPublisher
from climbrl.rollout import server as server_mod
from climbrl.rollout.server import RolloutServer


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.engine_core = self

    async def pause_scheduler_async(self, mode: str, clear_cache: bool) -> None:
        assert mode == "keep" and not clear_cache
        self.calls.append("pause")

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append(method)
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


@pytest.fixture
def rig(tmp_path):
    cfg = load_config(None, [f'model.path="{tmp_path}"'])
    srv = RolloutServer(cfg, "tcp://127.0.0.1:1", "r0")
    srv.engine = FakeEngine()
    srv.wstate.base = {}  # the engine's weights are known: no initial load from model.path

    async def send(msg, tensors=None):
        srv.engine.calls.append(f"ack {msg.version} {'ok' if msg.ok else 'failed'}")

    srv._send = send
    pub = WeightPublisher(torch.nn.Linear(4, 3), "full", shm_dir=str(tmp_path))
    pub.join("r0", socket.gethostname())  # same host: full syncs through a weights file
    yield srv, pub
    pub.close()


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


async def test_same_host_update_calls_the_engine_in_order_and_packs_after_the_ack(rig):
    srv, pub = rig
    await srv._apply_weights(_update(pub, 1), [], time.time())
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
    monkeypatch.setattr(server_mod, "REPACK_AFTER_ACK_S", 0.5)  # the next update comes first
    await srv._apply_weights(_update(pub, 1), [], time.time())
    pub.acked("r0", 1)
    await srv._apply_weights(_update(pub, 2), [], time.time())
    await _started(srv.engine)
    await asyncio.sleep(server_mod.REPACK_AFTER_ACK_S + 0.05)  # the first one's, had it stayed
    calls = srv.engine.calls
    assert calls.count("climbrl_start_repack") == 1  # the first one's was cancelled
    assert calls.index("climbrl_start_repack") > calls.index("ack 2 ok")


async def test_an_update_failing_before_its_reload_resumes_the_engine(rig, tmp_path):
    srv, pub = rig
    m = _update(pub, 1)
    m.shm_path = str(tmp_path / "gone.weights")
    await srv._apply_weights(m, [], time.time())
    assert srv.engine.calls == ["pause", "resume", "ack 0 failed"]
    await asyncio.sleep(server_mod.REPACK_AFTER_ACK_S + 0.05)
    assert "climbrl_start_repack" not in srv.engine.calls

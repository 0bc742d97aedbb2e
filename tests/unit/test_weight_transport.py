"""The weight transports (``climbrl.weights.transport``): every one delivers the publisher's
tensors bit for bit, the in-process one carries whole publishes (full, then delta) without
sockets, the GPU ones are refused on a host without CUDA, and the CPU fast path inside vLLM
(``climbrl.weights.vllm_cpu``) keeps its state on one object."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from climbrl.learner.weights import WeightPublisher
from climbrl.weights.codecs import EngineWeights, metas
from climbrl.weights.transport import (
    FrameReceiver,
    FrameSender,
    InProcessChannel,
    InProcessReceiver,
    InProcessSender,
    ShmReceiver,
    ShmSender,
    gpu_sender,
    require_cuda,
)
from climbrl.wire import ROLLOUT_ACCEPTS, Codec, WeightManifest, WireError

ROOT = Path(__file__).resolve().parents[2]


def _named() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(6, 5, generator=g)),
        ("b.weight", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("c.bias", torch.arange(7, dtype=torch.int64)),
    ]


def _manifest(named: list[tuple[str, torch.Tensor]], version: int = 1) -> WeightManifest:
    return WeightManifest(version=version, tensors=metas(named), kind="full")


def _same(got: list[torch.Tensor], named: list[tuple[str, torch.Tensor]]) -> None:
    assert len(got) == len(named)
    for t, (name, want) in zip(got, named):
        assert t.dtype == want.dtype and t.shape == want.shape, name
        assert torch.equal(t.view(torch.uint8), want.view(torch.uint8)), name


def test_frames_round_trip_through_the_wire_codec_from_a_snapshot():
    named = _named()
    want = [(n, t.clone()) for n, t in named]
    sender = FrameSender(snapshot=True)
    m, frames = sender.send(1, ["r0"], _manifest(named), [t for _, t in named])
    named[0][1].add_(1.0)  # the next optimizer step: the frames are a snapshot
    wire = [bytes(f) if isinstance(f, memoryview) else f for f in Codec.encode(m, frames)]
    got_m, got_frames = Codec(ROLLOUT_ACCEPTS).decode(wire)
    _same(FrameReceiver().receive(got_m, got_frames), want)
    sender.close()


def test_frames_of_the_wrong_count_are_refused():
    named = _named()
    with pytest.raises(WireError, match="2 frames for 3 tensors"):
        FrameReceiver().receive(_manifest(named), [b"", b""])


def test_shm_round_trip_maps_the_learners_file(tmp_path):
    named = _named()
    sender = ShmSender(tmp_path, ring=True)
    m, frames = sender.send(1, ["r0"], _manifest(named), [t for _, t in named])
    assert frames == [] and m.shm_path.startswith(str(tmp_path))
    _same(ShmReceiver().receive(m, []), named)
    sender.close()
    assert not any(tmp_path.iterdir())  # no file left behind


def test_shm_without_a_file_is_refused():
    with pytest.raises(WireError, match="names no shared-memory file"):
        ShmReceiver().receive(_manifest(_named()), [])


def test_in_process_transport_carries_full_then_delta_publishes_bit_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    pub = WeightPublisher(model, "delta")
    channel = InProcessChannel()
    sender, receiver = InProcessSender(channel), InProcessReceiver()
    eng = EngineWeights(version=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kinds = []
    for version in range(1, 4):
        for servers, m, tensors in pub.messages(version, ["r0"]):
            sender.send(version, servers, m, tensors)
        m, tensors = channel.get("r0")
        kinds.append(m.kind)
        eng.commit(eng.prepare(m, [], receiver.receive(m, tensors)))
        for n, t in model.state_dict().items():
            assert torch.equal(eng.base[n].view(torch.int32), t.view(torch.int32)), n
        model(torch.randn(3, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert kinds == ["full", "delta", "delta"]


def test_in_process_channel_times_out_clearly():
    with pytest.raises(TimeoutError, match="no weight update for r9"):
        InProcessChannel().get("r9", timeout_s=0.01)


@pytest.mark.parametrize("transport", ["cuda_ipc", "nccl"])
def test_gpu_transports_are_refused_without_cuda(transport):
    with pytest.raises(ValueError, match=f"{transport}' needs CUDA.*learner.weights.transport"):
        gpu_sender(transport, lambda call: None, available=lambda: False)


def test_gpu_sender_drives_the_zmq_weight_sync_client_with_cuda():
    calls: list[bytes] = []
    client = gpu_sender("nccl", calls.append, available=lambda: True)
    client.start_weight_update()
    assert len(calls) == 1
    with pytest.raises(ValueError, match="unknown GPU weight transport"):
        gpu_sender("rdma", calls.append, available=lambda: True)  # type: ignore[arg-type]
    require_cuda("cuda_ipc", available=lambda: True)  # no error


def test_the_cpu_fast_path_keeps_no_state_in_module_globals():
    """Everything it changes lives on a ``CpuFastPath`` (or the model): module level holds
    only classes, functions, the logger and imports."""
    tree = ast.parse((ROOT / "climbrl" / "weights" / "vllm_cpu.py").read_text())
    names = [
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    ]
    assert names == ["log"]
    assert not any(isinstance(n, ast.Global) for n in ast.walk(tree))

"""The frames path of a full weight sync without an engine: the learner's snapshot of a step in a
ring slot (``ShmRing``) sent as frames, and the rollout server's landing of those frames in a
file of its own (``FrameLanding``) that the engine reloads from like the learner's same-host
file. Neither ever rewrites memory that a server (or the engine's weights) may still read."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from climbrl.learner.weights import WeightPublisher
from climbrl.weights.codecs import EngineWeights
from climbrl.weights.files import FrameLanding, map_shm, private_dir
from climbrl.wire import WeightManifest, WireError, tensor_buffer, tensor_meta


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(7, 5, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(5, 5, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(3, 5, generator=g),
        "model.norm.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "model.empty": torch.empty(0, 5),
    }


def _full(version: int, sd: dict[str, torch.Tensor]) -> tuple[WeightManifest, list]:
    m = WeightManifest(version=version, tensors=[tensor_meta(n, t) for n, t in sd.items()])
    return m, [tensor_buffer(t) for t in sd.values()]


def _apply(ws: EngineWeights, m: WeightManifest, frames: list) -> None:
    """What the receiver does with a landed manifest (or with frames it decodes)."""
    if m.shm_path:
        ws.commit(ws.prepare(m, [], map_shm(m.shm_path, m.tensors, m.shm_offsets)))
    else:
        ws.commit(ws.prepare(m, frames))


def _same(ws: EngineWeights, sd: dict[str, torch.Tensor]) -> bool:
    assert ws.base is not None
    return set(ws.base) == set(sd) and all(torch.equal(ws.base[n], t) for n, t in sd.items())


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return private_dir(tmp_path, "climbrl-rollout")  # 0700, as the server's


def test_landed_frames_map_back_to_the_same_weights(folder: Path):
    sd = _state(0)
    m, frames = _full(1, sd)
    landing = FrameLanding(folder)
    got = landing.land(m, frames, set())
    assert got is not None and Path(got.shm_path).parent == folder
    assert got.version == 1 and got.tensors == m.tensors and got.kind == "full"
    ws = EngineWeights(0)
    _apply(ws, got, [])
    assert _same(ws, sd) and ws.files_in_use() == {got.shm_path}
    landing.close()
    assert not list(folder.iterdir())


def test_landing_never_rewrites_a_file_the_engine_weights_view(folder: Path):
    landing = FrameLanding(folder)
    ws = EngineWeights(0)
    sds = {v: _state(v) for v in range(1, 6)}
    paths = []
    for v in (1, 2, 3):  # full syncs alternate between the two files
        m, frames = _full(v, sds[v])
        got = landing.land(m, frames, ws.files_in_use())
        assert got is not None
        paths.append(got.shm_path)
        _apply(ws, got, [])
        assert _same(ws, sds[v])
    assert paths[0] == paths[2] != paths[1]
    # a delta (decoded from frames, never landed) leaves its other tensors viewing the file
    name = "model.norm.weight"
    delta = WeightManifest(
        version=4, kind="delta", base_version=3, tensors=[tensor_meta(name, sds[4][name])]
    )
    assert landing.land(delta, [tensor_buffer(sds[4][name])], ws.files_in_use()) is None
    _apply(ws, delta, [tensor_buffer(sds[4][name])])
    at4 = {**sds[3], name: sds[4][name]}
    assert _same(ws, at4) and ws.files_in_use() == {paths[2]}
    # the next full sync goes to the other file; one that fails (not committed) leaves both
    # taken: the file the weights view and the one its background packing may read
    m, frames = _full(5, sds[5])
    got = landing.land(m, frames, ws.files_in_use())
    assert got is not None and got.shm_path == paths[1]
    assert landing.land(*_full(6, sds[5]), ws.files_in_use()) is None
    assert _same(ws, at4)  # nothing the engine's weights view was written
    _apply(ws, got, [])
    assert _same(ws, sds[5]) and ws.files_in_use() == {paths[1]}
    # weights of unknown origin view no file
    ws.base = None
    assert ws.files_in_use() == set()


def test_only_plain_full_updates_land(folder: Path):
    landing = FrameLanding(folder)
    m, frames = _full(1, _state(0))
    for other in (
        msgspec.structs.replace(m, kind="delta", base_version=0),
        msgspec.structs.replace(m, adapters=True, lora_scale=2.0),
        msgspec.structs.replace(m, shm_path="/dev/shm/x", shm_offsets=[0] * len(m.tensors)),
    ):
        assert landing.land(other, frames, set()) is None
    with pytest.raises(WireError, match="manifest lists 5 tensors, got 4"):
        landing.land(m, frames[:4], set())
    short = [*frames[:1], memoryview(bytes(8)), *frames[2:]]
    with pytest.raises(WireError, match="frame has 8 bytes"):
        landing.land(m, short, set())
    assert not list(folder.iterdir())  # refused before any file was written


@pytest.mark.parametrize("shm", [False, True])
def test_remote_frames_are_the_steps_snapshot_in_a_ring_slot(tiny_model, tmp_path, shm: bool):
    """Frames for a server on another host come from a ring slot in process memory (not the
    parameters, not a /dev/shm file), and a slot is rewritten only once that server acked the
    version it holds."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    pub = WeightPublisher(model, "full", shm_dir=str(tmp_path) if shm else None)
    pub.join("far", "another-host")
    params = {t.data_ptr() for t in model.state_dict().values()}

    def step(v: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        ((_, m, frames),) = pub.messages(v, ["far"])
        assert m.kind == "full" and not m.shm_path
        assert pub.ring is None or not pub.ring.slots  # no file written for frames
        assert not {t.data_ptr() for t in frames if t.numel()} & params
        sd = {n: t.clone() for n, t in model.state_dict().items()}
        assert [tm.name for tm in m.tensors] == list(sd)
        assert all(torch.equal(f, sd[tm.name]) for f, tm in zip(frames, m.tensors))
        return frames, sd

    f1, sd1 = step(1)
    f2, sd2 = step(2)
    f3, sd3 = step(3)  # both slots pinned: a clone
    for f, sd in ((f1, sd1), (f2, sd2), (f3, sd3)):  # nothing sent was overwritten
        assert all(torch.equal(x, sd[n]) for x, n in zip(f, sd))
    pub.acked("far", 1)  # version 1 arrived: its slot is free
    f4, sd4 = step(4)
    assert f4[0].data_ptr() == f1[0].data_ptr()
    assert all(torch.equal(x, sd2[n]) for x, n in zip(f2, sd2))  # still pinned: untouched
    pub.dropped("far")  # gone: nothing pins a slot
    f5, _ = step(5)
    assert f5[0].data_ptr() in {f1[0].data_ptr(), f2[0].data_ptr()}
    pub.close()


def test_float32_master_weights_go_out_in_the_engines_dtype():
    """Under bf16 autocast the learner holds float32 weights; the engine loads bfloat16."""
    import torch

    from climbrl.learner.weights import WeightPublisher

    model = torch.nn.Linear(4, 3)  # float32, as the trainer loads it under autocast
    pub = WeightPublisher(model, "full", wire_dtype=torch.bfloat16)
    pub.join("r0", "another-host")
    try:
        ((_, m, frames),) = pub.messages(1, ["r0"])
        assert {t.dtype for t in frames} == {torch.bfloat16}
        assert {meta.dtype for meta in m.tensors} == {"bfloat16"}
        w = dict(zip([meta.name for meta in m.tensors], frames))["weight"]
        assert torch.equal(w, model.weight.detach().to(torch.bfloat16))
    finally:
        pub.close()

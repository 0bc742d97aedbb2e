"""Wire: round trips, zero-copy tensor frames, and rejection of bad frames."""

import msgspec
import pytest
import torch

from climbrl.wire import (
    LEARNER_ACCEPTS,
    ROLLOUT_ACCEPTS,
    SCHEMA_VERSION,
    Codec,
    Heartbeat,
    Sample,
    SamplingSpec,
    Trajectory,
    WeightManifest,
    WireError,
    WorkOrder,
    tensor_from_frame,
    tensor_meta,
)


def test_work_order_round_trip():
    o = WorkOrder(
        order_id="o1",
        policy_version=3,
        env="copy_first",
        task_index=7,
        group_size=4,
        sampling=SamplingSpec(temperature=0.7, max_tokens=5, seed=1),
    )
    msg, frames = Codec(ROLLOUT_ACCEPTS).decode(Codec.encode(o))
    assert msg == o and frames == []
    assert msg.schema == SCHEMA_VERSION


def test_trajectory_round_trip():
    s = Sample(
        prompt_ids=[1, 2],
        completion_ids=[3, 4],
        completion_mask=[1, 0],
        logprobs=[-0.5, 0.0],
        versions=[2, -1],
        reward=1.0,
        finish_reason="stop",
    )
    t = Trajectory(
        order_id="o",
        server_id="r0",
        policy_version=2,
        samples=[s],
        gen_seconds=0.1,
        num_generated_tokens=1,
    )
    msg, _ = Codec(LEARNER_ACCEPTS).decode(Codec.encode(t))
    assert msg == t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_frames_are_zero_copy(dtype):
    a = torch.randn(3, 5).to(dtype)
    b = torch.randn(7).to(dtype)
    m = WeightManifest(version=1, tensors=[tensor_meta("a", a), tensor_meta("b", b)])
    frames = Codec.encode(m, [a, b])
    assert frames[2].obj is not None  # memoryview over the tensor's own storage
    msg, tframes = Codec(ROLLOUT_ACCEPTS).decode(frames)
    ra = tensor_from_frame(msg.tensors[0], tframes[0])
    rb = tensor_from_frame(msg.tensors[1], tframes[1])
    assert torch.equal(ra, a) and torch.equal(rb, b)
    assert ra.data_ptr() == a.data_ptr()  # no copy on either side


def test_foreign_kind_rejected():
    hb = Codec.encode(Heartbeat(server_id="r0", policy_version=0, inflight=0))
    with pytest.raises(WireError, match="not accepted"):
        Codec(ROLLOUT_ACCEPTS).decode(hb)  # a heartbeat is not for the rollout side


@pytest.mark.parametrize(
    "frames",
    [
        [b"work"],
        [b"work", b"\xff\x00garbage"],
        [b"\x00" * 9, b"x"],
        [b"work", msgspec.msgpack.encode({"order_id": 1})],
    ],
)
def test_malformed_rejected(frames):
    with pytest.raises(WireError):
        Codec(ROLLOUT_ACCEPTS).decode(frames)


def test_schema_mismatch_rejected():
    o = WorkOrder(
        order_id="o1",
        policy_version=0,
        env="x",
        task_index=0,
        group_size=2,
        sampling=SamplingSpec(),
    )
    o.schema = SCHEMA_VERSION + 1
    with pytest.raises(WireError, match="schema version"):
        Codec(ROLLOUT_ACCEPTS).decode(Codec.encode(o))


def test_tensor_frame_size_checked():
    m = tensor_meta("a", torch.zeros(4))
    with pytest.raises(WireError, match="bytes"):
        tensor_from_frame(m, b"\x00" * 12)


def test_no_pickle_in_wire():
    import climbrl.wire as w

    src = open(w.__file__).read()
    assert "import pickle" not in src and "cloudpickle" not in src

"""The parts of the GPU weight transports that run without CUDA: which transport a server gets,
the engine arguments, and the encoding of vLLM's weight-sync calls (IPC handles included) on
climbrl's wire, with no pickle."""

from __future__ import annotations

import msgspec
import pytest
import torch

from climbrl.gpu_weights import (
    ZmqWeightSyncClient,
    decode_call,
    decode_ipc_args,
    encode_call,
    encode_ipc_args,
    engine_kwargs,
    pick_transport,
)
from climbrl.wire import WireError


def _ipc_args(cls: type = torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple:
    """Shaped like ``reduce_tensor(cuda_tensor)[1]`` (handles are opaque bytes)."""
    return (
        cls,
        torch.Size([4, 8]),
        (8, 1),
        0,
        torch.TypedStorage,
        dtype,
        0,
        b"\x01" * 64,
        64,
        0,
        False,
        b"ref-counter",
        128,
        b"\x02" * 64,
        True,
    )


def test_transport_follows_where_the_engine_runs():
    assert pick_transport(False, {"GPU-a"}, {"GPU-a"}) == "frames"
    assert pick_transport(True, {"GPU-a"}, set()) == "frames"  # a CPU engine
    assert pick_transport(True, {"GPU-a", "GPU-b"}, {"GPU-a"}) == "ipc"  # colocated
    assert pick_transport(True, {"GPU-a"}, {"GPU-b"}) == "nccl"  # its own GPU, any node
    assert pick_transport(True, {"GPU-a"}, {"GPU-a", "GPU-c"}) == "nccl"  # TP across both
    assert engine_kwargs("frames") == {}
    assert engine_kwargs("ipc") == {"weight_transfer_config": {"backend": "ipc"}}
    with pytest.raises(ValueError, match="use 'ipc', 'nccl' or 'frames'"):
        engine_kwargs("rdma")  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [torch.Tensor, torch.nn.Parameter])
def test_ipc_handles_round_trip_as_plain_msgpack(cls: type):
    args = _ipc_args(cls)
    enc = encode_ipc_args(args)
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(enc))  # no pickle, no extensions
    back = decode_ipc_args(wire)
    assert back == args and type(back[1]) is torch.Size and back[5] is torch.bfloat16


def test_ipc_handles_name_only_known_classes_and_dtypes():
    enc = encode_ipc_args(_ipc_args())
    for i, bad in ((0, "os.system"), (4, "Popen"), (5, "not_a_dtype"), (5, "Tensor")):
        with pytest.raises(WireError, match="not"):
            decode_ipc_args([*enc[:i], bad, *enc[i + 1 :]])
    with pytest.raises(WireError, match="15 fields"):
        decode_ipc_args(enc[:-1])
    with pytest.raises(WireError, match="not one climbrl sends"):
        encode_ipc_args((dict, *_ipc_args()[1:]))


def test_the_four_calls_round_trip_with_their_handles():
    sent: list[bytes] = []
    client = ZmqWeightSyncClient(sent.append)
    client.init_weight_transfer_engine({"master_address": "10.0.0.1", "master_port": 29500})
    client.start_weight_update()
    names = ["model.norm.weight", "lm_head.weight"]
    per_tensor = [{"GPU-a": _ipc_args()}, {"GPU-a": _ipc_args(dtype=torch.float32)}]
    client.update_weights(
        {"names": names, "dtype_names": ["bfloat16", "float32"], "ipc_handles": per_tensor}
    )
    client.update_weights({"names": names, "ipc_handles": {"GPU-a": _ipc_args()}})  # packed
    client.finish_weight_update("7")
    got = [decode_call(b) for b in sent]
    assert [m for m, _, _ in got] == ["init", "start", "update", "update", "finish"]
    assert got[0][1] == {"master_address": "10.0.0.1", "master_port": 29500}
    assert got[2][1]["ipc_handles"] == per_tensor and got[2][1]["names"] == names
    assert got[3][1]["ipc_handles"] == {"GPU-a": _ipc_args()}
    assert got[4][2] == "7" and got[1][2] is None
    with pytest.raises(WireError, match="bad weight-sync call"):
        decode_call(b"\x93junk")
    with pytest.raises(ValueError, match="unknown weight-sync call"):
        encode_call("reload", {})

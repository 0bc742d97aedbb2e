"""Weight sync on GPU: CUDA IPC handles on one node, an NCCL broadcast group across nodes.

The data plane is vLLM's own weight transfer (``vllm.distributed.weight_transfer``), the
engines verl and prime-rl use in the same roles:

- ``ipc``: the learner shares its weights' CUDA memory with an engine on the same GPU (verl's
  colocated rollout): ``IPCTrainerWeightTransferEngine`` exports one handle per tensor
  (``torch.multiprocessing.reductions.reduce_tensor``), the engine's workers open them and
  load the tensors in place, with no copy through the host.
- ``nccl``: the learner is rank 0 of a NCCL group with every engine worker and broadcasts each
  tensor (prime-rl's and slime's separate-GPU and multi-node path):
  ``NCCLTrainerWeightTransferEngine`` on the learner, vLLM's ``NCCLWeightTransferEngine`` in
  the workers, bucketed (``packed``).

The control plane stays climbrl's ZeroMQ wire. vLLM's trainer engines drive the inference side
through a four-call client (``VLLMWeightSyncClient``: init, start, update, finish);
``ZmqWeightSyncClient`` is that client over any ``call(bytes)`` that takes one encoded call to
every rollout server and returns once each has applied it, and ``apply_call`` is the rollout
server's side: it decodes a call and runs it on its ``AsyncLLM``
(``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights``,
``finish_weight_update``). The receiver pauses the engine (``keep``) before ``start`` and
resets the prefix cache and resumes after ``finish``, as for any update.

Nothing is pickled: a call is msgpack, and an IPC handle (the arguments of torch's
``rebuild_cuda_tensor``) travels with its classes and dtype by name, from a fixed list
(``encode_ipc_args``). ``pick_transport`` says which path a server gets. Only the encoding and
the choice run without CUDA; ``tests/integration/test_gpu_weight_transfer.py`` (``gpu``)
checks an IPC handle opened in another process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import msgspec

from climbrl.wire import WireError

Transport = Literal["ipc", "nccl", "frames"]
CALLS = ("init", "start", "update", "finish")

# rebuild_cuda_tensor(tensor_cls, size, stride, offset, storage_cls, dtype, device, handle,
# storage bytes, storage offset, requires_grad, ref counter handle, ref counter offset,
# event handle, event sync required): positions of the fields that are not plain data
_TENSOR_CLS, _SIZE, _STORAGE_CLS, _DTYPE = 0, 1, 4, 5
_N_IPC_ARGS = 15


class _Call(msgspec.Struct, array_like=True):
    method: str
    payload: dict[str, Any]
    version: str | None = None  # finish: the engine's new weight version label


def pick_transport(cuda: bool, learner_gpus: set[str], server_gpus: set[str]) -> Transport:
    """``ipc`` when the server's engine runs on a GPU the learner holds weights on (its
    handles open there without a copy), ``nccl`` for a server on other GPUs of this node or
    another node, ``frames`` (ZeroMQ frames or the same-host file) without CUDA. GPUs are
    named by UUID (``torch.cuda.get_device_properties(i).uuid``), as vLLM's IPC engine keys
    its handles."""
    if not cuda or not server_gpus:
        return "frames"
    if server_gpus <= learner_gpus:
        return "ipc"
    return "nccl"


def engine_kwargs(transport: Transport) -> dict[str, Any]:
    """``AsyncEngineArgs`` fields the rollout engine needs for ``transport``."""
    if transport == "frames":
        return {}
    if transport not in ("ipc", "nccl"):
        raise ValueError(f"weight transport {transport!r}: use 'ipc', 'nccl' or 'frames'")
    return {"weight_transfer_config": {"backend": transport}}


def _classes() -> dict[str, Any]:
    import torch

    return {
        "Tensor": torch.Tensor,
        "Parameter": torch.nn.Parameter,
        "UntypedStorage": torch.UntypedStorage,
        "TypedStorage": torch.TypedStorage,
    }


def encode_ipc_args(args: tuple) -> list[Any]:
    """An IPC handle (``reduce_tensor(t)[1]``) as plain msgpack data: the tensor and storage
    classes and the dtype by name, the size as a list."""
    import torch

    if len(args) != _N_IPC_ARGS:
        raise WireError(f"an IPC handle has {_N_IPC_ARGS} fields, got {len(args)}")
    names = {v: k for k, v in _classes().items()}
    out = list(args)
    for i in (_TENSOR_CLS, _STORAGE_CLS):
        if out[i] not in names:
            raise WireError(f"IPC handle: class {out[i]!r} is not one climbrl sends")
        out[i] = names[out[i]]
    out[_SIZE] = list(out[_SIZE])
    if not isinstance(out[_DTYPE], torch.dtype):
        raise WireError(f"IPC handle: {out[_DTYPE]!r} is not a torch dtype")
    out[_DTYPE] = str(out[_DTYPE]).removeprefix("torch.")
    out[2] = list(out[2])  # stride
    return out


def decode_ipc_args(enc: list[Any]) -> tuple:
    """The arguments of ``rebuild_cuda_tensor`` back from ``encode_ipc_args``; raises
    ``WireError`` for a class or dtype not on climbrl's list."""
    import torch

    if len(enc) != _N_IPC_ARGS:
        raise WireError(f"an IPC handle has {_N_IPC_ARGS} fields, got {len(enc)}")
    classes = _classes()
    out = list(enc)
    for i in (_TENSOR_CLS, _STORAGE_CLS):
        if out[i] not in classes:
            raise WireError(f"IPC handle names class {out[i]!r}, not one climbrl accepts")
        out[i] = classes[out[i]]
    dtype = getattr(torch, str(out[_DTYPE]), None)
    if not isinstance(dtype, torch.dtype):
        raise WireError(f"IPC handle names dtype {out[_DTYPE]!r}, not a torch dtype")
    out[_DTYPE] = dtype
    out[_SIZE] = torch.Size(out[_SIZE])
    out[2] = tuple(out[2])
    return tuple(out)


def _map_handles(payload: dict[str, Any], f: Callable[[Any], Any]) -> dict[str, Any]:
    """``payload`` with every IPC handle passed through ``f``: ``ipc_handles`` is a list of
    {gpu uuid: handle} (one per tensor) or one such dict (packed)."""
    h = payload.get("ipc_handles")
    if h is None:
        return payload
    if isinstance(h, dict):
        h = {u: f(a) for u, a in h.items()}
    else:
        h = [{u: f(a) for u, a in d.items()} for d in h]
    return {**payload, "ipc_handles": h}


def encode_call(method: str, payload: dict[str, Any], version: str | None = None) -> bytes:
    """One call of vLLM's weight-sync client (``CALLS``) as msgpack bytes."""
    if method not in CALLS:
        raise ValueError(f"unknown weight-sync call {method!r}; one of {CALLS}")
    return msgspec.msgpack.encode(_Call(method, _map_handles(payload, encode_ipc_args), version))


def decode_call(data: bytes) -> tuple[str, dict[str, Any], str | None]:
    """(method, payload with IPC handles rebuilt, version) of ``encode_call``'s bytes."""
    try:
        c = msgspec.msgpack.decode(data, type=_Call)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise WireError(f"bad weight-sync call: {e}") from None
    if c.method not in CALLS:
        raise WireError(f"unknown weight-sync call {c.method!r}")
    return c.method, _map_handles(c.payload, decode_ipc_args), c.version


class ZmqWeightSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` over climbrl's wire: each call is encoded and handed to
    ``call``, which takes it to every rollout server and returns once each has applied it (the
    learner's hub and the servers' acks; an error there raises). Pass it to vLLM's
    ``WeightTransferTrainerFactory.trainer_init`` (or a trainer engine's ``trainer_init``)."""

    def __init__(self, call: Callable[[bytes], None]):
        self.call = call

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.call(encode_call("init", init_info))

    def start_weight_update(self) -> None:
        self.call(encode_call("start", {}))

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.call(encode_call("update", update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.call(encode_call("finish", {}, weight_version))


async def apply_call(engine: Any, data: bytes) -> str:
    """Run one encoded call on the rollout server's ``AsyncLLM``; returns its method."""
    from vllm.distributed.weight_transfer.base import (
        WeightTransferInitRequest,
        WeightTransferUpdateRequest,
    )

    method, payload, version = decode_call(data)
    if method == "init":
        await engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=payload))
    elif method == "start":
        await engine.start_weight_update()
    elif method == "update":
        await engine.update_weights(WeightTransferUpdateRequest(update_info=payload))
    else:
        await engine.finish_weight_update(version)
    return method

"""CUDA IPC handles through climbrl's encoding (``climbrl.gpu_weights``): a tensor exported by
one process opens in another on the same GPU, zero-copy, with the exporter's bytes."""

from __future__ import annotations

import multiprocessing as mp

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def _open_and_sum(data: bytes, out: mp.Queue) -> None:
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from climbrl.gpu_weights import decode_call

    _, payload, _ = decode_call(data)
    (handles,) = payload["ipc_handles"]
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    args = list(handles[uuid])
    args[6] = 0  # this process's device index, as vLLM's IPC engine does
    t = rebuild_cuda_tensor(*args)
    out.put((float(t.float().sum()), list(t.shape), str(t.dtype)))


def test_ipc_handle_opens_in_another_process():
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    from climbrl.gpu_weights import encode_call

    w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    _, args = reduce_tensor(w)
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    data = encode_call("update", {"names": ["w"], "ipc_handles": [{uuid: args}]})
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_open_and_sum, args=(data, out))
    p.start()
    try:
        total, shape, dtype = out.get(timeout=120)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert shape == [256, 128] and dtype == "torch.bfloat16"
    assert total == pytest.approx(float(w.float().sum()), rel=1e-5, abs=1e-3)

"""Multi-process learner with torch FSDP2 (``torch.distributed.fsdp.fully_shard``).

Config: ``learner.fsdp = true`` and ``learner.world_size = N`` (one process per GPU; gloo on
CPU, NCCL on GPU). Nothing here acts when ``learner.fsdp`` is false.

Process model (torchrun-style)::

    learner_argv(cfg, [python, -m, climbrl.cli, learn, ...])
      -> [python, -m, torch.distributed.run, --standalone, --nproc-per-node, N,
          -m, climbrl.cli, learn, ...]

Rank 0 is the coordinator the rollout servers know: it alone binds the ZeroMQ hub, owns the
data cursor, writes metrics and checkpoints. Every rank holds one shard of the parameters,
gradients and AdamW state. Per optimizer step:

1. rank 0 broadcasts the batch (``broadcast_groups``: msgspec-encoded trajectories, no pickle);
2. every rank runs its share of the micro-batches (``rank_microbatches``: micro-batch k goes to
   rank k mod N; a rank with fewer runs micro-batch 0 with its loss times 0, so every rank
   does the same number of forward/backward passes, as FSDP's collectives need);
3. each micro-batch loss is already normalised over the whole batch, so the single-process
   gradient is the *sum* over ranks. FSDP2 reduce-scatters the mean, so the backward pass
   takes ``loss * scale`` with the scale ``rank_microbatches`` gives (N; 0 for padding). (A
   divide factor of 1 would say the same, but its PREMUL_SUM is refused by gloo.)
4. ``clip_grad_norm`` (a global norm over the shards) and ``opt.step()`` on every rank;
5. ``reduce_stats`` sums the per-rank loss/entropy/mismatch accumulators (max for ``*_max``).

Publishing weights and checkpoints gather the full state with ``full_state_dict`` (a
collective: every rank calls it; rank 0 gets the tensors, on CPU).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def torchrun_argv(nproc: int, module_argv: list[str], python: str | None = None) -> list[str]:
    """``[-m, pkg.mod, args...]`` (or ``[script, args...]``) as ``nproc`` torchrun processes
    on this node."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nnodes", "1", "--nproc-per-node", str(nproc), *module_argv]


def learner_argv(cfg: Any, argv: list[str]) -> list[str]:
    """The learner command for ``cfg``: unchanged for one process, else run by torchrun.

    ``argv`` is the single-process command, ``[python, -m, climbrl.cli, learn, ...]``.
    """
    lc = cfg.learner
    if not lc.fsdp or lc.world_size <= 1:
        return list(argv)
    if len(argv) < 3 or argv[1] != "-m":
        raise ValueError(f"expected [python, -m, module, ...], got {argv[:3]}")
    return torchrun_argv(lc.world_size, argv[1:], python=argv[0])


def setup(cfg: Any) -> DistState:
    """Join the process group torchrun set up (RANK/WORLD_SIZE/MASTER_* in the environment).

    One process (or ``learner.fsdp`` off): a plain DistState, nothing initialised."""
    lc = cfg.learner
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not lc.fsdp or world <= 1:
        if lc.fsdp and lc.world_size > 1:
            raise RuntimeError(
                f"learner.world_size = {lc.world_size} but this process was not started by "
                "torchrun (WORLD_SIZE unset): start it with learner.fsdp.learner_argv"
            )
        return DistState()
    if world != lc.world_size:
        raise RuntimeError(f"torchrun started {world} processes, learner.world_size is "
                           f"{lc.world_size}")
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend, kind = torch.device("cuda", local_rank), "nccl", "cuda"
    else:
        device, backend, kind = torch.device("cpu"), "gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    mesh = init_device_mesh(kind, (world,))
    return DistState(rank=dist.get_rank(), world_size=world, local_rank=local_rank,
                     device=device, mesh=mesh)


def _block_classes(model: nn.Module) -> set[str]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    inner = getattr(model, "base_model", None)
    if inner is not None and inner is not model:
        names |= set(getattr(inner, "_no_split_modules", None) or [])
    return names


def shard_model(model: nn.Module, cfg: Any, ds: DistState | None = None) -> nn.Module:
    """Apply FSDP2 to ``model`` in place: each transformer block (the HF model's
    ``_no_split_modules``) is its own unit, then the root (embeddings, norm, LM head, tied or
    not). Call it after loading the weights and before building the optimizer. A no-op unless
    learner.fsdp is on and there is more than one process. Losses go backward times the
    ``rank_microbatches`` scale, which turns FSDP's mean over ranks into the sum."""
    from torch.distributed.fsdp import fully_shard

    lc = cfg.learner
    if not lc.fsdp or ds is None or not ds.distributed:
        return model
    if ds.device.type == "cuda":
        model.to(ds.device)
    blocks = _block_classes(model)
    kw = dict(mesh=ds.mesh, reshard_after_forward=lc.fsdp_reshard_after_forward)
    wrapped = 0
    for mod in model.modules():
        if mod is not model and type(mod).__name__ in blocks:
            fully_shard(mod, **kw)
            wrapped += 1
    fully_shard(model, **kw)
    model._climbrl_fsdp_blocks = wrapped  # type: ignore[attr-defined]
    return model


def rank_microbatches(n: int, micro: int, ds: DistState) -> list[tuple[int, float]]:
    """``(start, loss_scale)`` of the micro-batches this rank runs, out of ``n`` samples in
    micro-batches of ``micro``: micro-batch k on rank k mod world, scale = world (FSDP averages
    gradients over ranks; the batch-normalised losses must add up); padded with ``(0, 0.0)``
    (run, but contributes nothing) so every rank runs ceil(#micro-batches / world) passes."""
    starts = list(range(0, n, micro))
    scale = float(ds.world_size)
    mine = [(s, scale) for k, s in enumerate(starts) if k % ds.world_size == ds.rank]
    per_rank = math.ceil(len(starts) / ds.world_size) if starts else 0
    return mine + [(0, 0.0)] * (per_rank - len(mine))


def reduce_stats(acc: dict[str, float], ds: DistState) -> dict[str, float]:
    """Sum the per-rank accumulators over ranks (max for keys ending in ``max``)."""
    if not ds.distributed:
        return dict(acc)
    keys = sorted(acc)
    sums = [k for k in keys if not k.endswith("max")]
    maxes = [k for k in keys if k.endswith("max")]
    out = dict(acc)
    for group, op in ((sums, dist.ReduceOp.SUM), (maxes, dist.ReduceOp.MAX)):
        if group:
            t = torch.tensor([float(acc[k]) for k in group], dtype=torch.float64,
                             device=ds.device)
            dist.all_reduce(t, op=op)
            out.update(zip(group, t.tolist()))
    return out


def _broadcast_bytes(payload: bytes | None, ds: DistState, src: int = 0) -> bytes:
    if ds.rank == src:
        assert payload is not None
        size = torch.tensor([len(payload)], dtype=torch.int64, device=ds.device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=ds.device)
    dist.broadcast(size, src)
    if ds.rank == src:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(ds.device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=ds.device)
    dist.broadcast(buf, src)
    return payload if ds.rank == src else buf.cpu().numpy().tobytes()  # type: ignore[return-value]


def broadcast_groups(groups: list[Any] | None, ds: DistState, src: int = 0) -> list[Any]:
    """Rank ``src`` sends its trajectories to every rank (msgspec msgpack, never pickle)."""
    return broadcast_step("train", groups, ds, src)[1]


def broadcast_step(cmd: str | None, groups: list[Any] | None, ds: DistState,
                   src: int = 0) -> tuple[str, list[Any]]:
    """The coordinator tells the other ranks what to do next: ``("train", groups)``,
    ``("publish", [])``, ``("checkpoint", [])``, ``("stop", [])``. Followers pass None and get
    the command; one process returns its arguments unchanged."""
    import msgspec

    from climbrl.wire import Trajectory

    if not ds.distributed:
        return cmd or "", list(groups or [])
    payload = None
    if ds.rank == src:
        payload = msgspec.msgpack.encode({"cmd": cmd, "groups": list(groups or [])})
    data = _broadcast_bytes(payload, ds, src)
    if ds.rank == src:
        return cmd or "", list(groups or [])
    msg = msgspec.msgpack.decode(data, type=dict[str, str | list[Trajectory]])
    return str(msg["cmd"]), list(msg["groups"])  # type: ignore[arg-type]


def clip_grad_norm(params: Any, max_norm: float) -> float:
    """Global gradient norm over the shards (and clip); a float on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: nn.Module, ds: DistState) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU: a collective (every rank calls it); rank 0 gets the
    tensors, the other ranks an empty dict. Plain ``state_dict()`` for one process."""
    if not ds.distributed:
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_grads(model: nn.Module, ds: DistState) -> dict[str, torch.Tensor]:
    """Unsharded gradients (a collective), for tests and debugging."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().cpu().clone()
    return out


def cleanup(ds: DistState) -> None:
    if ds.distributed and dist.is_initialized():
        dist.destroy_process_group()

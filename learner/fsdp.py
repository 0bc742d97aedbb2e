"""Multi-process learner with torch FSDP2 (``torch.distributed.fsdp.fully_shard``).

Config: ``learner.fsdp = true`` and ``learner.world_size = N`` (one process per GPU; gloo on
CPU, NCCL on GPU). Nothing here acts when ``learner.fsdp`` is false.

Process model (torchrun-style): the launchers start N ranks with ``torch.distributed.run``
(``climbrl.commands.learner_argv``).

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

In the learner (learner/learner.py): ``train`` calls ``setup``; rank 0 runs the ``Learner`` as
the coordinator (hub, cursor, metrics, checkpoints) and, before each collective it starts,
tells the followers what comes with ``broadcast_step``: ``"train@<version>"`` (+ the groups),
``"publish"``, ``"checkpoint"``, ``"stop"``. The other ranks run ``Learner.follow``: the same
model, optimizer and ``train_step``, no sockets. The policy's forward runs inside the root
module's call (``root_forward``) so that FSDP2 gathers the embeddings and the LM head that
``completion_logprobs`` reads. Checkpoints stay the single-process format
(``checkpoint_views``: the full HF weights, ``optimizer.pt`` keyed by parameter index, written
by rank 0), so a run resumes with any world size (``load_optimizer_state``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

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


def setup(cfg: Any) -> DistState:
    """Join the process group torchrun set up (RANK/WORLD_SIZE/MASTER_* in the environment).

    One process (or ``learner.fsdp`` off): a plain DistState, nothing initialised."""
    lc = cfg.learner
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not lc.fsdp or world <= 1:
        if lc.fsdp and lc.world_size > 1:
            raise RuntimeError(
                f"learner.world_size = {lc.world_size} but this process was not started by "
                "torchrun (WORLD_SIZE unset): start it with climbrl.commands.learner_argv"
            )
        return DistState()
    if world != lc.world_size:
        raise RuntimeError(
            f"torchrun started {world} processes, learner.world_size is {lc.world_size}"
        )
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    from climbrl.learner.device import resolve_device

    if resolve_device(cfg.learner).type == "cuda":  # learner.device: NCCL on GPUs
        torch.cuda.set_device(local_rank)
        device, backend, kind = torch.device("cuda", local_rank), "nccl", "cuda"
    else:
        device, backend, kind = torch.device("cpu"), "gloo", "cpu"
    if not dist.is_initialized():
        # followers wait in a broadcast while the coordinator collects rollouts, evaluates or
        # waits for servers: far longer than the default 10-30 min. A rank that dies ends
        # them sooner: torchrun stops the whole group.
        timeout = float(os.environ.get("CLIMBRL_DIST_TIMEOUT_S", 24 * 3600))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    mesh = init_device_mesh(kind, (world,))
    return DistState(
        rank=dist.get_rank(), world_size=world, local_rank=local_rank, device=device, mesh=mesh
    )


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


def rank_microbatches(chunks: list[tuple[int, int]], ds: DistState) -> list[tuple[int, int, float]]:
    """``(start, size, loss_scale)`` of the micro-batches this rank runs out of ``chunks``
    (``(start, size)`` each, ``micro_chunks``): chunk k on rank k mod world, scale = world
    (FSDP averages gradients over ranks; the batch-normalised losses must add up); padded with
    the first chunk at scale 0.0 (run, but contributes nothing) so every rank runs
    ceil(#chunks / world) passes."""
    scale = float(ds.world_size)
    mine = [(s, n, scale) for k, (s, n) in enumerate(chunks) if k % ds.world_size == ds.rank]
    per_rank = math.ceil(len(chunks) / ds.world_size) if chunks else 0
    pad = (chunks[0][0], chunks[0][1], 0.0) if chunks else (0, 0, 0.0)
    return mine + [pad] * (per_rank - len(mine))


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
            t = torch.tensor([float(acc[k]) for k in group], dtype=torch.float64, device=ds.device)
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
        assert payload is not None
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(ds.device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=ds.device)
    dist.broadcast(buf, src)
    return payload if ds.rank == src else buf.cpu().numpy().tobytes()  # type: ignore[return-value]


def broadcast_groups(groups: list[Any] | None, ds: DistState, src: int = 0) -> list[Any]:
    """Rank ``src`` sends its trajectories to every rank (msgspec msgpack, never pickle)."""
    return broadcast_step("train", groups, ds, src)[1]


def broadcast_step(
    cmd: str | None, groups: list[Any] | None, ds: DistState, src: int = 0
) -> tuple[str, list[Any]]:
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
    full = getattr(norm, "full_tensor", None)  # a DTensor's, over the shards
    return float(full() if full is not None else norm)


def root_forward(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run as the forward of ``model``: for an FSDP2 root, its hooks then gather the
    root's parameters (embeddings, final norm, LM head) around ``fn`` and reduce-scatter their
    gradients in backward. ``completion_logprobs`` calls ``model.model`` and reads the LM head
    weight directly, which outside the root's forward are shards. A plain call otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return fn(*args, **kwargs)
    # the instance attribute shadows the class's forward for this one call; the arguments
    # stay out of FSDP's input handling
    model.forward = lambda: fn(*args, **kwargs)
    try:
        return model()
    finally:
        del model.forward


def full_state_dict(model: nn.Module, ds: DistState) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU: a collective (every rank calls it); rank 0 gets the
    tensors, the other ranks an empty dict. Plain ``state_dict()`` for one process. Tied
    parameters (an LM head tied to the embeddings) come out as one tensor under both names,
    as in ``state_dict()``, so ``save_pretrained`` writes the tied copy once, the same way."""
    if not ds.distributed:
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        other = first.setdefault(id(p), name)
        if other != name and other in sd and name in sd:
            sd[name] = sd[other]
    # typed for nested state dicts; a model's full state dict holds tensors
    return cast("dict[str, torch.Tensor]", sd)


def _opt_param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Name of each of ``opt``'s parameters, in the order ``opt.state_dict()`` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


class FullModelView:
    """Stands in for the sharded model in ``save_checkpoint``: rank 0 writes the full weights
    (``full_state_dict``) as the HF folder the single-process learner writes."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]):
        self.model, self.state = model, state

    def save_pretrained(self, folder: str, **kw: Any) -> None:
        self.model.save_pretrained(folder, state_dict=self.state, **kw)  # type: ignore[operator]


class FullOptimizerView:
    """Stands in for the optimizer in ``save_checkpoint``: ``state_dict()`` is the full
    optimizer state keyed by parameter index, as ``torch.optim.Optimizer.state_dict()``."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def checkpoint_views(
    model: nn.Module, opt: torch.optim.Optimizer, ds: DistState
) -> tuple[FullModelView, FullOptimizerView]:
    """Gather the full weights and optimizer state (a collective: every rank calls it; only
    rank 0's views hold anything) in the single-process checkpoint format."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    state = full_state_dict(model, ds)
    # typed as any nesting of state values; an optimizer's is {"state": {name: {...}},
    # "param_groups": [{..., "params": [name, ...]}]}
    osd = cast(
        "dict[str, Any]",
        get_optimizer_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        ),
    )
    if not ds.is_coordinator:
        return FullModelView(model, {}), FullOptimizerView({})
    index = {n: i for i, n in enumerate(_opt_param_names(model, opt))}
    out = {
        "state": {index[n]: v for n, v in osd["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]
        ],
    }
    return FullModelView(model, state), FullOptimizerView(out)


def load_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any], ds: DistState
) -> None:
    """Load a single-process ``optimizer.pt`` (keyed by parameter index) into the sharded
    optimizer (every rank calls it with the same full state and keeps its shard)."""
    if not ds.distributed:
        opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = _opt_param_names(model, opt)
    fqn = {
        "state": {names[int(i)]: v for i, v in sd["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]
        ],
    }
    tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in opt.param_groups]
    set_optimizer_state_dict(model, opt, fqn, options=StateDictOptions(full_state_dict=True))
    for g, keys in zip(opt.param_groups, tuples):  # it hands back betas=(b1, b2) as a list
        for k in keys:
            if isinstance(g.get(k), list):
                g[k] = tuple(g[k])


def full_grads(model: nn.Module, ds: DistState) -> dict[str, torch.Tensor]:
    """Unsharded gradients (a collective), for tests and debugging."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        full = getattr(g, "full_tensor", None)  # a DTensor's, over the shards
        out[name] = (full() if full is not None else g).detach().cpu().clone()
    return out


def cleanup(ds: DistState) -> None:
    if ds.distributed and dist.is_initialized():
        dist.destroy_process_group()

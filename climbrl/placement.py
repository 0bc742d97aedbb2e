"""GPU placement: which GPUs the learner and each rollout server get, separate or colocated.

The ``[placement]`` section of the config picks the mode (``climbrl/config.py``:
``PlacementCfg``); the launchers call the functions here:

- the local launcher (``climbrl/launcher.py``): ``plan_local(cfg, gpu_count())`` gives the
  ``Plan``, ``resolve(cfg, plan)`` the config every child gets (the mode ``auto`` picked,
  the GPU lists filled in), ``child_env(plan, role, visible)`` the ``CUDA_VISIBLE_DEVICES``
  of the learner (``role = "learner"``; torchrun's ranks index it by ``LOCAL_RANK``) and of
  rollout server ``i`` (``role = i``);
- the Ray launcher (``climbrl/launcher_ray.py``): ``ray_num_gpus(cfg)``, the ``num_gpus`` of
  the learner's actor and of each rollout server's (Ray sets their ``CUDA_VISIBLE_DEVICES``);
- the rollout engine (``climbrl/rollout/engine.py``): ``engine_gpu_kwargs(cfg)``, vLLM's
  ``gpu_memory_utilization`` and ``enable_sleep_mode``;
- the config's validation: ``check_config(cfg)``.

Separate: the learner's ranks on GPUs of their own, each rollout server on one more GPU.
Colocated: rollout server ``i`` on the GPU of learner rank ``i``; its engine takes a fraction
of the memory and, with ``sleep_level > 0``, sleeps while the learner steps. Without a CUDA
device nothing here changes a process's environment.

Only ``gpu_count`` imports torch; the rest is pure, so ``climbrl run --help`` stays instant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from climbrl.config import Config

SEPARATE_MEMORY_FRACTION = 0.9  # vLLM's own default: the GPU is the engine's alone
COLOCATED_MEMORY_FRACTION = 0.5  # the other half is the learner's

Role = Literal["learner"] | int


@dataclass(frozen=True)
class Plan:
    """Where each process runs. GPU indices count the devices the launcher sees."""

    mode: Literal["cpu", "separate", "colocated"]
    learner_gpus: tuple[int, ...]  # one per learner rank; empty: the learner is on the CPU
    rollout_gpus: tuple[int, ...]  # rollout server i -> rollout_gpus[i]
    gpu_memory_utilization: float  # per engine; 0.0 without GPUs
    sleep_level: int  # 0: no vLLM sleep mode


def learner_on_gpu(cfg: Config) -> bool:
    return cfg.learner.device != "cpu"


def memory_fraction(mode: str, configured: float) -> float:
    """The engine's share of its GPU: ``placement.gpu_memory_utilization`` or the mode's
    default (``auto`` counts as separate)."""
    if configured > 0:
        return configured
    return COLOCATED_MEMORY_FRACTION if mode == "colocated" else SEPARATE_MEMORY_FRACTION


def _dup(ids: Sequence[int]) -> int | None:
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def _check_lists(
    mode: str, learner: Sequence[int], rollout: Sequence[int], where: str = "placement"
) -> None:
    """Rules every (effective) assignment obeys; ``where`` names what the lists came from."""
    if (i := _dup(learner)) is not None:
        raise ValueError(
            f"{where}.learner_gpus lists GPU {i} twice: one learner process per GPU (two "
            "ranks on one GPU would each hold a full replica of its shard's memory)"
        )
    if (i := _dup(rollout)) is not None:
        raise ValueError(
            f"{where}.rollout_gpus lists GPU {i} twice: each rollout server gets a GPU of "
            "its own; use fewer rollout.num_servers or more GPUs"
        )
    if mode == "separate":
        shared = sorted(set(learner) & set(rollout))
        if shared:
            raise ValueError(
                f"GPU {shared[0]} is in both {where}.learner_gpus and {where}.rollout_gpus "
                "with placement.mode = 'separate': give them different GPUs, or set "
                "placement.mode = 'colocated' to share them"
            )
    if mode == "colocated":
        off = [i for i in rollout if i not in learner]
        if off:
            raise ValueError(
                f"placement.mode = 'colocated' puts each rollout server on a learner GPU, but "
                f"{where}.rollout_gpus has GPU {off[0]}, which is not in learner_gpus "
                f"{list(learner)}: use placement.mode = 'separate' for servers on GPUs of "
                "their own"
            )


def check_config(cfg: Config) -> None:
    """What the config alone can tell (the launcher checks the GPU count): raises
    ValueError naming the field to change."""
    p = cfg.placement
    W, N = cfg.learner.world_size, cfg.rollout.num_servers
    for name, ids in (("learner_gpus", p.learner_gpus), ("rollout_gpus", p.rollout_gpus)):
        if any(i < 0 for i in ids):
            raise ValueError(f"placement.{name} has a negative GPU index: {ids}")
    if p.learner_gpus and not learner_on_gpu(cfg):
        raise ValueError(
            "placement.learner_gpus is set but learner.device = 'cpu': leave learner_gpus "
            "empty, or set learner.device = 'auto' or 'cuda'"
        )
    if p.learner_gpus and len(p.learner_gpus) != W:
        raise ValueError(
            f"placement.learner_gpus has {len(p.learner_gpus)} GPUs but learner.world_size is "
            f"{W}: one GPU per learner process"
        )
    if p.rollout_gpus and len(p.rollout_gpus) != N:
        raise ValueError(
            f"placement.rollout_gpus has {len(p.rollout_gpus)} GPUs but rollout.num_servers is "
            f"{N}: one GPU per rollout server"
        )
    if p.mode == "colocated":
        if not learner_on_gpu(cfg):
            raise ValueError(
                "placement.mode = 'colocated' shares the learner's GPUs with the rollout "
                "servers, but learner.device = 'cpu': set placement.mode = 'separate' (or "
                "'auto'), or learner.device = 'auto'"
            )
        if p.sleep_level and cfg.learner.max_staleness > 0:
            raise ValueError(
                f"placement.sleep_level = {p.sleep_level} puts the colocated engines to sleep "
                "while the learner steps, so no generation can overlap a step: set "
                "learner.max_staleness = 0, or placement.sleep_level = 0 to keep both in "
                "memory at once"
            )
        if N > W:
            raise ValueError(
                f"placement.mode = 'colocated' puts one rollout server on each learner GPU: "
                f"rollout.num_servers ({N}) must not exceed learner.world_size ({W}); use "
                "placement.mode = 'separate' for more servers"
            )
    learner = p.learner_gpus or (list(range(W)) if p.mode == "colocated" else [])
    _check_lists(p.mode, learner, p.rollout_gpus)  # 'auto': duplicates only


def gpu_count() -> int:
    """CUDA devices this process sees (0 without a CUDA build of torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_devices(environ: Mapping[str, str], count: int) -> list[str]:
    """The ids to put in a child's ``CUDA_VISIBLE_DEVICES`` for GPU indices 0..count-1: the
    launcher's own ``CUDA_VISIBLE_DEVICES`` entries when it has one (indices or UUIDs),
    else the indices themselves."""
    own = environ.get("CUDA_VISIBLE_DEVICES")
    if own is None:
        return [str(i) for i in range(count)]
    return [x.strip() for x in own.split(",") if x.strip()][:count]


def plan_local(cfg: Config, n_gpus: int) -> Plan:
    """Where each process of a local run goes on a machine with ``n_gpus`` CUDA devices.
    Raises ValueError when the placement does not fit the machine."""
    p = cfg.placement
    W, N = cfg.learner.world_size, cfg.rollout.num_servers
    if n_gpus <= 0:
        if p.mode != "auto" or p.learner_gpus or p.rollout_gpus:
            raise ValueError(
                f"placement.mode = {p.mode!r} with GPU indices {p.learner_gpus} / "
                f"{p.rollout_gpus} needs CUDA devices, and this machine has none (torch sees "
                "no GPU): remove the [placement] settings, or set placement.mode = 'auto'"
            )
        return Plan("cpu", (), (), 0.0, 0)
    n_learner = W if learner_on_gpu(cfg) else 0
    mode = p.mode
    if mode == "auto":
        mode = "separate" if n_gpus >= n_learner + N or not learner_on_gpu(cfg) else "colocated"
    if mode == "separate":
        learner = list(p.learner_gpus) or list(range(n_learner))
        rollout = list(p.rollout_gpus) or [i for i in range(n_gpus) if i not in learner][:N]
        if len(rollout) < N:
            raise ValueError(
                f"placement.mode = 'separate' needs {n_learner + N} GPUs (learner.world_size "
                f"{n_learner} + rollout.num_servers {N}), and this machine has {n_gpus}: set "
                "placement.mode = 'colocated' (or 'auto'), or lower rollout.num_servers"
            )
    else:
        learner = list(p.learner_gpus) or list(range(W))
        if N > len(learner):
            raise ValueError(
                f"placement.mode = 'colocated' puts one rollout server on each learner GPU, and "
                f"rollout.num_servers ({N}) exceeds learner.world_size ({W}) on this machine's "
                f"{n_gpus} GPUs: lower rollout.num_servers, or add GPUs for 'separate'"
            )
        rollout = list(p.rollout_gpus) or learner[:N]
    _check_lists(mode, learner, rollout)
    high = [i for i in learner + rollout if i >= n_gpus]
    if high:
        raise ValueError(
            f"placement names GPU {high[0]}, and this machine has {n_gpus} (indices 0-"
            f"{n_gpus - 1} of what CUDA_VISIBLE_DEVICES shows): fix placement.learner_gpus / "
            "placement.rollout_gpus"
        )
    return Plan(
        mode,
        tuple(learner),
        tuple(rollout),
        memory_fraction(mode, p.gpu_memory_utilization),
        p.sleep_level if mode == "colocated" else 0,
    )


def resolve(cfg: Config, plan: Plan) -> Config:
    """``cfg`` with the plan written into ``[placement]`` (the mode ``auto`` picked, the GPU
    lists and the memory fraction), for the resolved config every process reads."""
    if plan.mode == "cpu":
        return cfg
    placed = cfg.placement.model_copy(
        update={
            "mode": plan.mode,
            "learner_gpus": list(plan.learner_gpus),
            "rollout_gpus": list(plan.rollout_gpus),
            "gpu_memory_utilization": plan.gpu_memory_utilization,
        }
    )
    return cfg.model_copy(update={"placement": placed})


def child_env(plan: Plan, role: Role, visible: Sequence[str]) -> dict[str, str]:
    """The environment a child adds to the launcher's: its ``CUDA_VISIBLE_DEVICES`` (empty
    for a learner on the CPU, so it starts no CUDA context). Nothing without GPUs."""
    if plan.mode == "cpu":
        return {}
    ids = plan.learner_gpus if role == "learner" else (plan.rollout_gpus[role],)
    return {"CUDA_VISIBLE_DEVICES": ",".join(visible[i] for i in ids)}


def ray_num_gpus(cfg: Config) -> tuple[float, float]:
    """``num_gpus`` of the learner's Ray actor and of each rollout server's.

    ``ray.learner_gpus`` / ``ray.rollout_gpus`` win when either is set. Else 'separate'
    asks ``learner.world_size`` GPUs for the learner (none on the CPU) and one per server;
    'colocated' half a GPU each, which Ray packs onto one GPU (one learner process only: an
    actor takes a fraction of one GPU or whole GPUs); 'auto' asks none (a CPU cluster)."""
    r, p = cfg.ray, cfg.placement
    if r.learner_gpus > 0 or r.rollout_gpus > 0:
        return r.learner_gpus, r.rollout_gpus
    if p.mode == "separate":
        return (float(cfg.learner.world_size) if learner_on_gpu(cfg) else 0.0), 1.0
    if p.mode == "colocated":
        if cfg.learner.world_size > 1:
            raise ValueError(
                "placement.mode = 'colocated' under --launcher ray takes one learner process "
                f"(learner.world_size = {cfg.learner.world_size}): Ray gives an actor a "
                "fraction of one GPU or whole GPUs. Use the local launcher, or "
                "placement.mode = 'separate'"
            )
        return 0.5, 0.5
    return 0.0, 0.0


def engine_gpu_kwargs(cfg: Config) -> dict[str, float | bool]:
    """vLLM engine arguments of a rollout server's placement, applied on CUDA only
    (``rollout/engine.py``): its memory fraction and whether sleep mode is on. A server
    started alone with ``placement.mode = 'auto'`` counts as separate."""
    p = cfg.placement
    return {
        "gpu_memory_utilization": memory_fraction(p.mode, p.gpu_memory_utilization),
        "enable_sleep_mode": p.mode == "colocated" and p.sleep_level > 0,
    }

"""The commands a launcher starts, as argv lists: ``climbrl learn`` (run by torchrun for a
multi-process FSDP learner) and ``climbrl rollout``.

The local and the Ray launcher both build their children's commands here, so neither imports
the learner (or torch) to start one.

    learner_argv(cfg, [python, -m, climbrl.cli, learn, ...])
      -> [python, -m, torch.distributed.run, --standalone, --nnodes, 1, --nproc-per-node, N,
          -m, climbrl.cli, learn, ...]      (learner.fsdp with learner.world_size = N > 1)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def climbrl_argv(python: str | None = None) -> list[str]:
    """``[python, -m, climbrl.cli]``: the start of every child's command."""
    return [python or sys.executable, "-m", "climbrl.cli"]


def torchrun_argv(nproc: int, module_argv: list[str], python: str | None = None) -> list[str]:
    """``[-m, pkg.mod, args...]`` (or ``[script, args...]``) as ``nproc`` torchrun processes
    on this node."""
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        *module_argv,
    ]


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


def learn_command(
    cfg: Any, cfg_path: Path, endpoint_file: Path, resume: bool, python: str | None = None
) -> list[str]:
    """``climbrl learn`` for a run: it binds the endpoint and writes it to ``endpoint_file``."""
    argv = climbrl_argv(python) + [
        "learn",
        "--config",
        str(cfg_path),
        "--endpoint-file",
        str(endpoint_file),
    ]
    return learner_argv(cfg, argv + (["--resume"] if resume else []))


def rollout_command(
    cfg_path: Path, endpoint: str, server_id: str, python: str | None = None
) -> list[str]:
    """``climbrl rollout`` for one server of a run."""
    return climbrl_argv(python) + [
        "rollout",
        "--config",
        str(cfg_path),
        "--endpoint",
        endpoint,
        "--server-id",
        server_id,
    ]

"""climbrl/commands.py: the commands both launchers start (torchrun for an FSDP learner)."""

from __future__ import annotations

import sys
from pathlib import Path

from climbrl.commands import learn_command, rollout_command
from climbrl.config import load_config


def test_learn_command_is_one_process_or_torchrun_ranks() -> None:
    one = load_config(None, ["model.path=m"])
    argv = learn_command(one, Path("c.toml"), Path("ep"), resume=True)
    assert argv == [
        sys.executable,
        "-m",
        "climbrl.cli",
        "learn",
        "--config",
        "c.toml",
        "--endpoint-file",
        "ep",
        "--resume",
    ]
    fsdp = load_config(None, ["model.path=m", "learner.fsdp=true", "learner.world_size=2"])
    ranks = learn_command(fsdp, Path("c.toml"), Path("ep"), resume=False, python="python")
    assert ranks[:3] == ["python", "-m", "torch.distributed.run"]  # the actor's interpreter
    assert ranks[ranks.index("--nproc-per-node") + 1] == "2"
    assert ranks[-7:] == [
        "-m",
        "climbrl.cli",
        "learn",
        "--config",
        "c.toml",
        "--endpoint-file",
        "ep",
    ]


def test_rollout_command_names_its_server() -> None:
    argv = rollout_command(Path("c.toml"), "tcp://127.0.0.1:5555", "r3")
    assert argv[1:] == [
        "-m",
        "climbrl.cli",
        "rollout",
        "--config",
        "c.toml",
        "--endpoint",
        "tcp://127.0.0.1:5555",
        "--server-id",
        "r3",
    ]

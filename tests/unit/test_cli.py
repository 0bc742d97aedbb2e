"""``climbrl <verb> CONFIG [--set k=v] [--print-config]`` for every process: the config is the
first argument, ``--print-config`` prints the resolved TOML (loadable again) and exits, and
``serve`` takes a config as well as a model folder, its flags on top."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from climbrl import cli
from climbrl.config import load_config

ROOT = Path(__file__).resolve().parents[2]
GRPO = str(ROOT / "examples" / "grpo.toml")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", GRPO],
        ["learn", GRPO],
        ["learn", "--config", GRPO],  # the launchers' spelling
        ["rollout", GRPO, "--endpoint", "tcp://127.0.0.1:1"],
    ],
)
def test_print_config_resolves_overrides(argv, capsys, tmp_path):
    rc = cli.main([*argv, "--set", "learner.optim.lr=3e-6", "--print-config"])
    out = capsys.readouterr().out
    assert rc == 0 and tomllib.loads(out)["learner"]["optim"]["lr"] == 3e-6
    (tmp_path / "c.toml").write_text(out)
    assert load_config(str(tmp_path / "c.toml"), []).learner.optim.lr == 3e-6  # loads back


def test_learn_without_a_config_is_a_clear_error(capsys):
    assert cli.main(["learn", "--print-config"]) == 2
    assert "climbrl learn CONFIG.toml" in capsys.readouterr().err


def test_a_bad_key_names_the_field(capsys):
    assert cli.main(["learn", GRPO, "--set", "learner.lrr=1", "--print-config"]) == 2
    assert "lrr" in capsys.readouterr().err


def test_serve_takes_a_config_and_its_flags_win(capsys, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        '[model]\npath = "/models/m"\n[serve]\nport = 9001\nmax_n = 4\n'
        "[rollout]\nkv_cache_gb = 2.0\nmax_model_len = 256\n"
    )
    assert cli.main(["serve", str(cfg), "--max-n", "8", "--print-config"]) == 0
    got = tomllib.loads(capsys.readouterr().out)
    assert got["model"]["path"] == "/models/m" and got["serve"]["port"] == 9001
    assert got["serve"]["max_n"] == 8 and got["rollout"]["kv_cache_gb"] == 2.0

    assert cli.main(["serve", "/models/x", "--print-config"]) == 0  # a folder: port 8000
    got = tomllib.loads(capsys.readouterr().out)
    assert got["model"]["path"] == "/models/x" and got["serve"]["port"] == 8000
    assert got["serve"]["host"] == "127.0.0.1"


def test_env_check_reads_the_env_of_a_config(capsys):
    rc = cli.main(["env-check", GRPO, "--set", "env.args.level=2", "--print-config"])
    out = tomllib.loads(capsys.readouterr().out)
    assert rc == 0 and out["env"]["name"] == load_config(GRPO, []).env.name
    assert out["env"]["args"]["level"] == 2

"""`climbrl pretrain` CLI: config resolution, overrides, errors, and --help without torch.

pytest tests/unit/test_pretrain_cli.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from climbrl.pretrain.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    "name", ["pretrain_demo", "pretrain_moe", "pretrain_continue", "pretrain_sft"]
)
def test_example_configs_resolve(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(EXAMPLES / f"{name}.toml"), "--print-config", "--set", "train.seed=3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["seed"] == 3


def test_invalid_config_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(EXAMPLES / "pretrain_demo.toml"), "--set", "model.num_kv_heads=3"]) == 2
    assert "num_kv_heads" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.toml")]) == 2


def test_help_does_not_import_torch() -> None:
    code = "import sys; from climbrl.pretrain.cli import parse_args\ntry:\n parse_args(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("False")

"""Config: TOML loading, overrides and clear errors."""

import pytest

from climbrl.config import dump_toml, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\npath = "m"\n[learner]\nlr = 0.1\n')
    cfg = load_config(p, ["learner.total_steps=7", "env.args={\"length\": 3}", "run.name=x"])
    assert cfg.learner.lr == 0.1 and cfg.learner.total_steps == 7
    assert cfg.env.args == {"length": 3} and cfg.run.name == "x"


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["model.path=/m", "env.args={\"length\": 3}"])
    p = tmp_path / "r.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("ov, msg", [
    (["model.path=m", "learner.lr=-1"], "learner.lr"),
    (["model.path=m", "learner.bogus=1"], "learner.bogus"),
    ([], "model"),
    (["model.path=m", "learner.publish_every=3", "learner.max_staleness=0"], "publish_every"),
    (["model.path=m", "wire.heartbeat_s=5", "wire.dead_after_s=6"], "dead_after_s"),
    (["model.path=m", "learner=3"], "learner"),
])
def test_bad_values_name_the_field(ov, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(None, ov)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\npath=")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)


def test_cli_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom climbrl.cli import _parser\n"
            "try:\n    _parser().parse_args(['--help'])\nexcept SystemExit: pass\n"
            "print('torch' in sys.modules, 'vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False False")

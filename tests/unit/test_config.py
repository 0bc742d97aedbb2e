"""Config: TOML loading, overrides and clear errors."""

import pytest

from climbrl.config import dump_toml, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\npath = "m"\n[learner.optim]\nlr = 0.1\n')
    cfg = load_config(p, ["learner.total_steps=7", 'env.args={"length": 3}', "run.name=x"])
    assert cfg.learner.optim.lr == 0.1 and cfg.learner.total_steps == 7
    assert cfg.env.args == {"length": 3} and cfg.run.name == "x"


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["model.path=/m", 'env.args={"length": 3}'])
    p = tmp_path / "r.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg


def test_nested_sections_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "model.path=/m",
            'learner.algo.name="ppo"',
            "learner.algo.gamma=0.9",
            "learner.optim.adam_betas=[0.8, 0.95]",
            'learner.weights.mode="lora"',
            'learner.weights.lora.targets=["q_proj"]',
            'learner.offpolicy.correction="tis"',
            "learner.shaping.dynamic_sampling=true",
        ],
    )
    text = dump_toml(cfg)
    for table in ("[learner.optim]", "[learner.algo]", "[learner.weights.lora]"):
        assert table in text
    assert 'name = "ppo"' in text and "critic_lr" in text
    p = tmp_path / "r.toml"
    p.write_text(text)
    back = load_config(p)
    assert back == cfg and type(back.learner.algo).__name__ == "PpoAlgo"
    assert back.learner.algo.gamma == 0.9 and back.learner.weights.lora.targets == ["q_proj"]


def test_objective_fields_live_with_their_objective():
    from climbrl.config import load_config as load

    cfg = load(None, ["model.path=m"])
    assert cfg.learner.algo.name == "grpo" and not hasattr(cfg.learner.algo, "critic")
    cfg = load(None, ["model.path=m", 'learner.algo.name="cispo"'])
    assert not hasattr(cfg.learner.algo, "ratio_cap")
    with pytest.raises(ValueError, match="learner.algo.vf_coef belongs to name = 'ppo'"):
        load(None, ["model.path=m", "learner.algo.vf_coef=1"])
    with pytest.raises(ValueError, match="did you mean `gamma`"):
        load(None, ["model.path=m", 'learner.algo.name="ppo"', "learner.algo.gama=1"])
    with pytest.raises(ValueError, match="learner.algo.name = 'reinforce'"):
        load(None, ["model.path=m", 'learner.algo.name="reinforce"'])


@pytest.mark.parametrize(
    "old, new",
    [
        ("learner.lr=0.1", "learner.lr moved: use learner.optim.lr"),
        ("learner.objective=ppo", "learner.objective moved: use learner.algo.name"),
        ("learner.critic_lr=0.1", "learner.critic_lr moved: use learner.algo.critic_lr"),
        ("learner.dynamic_sampling=true", "use learner.shaping.dynamic_sampling"),
        ("learner.offpolicy_low=0.1", "learner.offpolicy_low moved: use learner.offpolicy.low"),
        ("learner.stale_policy=correct", "use learner.offpolicy.stale_policy"),
        ("learner.weight_sync=lora", "learner.weight_sync moved: use learner.weights.mode"),
        ("learner.lora_r=4", "learner.lora_r moved: use learner.weights.lora.r"),
        ("wire.weight_transport=zmq", "use learner.weights.transport"),
    ],
)
def test_old_flat_keys_name_the_new_key(tmp_path, old, new):
    with pytest.raises(ValueError, match=new) as e:  # as --set
        load_config(None, ["model.path=m", old])
    assert "--set" in str(e.value)
    section, kv = old.split(".", 1)
    key, value = kv.split("=", 1)
    value = value if value[0].isdigit() or value in ("true", "false") else f'"{value}"'
    p = tmp_path / "old.toml"
    p.write_text(f'[model]\npath = "m"\n[{section}]\n{key} = {value}\n')
    with pytest.raises(ValueError, match=new) as e:  # in a file
        load_config(p)
    assert str(p) in str(e.value)


def test_pretrain_shares_the_base_and_loader(tmp_path):
    from climbrl.config import ConfigBase
    from climbrl.pretrain.config import PretrainConfig
    from climbrl.pretrain.config import load_config as load_pretrain

    assert issubclass(PretrainConfig, ConfigBase)
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrain(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_pretrain(bad)


def test_user_constants_are_fields():
    cfg = load_config(
        None,
        [
            "model.path=m",
            "learner.optim.adam_betas=[0.8, 0.9]",
            "rollout.loop_lag_warn_s=2",
            "rollout.repack_delay_s=0.05",
        ],
    )
    assert cfg.learner.optim.adam_betas == (0.8, 0.9)
    assert cfg.rollout.loop_lag_warn_s == 2 and cfg.rollout.repack_delay_s == 0.05


@pytest.mark.parametrize(
    "ov, msg",
    [
        (["model.path=m", "learner.optim.lr=-1"], "learner.optim.lr"),
        (["model.path=m", "learner.bogus=1"], "learner.bogus"),
        ([], "model"),
        (["model.path=m", "learner.publish_every=3", "learner.max_staleness=0"], "publish_every"),
        (["model.path=m", "wire.heartbeat_s=5", "wire.dead_after_s=6"], "dead_after_s"),
        (["model.path=m", "learner=3"], "learner"),
    ],
)
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

    code = (
        "import sys\nfrom climbrl.cli import _parser\n"
        "try:\n    _parser().parse_args(['--help'])\nexcept SystemExit: pass\n"
        "print('torch' in sys.modules, 'vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False False")


@pytest.mark.parametrize(
    "key, hint",
    [
        (
            "learner.bach_groups=4",
            "learner.bach_groups: Extra inputs are not permitted; did you mean `batch_groups`?",
        ),
        ("learnr.total_steps=3", "learnr: Extra inputs are not permitted; did you mean `learner`?"),
        ("wire.max_env_failure=3", "did you mean `max_env_failures`"),
    ],
)
def test_a_mistyped_key_gets_the_closest_field(key, hint):
    with pytest.raises(ValueError) as e:
        load_config(None, ["model.path=m", key])
    assert hint in str(e.value)


def test_no_suggestion_without_a_close_field():
    with pytest.raises(ValueError) as e:
        load_config(None, ["model.path=m", "learner.zzzzzz=1"])
    assert "Extra inputs are not permitted" in str(e.value) and "did you mean" not in str(e.value)
    assert load_config(None, ["model.path=m", 'env.args={"sed": 1}']).env.args == {"sed": 1}


def test_env_name_and_seed_docs_match_the_code():
    from climbrl.config import EnvCfg, RunCfg
    from climbrl.envs.base import BUILTIN_ENVS, ENTRY_POINT_GROUP, resolve_env

    doc = EnvCfg.model_fields["name"].description
    assert ENTRY_POINT_GROUP in doc and "path/to/file.py:Class" in doc and "pkg.mod:Class" in doc
    assert "BUILTIN_ENVS" in doc and "copy_first" in BUILTIN_ENVS and "math" in BUILTIN_ENVS
    with pytest.raises(ValueError) as e:  # "an unknown name's error lists every one"
        resolve_env("no_such_env")
    assert all(name in str(e.value) for name in BUILTIN_ENVS)
    # run.seed does not reach the env: the learner and the servers build it from env.args alone
    assert "does not reach the environment" in RunCfg.model_fields["seed"].description

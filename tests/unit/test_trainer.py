"""The trainer on its own (learner/trainer.py): built around any model, no sockets; the
optimizer takes its settings from the config."""

from __future__ import annotations

import pytest
import torch

from climbrl.config import load_config
from climbrl.learner.trainer import Trainer
from tests.unit.tiny_learner import tiny_qwen3


def test_adamw_takes_the_configured_betas_for_policy_and_critic():
    cfg = load_config(
        None,
        [
            "model.path=m",
            "learner.adam_betas=[0.8, 0.95]",
            "learner.lr=3e-4",
            'learner.objective="ppo"',
            "learner.group_size=1",
            'learner.critic="head"',
        ],
    )
    t = Trainer(cfg, tiny_qwen3(0, 40))
    assert t.opt.param_groups[0]["betas"] == (0.8, 0.95) and t.opt.param_groups[0]["lr"] == 3e-4
    assert t.obj.critic_opt is not None
    assert t.obj.critic_opt.param_groups[0]["betas"] == (0.8, 0.95)


def test_betas_outside_zero_one_are_a_config_error():
    with pytest.raises(ValueError, match=r"learner.adam_betas = \[0.9, 1.0\]"):
        load_config(None, ["model.path=m", "learner.adam_betas=[0.9, 1.0]"])


def test_a_trainer_has_no_socket_and_trains_only_what_requires_grad():
    model = tiny_qwen3(0, 40)
    model.model.embed_tokens.weight.requires_grad_(False)
    t = Trainer(load_config(None, ["model.path=m"]), model)
    params = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert id(model.model.embed_tokens.weight) not in params
    assert params == {id(p) for p in t.trainable()}
    assert not hasattr(t, "hub") and t.snapshot.version is None
    assert isinstance(t.opt, torch.optim.AdamW)

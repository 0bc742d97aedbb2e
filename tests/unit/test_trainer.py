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
    assert t.snapshot.version is None  # no copy until a step takes one
    assert isinstance(t.opt, torch.optim.AdamW)


def test_build_follows_learner_device_and_autocast(tiny_model):
    """``Trainer.build``: float32 master weights on ``learner.device`` under bf16 autocast, and
    a step runs there (CPU here; learner/device.py resolves "auto" to CUDA on a GPU)."""
    from climbrl.learner import fsdp
    from tests.unit.test_objectives_learner import _groups

    cfg = load_config(
        None,
        [
            f"model.path={tiny_model}",
            'learner.device="cpu"',
            'learner.autocast="bf16"',
            "learner.micro_batch_size=4",
            "rollout.max_tokens=6",
            "learner.mask_truncated=false",
        ],
    )
    t = Trainer.build(cfg, fsdp.DistState(), 1.0)
    assert t.prec.device.type == "cpu" and t.prec.autocast_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    from types import SimpleNamespace

    from climbrl.learner.data import DataCursor

    # what _groups reads of a learner: the model (for the fake engine's log-probs), a cursor
    L = SimpleNamespace(
        trainer=t, version=0, cursor=DataCursor(100), batcher=SimpleNamespace(seq_of={})
    )
    st = t.train_step(_groups(L, 2, 4), 0)
    assert st["loss"] == st["loss"] and st["grad_norm"] > 0

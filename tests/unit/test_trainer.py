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
            "learner.optim.adam_betas=[0.8, 0.95]",
            "learner.optim.lr=3e-4",
            'learner.algo.name="ppo"',
            "learner.group_size=1",
            'learner.algo.critic="head"',
        ],
    )
    t = Trainer(cfg, tiny_qwen3(0, 40))
    assert t.opt.param_groups[0]["betas"] == (0.8, 0.95) and t.opt.param_groups[0]["lr"] == 3e-4
    assert t.obj.critic_opt is not None
    assert t.obj.critic_opt.param_groups[0]["betas"] == (0.8, 0.95)


def test_betas_outside_zero_one_are_a_config_error():
    with pytest.raises(ValueError, match=r"learner.optim.adam_betas = \[0.9, 1.0\]"):
        load_config(None, ["model.path=m", "learner.optim.adam_betas=[0.9, 1.0]"])


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
            "learner.shaping.mask_truncated=false",
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


def _batch(rewards: list[list[float]], vocab: int = 40) -> list:
    from climbrl.wire import Sample, Trajectory

    g = torch.Generator().manual_seed(0)
    out = []
    for k, group in enumerate(rewards):
        prompt = torch.randint(1, vocab, (3,), generator=g).tolist()
        samples = []
        for r in group:
            n = int(torch.randint(2, 5, (1,), generator=g))
            samples.append(
                Sample(
                    prompt_ids=prompt,
                    completion_ids=torch.randint(1, vocab, (n,), generator=g).tolist(),
                    completion_mask=[1] * n,
                    logprobs=(-torch.rand(n, generator=g)).tolist(),
                    versions=[0] * n,
                    reward=r,
                    finish_reason="stop",
                )
            )
        out.append(
            Trajectory(
                order_id=f"o{k}",
                server_id="r0",
                policy_version=0,
                samples=samples,
                gen_seconds=0.0,
                num_generated_tokens=0,
            )
        )
    return out


@pytest.mark.parametrize("algo", ["grpo", "gspo", "cispo"])
def test_skipping_zero_advantage_groups_gives_the_same_update_bit_for_bit(algo: str) -> None:
    """Groups whose samples all scored the same have an advantage of exactly 0: leaving their
    micro-batches out changes neither the loss nor any weight after two AdamW steps."""
    rewards = [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 1.0]]
    params: dict[bool, dict[str, torch.Tensor]] = {}
    stats: dict[bool, list[dict]] = {}
    for skip in (False, True):
        cfg = load_config(
            None,
            [
                "model.path=m",
                "learner.group_size=3",
                "learner.micro_batch_size=3",
                "rollout.max_tokens=4",
                "learner.shaping.mask_truncated=false",
                "learner.optim.lr=1e-2",
                f'learner.algo.name="{algo}"',
                f"learner.skip_zero_advantage={str(skip).lower()}",
            ],
        )
        model = tiny_qwen3(0, 40)
        t = Trainer(cfg, model)
        stats[skip] = [t.train_step(_batch(rewards), v) for v in (0, 1)]
        params[skip] = {k: v.clone() for k, v in model.state_dict().items()}
    assert [s["skipped_samples"] for s in stats[True]] == [6, 6]  # groups 0 and 2
    assert [s["skipped_samples"] for s in stats[False]] == [0, 0]
    for a, b in zip(stats[False], stats[True]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    moved = [
        k
        for k in params[False]
        if not torch.equal(params[False][k], tiny_qwen3(0, 40).state_dict()[k])
    ]
    assert moved  # the steps moved the weights ...
    for k in params[False]:  # ... to the same values, bit for bit
        assert torch.equal(params[False][k], params[True][k]), k


def test_an_all_idle_batch_still_steps_the_optimizer_and_reports() -> None:
    """Every group scored the same: one micro-batch still runs (zero gradients), so AdamW
    moves the weights by its momentum exactly as without the skip, and the metrics exist."""
    cfg = load_config(
        None,
        [
            "model.path=m",
            "learner.group_size=2",
            "learner.micro_batch_size=2",
            "rollout.max_tokens=4",
            "learner.shaping.mask_truncated=false",
        ],
    )
    t = Trainer(cfg, tiny_qwen3(0, 40))
    st = t.train_step(_batch([[1.0, 1.0], [0.0, 0.0]]), 0)
    assert st["skipped_samples"] == 2 and st["grad_norm"] == 0.0
    assert st["entropy"] > 0 and st["loss"] == 0.0


def test_skipping_is_off_where_a_term_does_not_scale_with_the_advantage() -> None:
    for extra in (
        ["learner.algo.entropy_coef=0.01"],
        ['learner.algo.name="ppo"', 'learner.algo.critic="head"'],
        ["learner.skip_zero_advantage=false"],
    ):
        cfg = load_config(
            None,
            [
                "model.path=m",
                "learner.group_size=2",
                "learner.micro_batch_size=2",
                "rollout.max_tokens=4",
                "learner.shaping.mask_truncated=false",
                *extra,
            ],
        )
        t = Trainer(cfg, tiny_qwen3(0, 40))
        st = t.train_step(_batch([[1.0, 1.0], [0.0, 1.0]]), 0)
        assert st["skipped_samples"] == 0, extra

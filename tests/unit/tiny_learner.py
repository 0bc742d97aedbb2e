"""Shared by the learner unit tests: a tiny dense Qwen3 and a Trainer around given models that
runs the real ``train_step`` (no sockets, no engine)."""

from __future__ import annotations

import torch

from climbrl.config import load_config
from climbrl.learner.trainer import Trainer


def tiny_qwen3(seed: int, vocab: int) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(cfg).float().eval()


def bare_learner(
    policy: torch.nn.Module,
    temperature: float,
    *,
    ref: torch.nn.Module | None = None,
    overrides: list[str] | None = None,
) -> Trainer:
    """Groups of two, micro-batches of two, a zero-lr optimizer: one ``train_step`` reports
    the loss and its statistics without moving the weights."""
    cfg = load_config(
        None,
        [
            "model.path=m",
            "learner.group_size=2",
            "learner.micro_batch_size=2",
            f"rollout.temperature={temperature}",
            "rollout.max_tokens=4",
            "learner.shaping.mask_truncated=false",
            *(overrides or []),
        ],
    )
    return Trainer(cfg, policy, ref=ref, opt=torch.optim.SGD(policy.parameters(), lr=0.0))

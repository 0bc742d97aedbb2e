"""Tiny models for tests and first runs: a locally trained tokenizer and a random Qwen3.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the text you give
(``climbrl.tokenizer``). The model is a randomly initialised transformers Qwen3 (dense) or
Qwen3-MoE, saved as safetensors with config and tokenizer (ChatML chat template), so vLLM and
transformers load it. Tests build their models here, and it imports neither the environments
nor pretraining (``climbrl tiny-model``, which fits the tokenizer to an environment, is
``climbrl.envs.tinymodel``).

    from climbrl.tinymodel import make_tiny_model
    make_tiny_model("tiny/", ["some text", ...], moe=False)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def make_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 384,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    moe: bool = False,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Train a tokenizer on `texts`, build a random Qwen3(-MoE) and save both to `out_dir`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from climbrl.tokenizer import train_bpe_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(list(texts), vocab_size=vocab_size, out_dir=out, min_frequency=1)
    # The embedding matrix must cover every id the tokenizer can emit.
    real_vocab = len(tok)
    common: dict[str, Any] = dict(
        vocab_size=real_vocab,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    if moe:
        cfg = Qwen3MoeConfig(
            **common,
            intermediate_size=intermediate_size,
            moe_intermediate_size=intermediate_size // 2,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            decoder_sparse_step=1,
            norm_topk_prob=True,
        )
        model = Qwen3MoeForCausalLM(cfg)
    else:
        cfg = Qwen3Config(**common, intermediate_size=intermediate_size)
        model = Qwen3ForCausalLM(cfg)
    model = model.to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "climbrl_model.json").write_text(json.dumps({"params": n_params, "moe": moe}))
    return out

"""Model presets, document masking, MoE balancing, schedules, optimizers, config and export.

pytest tests/unit/test_pretrain_model.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from climbrl.config import apply_overrides
from climbrl.pretrain import model as M
from climbrl.pretrain.config import (
    ModelConfig,
    PretrainConfig,
    TrainConfig,
    load_config,
)
from climbrl.pretrain.train import build_optimizers, lr_factor

TINY = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)
TINY_MOE = dict(TINY, moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def tiny(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    return M.build_model(cfg, vocab_size=64, eos_id=0, pad_id=1, seed=seed).eval()


def test_dense_preset_is_qwen3_with_gqa_and_qk_norm() -> None:
    m = tiny(ModelConfig(**TINY))
    assert m.config.model_type == "qwen3"
    attn = m.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 8  # 2 KV heads x head_dim 8 (GQA)
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")


def test_packed_documents_do_not_attend_across_boundaries() -> None:
    m = tiny(ModelConfig(**TINY))
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12, 13]])
    packed = torch.cat([a, b], 1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad():
        lp = m(input_ids=packed, position_ids=pos, use_cache=False).logits
        lb = m(input_ids=b, use_cache=False).logits
        la = m(input_ids=a, use_cache=False).logits
        leaky = m(input_ids=packed, use_cache=False).logits  # plain causal: B sees A
    torch.testing.assert_close(lp[:, 5:], lb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lp[:, :5], la, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaky[:, 5:], lb, atol=1e-3)


def test_moe_presets_and_shared_expert() -> None:
    m = tiny(ModelConfig(**TINY_MOE))
    assert m.config.model_type == "qwen3_moe"
    assert len(M.routers(m)) == 2
    total, active = M.matmul_params(m)
    assert active < total
    shared = tiny(ModelConfig(**TINY_MOE, shared_expert_intermediate_size=32))
    assert shared.config.model_type == "qwen2_moe"
    with pytest.raises(ValueError, match="needs moe"):
        ModelConfig(**TINY, shared_expert_intermediate_size=32)


def test_global_batch_balance_loss_accumulates_counts() -> None:
    cfg = ModelConfig(**TINY_MOE, balance="aux_loss")
    m = tiny(cfg).train()
    rs = M.routers(m)
    m(input_ids=torch.randint(2, 64, (2, 12)), use_cache=False)
    first = [r.last_counts.clone() for r in rs]
    assert first[0].sum() == 2 * 12 * 2  # tokens x top-k
    loss1 = M.balance_loss(m, cfg)
    assert loss1 is not None and loss1.requires_grad
    # Second micro-batch of the same step: f_i counts both micro-batches (the global batch).
    m(input_ids=torch.randint(2, 64, (2, 12)), use_cache=False)
    terms = []
    for r, c1 in zip(rs, first, strict=True):
        f = (c1 + r.last_counts) / (c1 + r.last_counts).sum()
        terms.append(4 * (f * r.last_probs_mean).sum())
    loss2 = M.balance_loss(m, cfg)
    assert loss2.item() == pytest.approx((sum(terms) / 2).item(), rel=1e-5)
    assert rs[1].step_counts.sum() == 2 * first[1].sum()
    loss2.backward()
    assert rs[0].weight.grad is not None and rs[0].weight.grad.abs().sum() > 0
    stats = M.end_step_balance(m, cfg)
    assert stats["moe_max_over_mean_load"] >= 1.0 and rs[0].step_counts.sum() == 0


def test_aux_free_bias_steers_choice_not_weights() -> None:
    w = torch.nn.Parameter(torch.randn(4, 8))
    r = M.BalancedRouter(w, top_k=2, norm_topk_prob=True, use_bias=True).train()
    h = torch.randn(10, 8)
    r.expert_bias[3] = 10.0
    _, weights, idx = r(h)
    assert (idx == 3).any(dim=-1).all()  # the bias forces expert 3 into every top-2
    probs = torch.softmax(h @ w.T, -1)
    sel = probs.gather(-1, idx)
    torch.testing.assert_close(weights, (sel / sel.sum(-1, keepdim=True)).to(weights.dtype))
    # The update lowers the bias of overloaded experts and raises that of idle ones.
    cfg = ModelConfig(**TINY_MOE, balance="aux_free", bias_update_rate=0.5)
    m = tiny(cfg).train()
    rr = M.routers(m)[0]
    rr.step_counts.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    before = rr.expert_bias.clone()
    M.end_step_balance(m, cfg)
    assert (rr.expert_bias - before).tolist() == [-0.5, 0.5, 0.0, 0.0]


def test_lr_schedules() -> None:
    cos = TrainConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cos) == pytest.approx(0.1)
    assert lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(10, cos) == pytest.approx(1.0)
    assert lr_factor(55, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, cos) == pytest.approx(0.1)
    wsd = TrainConfig(
        steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0
    )
    assert lr_factor(50, wsd) == 1.0 and lr_factor(79, wsd) == 1.0
    assert lr_factor(90, wsd) == pytest.approx(0.5)
    assert lr_factor(100, wsd) == pytest.approx(0.0)


def test_muon_takes_hidden_matrices_only() -> None:
    m = tiny(ModelConfig(**TINY)).train()
    opts = build_optimizers(m, TrainConfig(optimizer="muon", steps=10, warmup_steps=1))
    assert [type(o).__name__ for o in opts] == ["AdamW", "Muon"]
    muon_ids = {id(p) for g in opts[1].param_groups for p in g["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in muon_ids}
    assert any("q_proj" in n for n in names) and any("down_proj" in n for n in names)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    ids = torch.randint(2, 64, (2, 16))
    before = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for o in opts:
        o.step()
    assert not torch.equal(before, m.model.layers[0].self_attn.q_proj.weight)


def test_flops_per_token() -> None:
    m = tiny(ModelConfig(**TINY))
    total, active = M.matmul_params(m)
    assert total == active
    # 2 layers x (q 32x32 + k,v 32x16 each + o 32x32 + mlp 3 x 32x64) + lm_head 32x64
    assert total == 2 * (1024 + 512 + 512 + 1024 + 3 * 2048) + 2048
    assert M.train_flops_per_token(m, 16) == 6 * total + 6 * 2 * 4 * 8 * 16


def test_train_flops_count_document_masked_attention() -> None:
    import numpy as np

    m = tiny(ModelConfig(**TINY))
    _, active = M.matmul_params(m)
    per_pair = 12 * 2 * 4 * 8  # (QK^T + AV) x 2 FLOPs x 3 (fwd+bwd), x layers*heads*head_dim
    # One row of 16 = one document: the causal triangle, 16*17/2 pairs.
    one_doc = np.arange(16)[None]
    assert M.attention_pairs(one_doc) == 136
    assert M.train_flops(m, one_doc) == 6 * active * 16 + per_pair * 136
    # The same row as documents of 10 and 6 tokens: 55 + 21 pairs.
    two_docs = np.concatenate([np.arange(10), np.arange(6)])[None]
    assert M.attention_pairs(two_docs) == 76
    assert M.train_flops(m, two_docs) == 6 * active * 16 + per_pair * 76
    # The per-token formula is the unpacked row's count, up to the diagonal (n^2/2 vs n(n+1)/2).
    assert M.train_flops_per_token(m, 16) * 16 == 6 * active * 16 + per_pair * 16 * 16 / 2


def test_config_overrides_presets_and_validation(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'run_dir = "x"\n[model]\npreset = "moe-small"\n[train]\nsteps = 50\nwarmup_steps = 5\n'
    )
    cfg = load_config(
        f, ["train.lr=1e-3", "model.num_experts=8", "run_dir=runs/y", "train.optimizer=muon"]
    )
    assert cfg.train.lr == 1e-3 and cfg.model.num_experts == 8 and cfg.model.moe
    assert cfg.run_dir == "runs/y" and cfg.train.optimizer == "muon"
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="extra"):
        PretrainConfig.model_validate({"train": {"stepz": 1}})
    with pytest.raises(ValueError, match="unknown model preset"):
        load_config(None, ["model.preset=nope"])
    with pytest.raises(ValueError, match="replay_dir"):
        load_config(None, ["init.replay_ratio=0.5"])
    assert apply_overrides({}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}


@pytest.mark.parametrize("fields", [TINY, TINY_MOE])
def test_export_reloads_in_transformers(tmp_path: Path, fields: dict) -> None:
    from transformers import AutoModelForCausalLM

    from climbrl.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["1+2=3", "12+30=42"] * 10, vocab_size=300, split_digits=True)
    cfg = ModelConfig(**fields)
    m = M.build_model(
        cfg, vocab_size=len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0
    ).eval()
    M.export(m, tok, str(tmp_path))
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([tok("12+30=")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=ids).logits, m(input_ids=ids).logits, atol=1e-5, rtol=1e-4
        )
    assert (tmp_path / "model.safetensors").exists()
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_loss_terms_match_cross_entropy_and_z_loss() -> None:
    import torch.nn.functional as F

    from climbrl.pretrain.train import loss_terms

    m = tiny(ModelConfig(**TINY))
    ids = torch.randint(2, 64, (2, 10))
    pos = torch.arange(10).repeat(2, 1)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[0, 3] = -100
    ce, zl = loss_terms(m, ids, pos, labels, z_coef=1e-4)
    logits = m(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(
        ce, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    )
    lse = torch.logsumexp(logits, -1)[labels != -100]
    torch.testing.assert_close(zl, (lse**2).mean())

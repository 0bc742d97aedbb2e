"""Router replay per MoE family (climbrl.learner.replay): the routers ``forced_routing``
supports rebuild their family's weights exactly at the forced experts, and any other router
class is refused.

Tiny random float32 models on CPU: Qwen3-MoE, Qwen2-MoE and Mixtral (softmax top-k) and
DeepSeek-V3 (sigmoid scores, e_score_correction_bias and group-limited top-k for the
selection only, routed_scaling_factor on the weights). Replaying a model's own routing must
leave its logits unchanged, and forced experts must get the weights the family's router
computes for them.

Run: ``pytest tests/unit/test_replay_routers.py`` (no engine; a few seconds).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from climbrl.learner.replay import forced_routing, model_moe_shape, moe_routers

TOL = 1e-5
V, H = 64, 32


def _qwen3_moe() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            tie_word_embeddings=False,
        )
    )


def _qwen2_moe() -> torch.nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            tie_word_embeddings=False,
        )
    )


def _mixtral() -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(
        MixtralConfig(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=32,
            num_local_experts=6,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        )
    )


def _deepseek_v3() -> torch.nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    # 3 layers, the first dense; 8 experts in 4 groups, top-2 of the 2 best groups.
    return DeepseekV3ForCausalLM(
        DeepseekV3Config(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_shared_experts=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            tie_word_embeddings=False,
        )
    )


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "mixtral": _mixtral,
    "deepseek_v3": _deepseek_v3,
}


def _model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = FAMILIES[family]().float().eval()
    with torch.no_grad():  # HF's init leaves routing near-uniform; make it decisive
        for _, r in moe_routers(m):
            r.weight.normal_(0, 0.5)
            if hasattr(r, "e_score_correction_bias"):
                r.e_score_correction_bias.normal_(0, 0.1)
        for name, p in m.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.1)
    return m


def _natural_routing(m: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, [B, L, layers, top_k] experts each MoE layer chose; -1 in dense layers)."""
    caught: dict[int, torch.Tensor] = {}
    hooks = [
        r.register_forward_hook(lambda mod, a, out, i=i: caught.__setitem__(i, out[2]))
        for i, r in moe_routers(m)
    ]
    try:
        with torch.no_grad():
            logits = m(ids).logits
    finally:
        for h in hooks:
            h.remove()
    N, K = model_moe_shape(m)
    E = torch.full((*ids.shape, N, K), -1, dtype=torch.long)
    for i, idx in caught.items():
        E[:, :, i] = idx.view(*ids.shape, K)
    return logits, E


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replaying_a_models_own_routing_leaves_its_logits_unchanged(family: str) -> None:
    m = _model(family)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    ref, E = _natural_routing(m, ids)
    dense = [i for i in range(E.shape[2]) if i not in dict(moe_routers(m))]
    assert (E[:, :, dense] == -1).all() and (E[:, :, [i for i, _ in moe_routers(m)]] >= 0).all()
    with torch.no_grad(), forced_routing(m, E):
        out = m(ids).logits
    assert (out - ref).abs().max().item() < TOL
    # the replay is live: other experts change the logits
    n_experts = moe_routers(m)[0][1].weight.shape[0]
    with torch.no_grad(), forced_routing(m, torch.where(E >= 0, (E + 1) % n_experts, E)):
        moved = m(ids).logits
    assert (moved - ref).abs().max().item() > 1e-3


def _reference_weights(
    family: str, r: torch.nn.Module, h_NH: torch.Tensor, idx_NK: torch.Tensor
) -> torch.Tensor:
    """The family's routing weights at the given experts, in float64, from its paper/code."""
    logits = h_NH.double() @ r.weight.double().T
    if family == "deepseek_v3":  # sigmoid; the bias and groups only select
        w = logits.sigmoid().gather(1, idx_NK)
        return (w / w.sum(-1, keepdim=True) if r.norm_topk_prob else w) * r.routed_scaling_factor
    w = logits.softmax(-1).gather(1, idx_NK)
    renorm = True if family == "mixtral" else r.norm_topk_prob
    return w / w.sum(-1, keepdim=True) if renorm else w


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forced_experts_get_the_familys_weights_and_gradients(family: str) -> None:
    m = _model(family)
    i, r = moe_routers(m)[0]
    g = torch.Generator().manual_seed(2)
    h_NH = torch.randn(6, H, generator=g)
    E = r.weight.shape[0]
    forced = torch.stack([torch.randperm(E, generator=g)[: r.top_k] for _ in range(6)])
    forced[5] = -1  # not recorded: keeps the natural routing
    with torch.no_grad():
        nat_logits, nat_w, nat_idx = r(h_NH)
    experts = torch.full((1, 6, len(m.model.layers), r.top_k), -1, dtype=torch.long)
    experts[0, :, i] = forced
    with forced_routing(m, experts):
        logits, w, idx = r(h_NH)
    assert torch.equal(idx[:5], forced[:5]) and torch.equal(idx[5], nat_idx[5])
    assert torch.allclose(logits, nat_logits)
    assert w.dtype == nat_w.dtype
    assert torch.allclose(w.double(), _reference_weights(family, r, h_NH, idx), atol=1e-6)
    assert torch.allclose(w[5], nat_w[5], atol=1e-7)
    w.square().sum().backward()  # (a plain sum is constant where the weights renormalise)
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_unknown_router_classes_are_refused() -> None:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    # DeepSeek-V2: softmax with a group-limited greedy top-k; not a family replayed here.
    v2 = DeepseekV2ForCausalLM(
        DeepseekV2Config(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_shared_experts=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    )
    with pytest.raises(
        ValueError,
        match=r"deepseek_v2.*DeepseekV2TopkRouter.*"
        r"rollout\.replay_routing=false",
    ):
        moe_routers(v2)
    with pytest.raises(ValueError, match="rollout.replay_routing=false"):
        with forced_routing(v2, torch.zeros(1, 2, 2, 2, dtype=torch.long)):
            pass
    # the check is on the class: a router with every attribute of Qwen3's, but its own
    # forward, is refused too
    m = _model("qwen3_moe")
    gate = m.model.layers[1].mlp.gate

    class CustomRouter(type(gate)):  # type: ignore[misc]
        pass

    gate.__class__ = CustomRouter
    with pytest.raises(ValueError, match=r"qwen3_moe.*layer 1.*CustomRouter"):
        model_moe_shape(m)


def test_dense_models_have_no_moe_routers() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dense = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            intermediate_size=32,
        )
    )
    assert moe_routers(dense) == [] and model_moe_shape(dense) is None


def test_rollout_marks_deepseek_checkpoints_as_moe(tmp_path: Path) -> None:
    """The GPU rollout turns on vLLM's routing capture for MoE checkpoints only; DeepSeek
    names its expert count n_routed_experts."""
    from climbrl.rollout.replay import _is_moe_checkpoint

    for cfg, moe in [
        ({"model_type": "deepseek_v3", "n_routed_experts": 8}, True),
        ({"model_type": "mixtral", "num_local_experts": 8}, True),
        ({"model_type": "qwen3_moe", "num_experts": 8}, True),
        ({"model_type": "qwen3", "num_experts": None}, False),
        ({"text_config": {"n_routed_experts": 4}}, True),
    ]:
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        assert _is_moe_checkpoint(str(tmp_path)) is moe, cfg

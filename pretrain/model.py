"""Models for pretraining: transformers' Qwen3 / Qwen3-MoE built from a `ModelConfig`.

The block is the modern one - RoPE, GQA, SwiGLU, RMSNorm, QK-norm - because it *is*
transformers' Qwen3 (dense) or Qwen3-MoE. An MoE with a shared expert uses Qwen2-MoE (the
Qwen family class with a shared-expert slot; it has no QK-norm). Checkpoints are plain
``save_pretrained`` safetensors directories, so transformers and vLLM load them unchanged.

MoE load balancing (`ModelConfig.balance`):

* ``aux_loss``: the Switch loss ``E * sum_i f_i * P_i`` per layer, where ``f_i`` (share of
  routed slots to expert i) is counted over the *global batch*: all-reduced over data-parallel
  ranks and accumulated over the step's micro-batches, rather than per sequence or per
  micro-batch (Qiu et al. 2025, "Demystifying the load balancing loss"). With grad_accum > 1
  micro-batch m uses the counts of micro-batches 1..m (the later ones are not known yet).
* ``aux_free``: DeepSeek-V3's bias: each router adds a per-expert bias to its scores for the
  top-k *choice* only (gate weights stay unbiased); after each step
  ``b_i += rate * sign(mean_load - load_i)``. Qwen3-MoE checkpoints have no slot for it, so the
  exported model routes without the bias; `export` warns with the measured bias size.

    python -m climbrl.pretrain.model    # build each preset on the meta device, print sizes
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from climbrl.pretrain.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def hf_config(cfg: ModelConfig, *, vocab_size: int, eos_id: int, pad_id: int) -> Any:
    """The transformers config for `cfg` (Qwen3Config, Qwen3MoeConfig or Qwen2MoeConfig)."""
    from transformers import Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_std,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=eos_id,
        intermediate_size=cfg.intermediate_size,
    )
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    if not cfg.moe:
        return Qwen3Config(**common, head_dim=head_dim)
    moe: dict[str, Any] = dict(
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        router_aux_loss_coef=cfg.aux_loss_coef,
    )
    if cfg.shared_expert_intermediate_size:
        if head_dim * cfg.num_heads != cfg.hidden_size:
            raise ValueError(
                "a shared-expert (Qwen2-MoE) model needs head_dim * num_heads == hidden_size"
            )
        return Qwen2MoeConfig(
            **common, **moe, shared_expert_intermediate_size=cfg.shared_expert_intermediate_size
        )
    # head_dim is no field of Qwen3MoeConfig, but its attention reads it when present
    return Qwen3MoeConfig(**common, **moe, head_dim=head_dim)  # pyright: ignore[reportCallIssue]


def model_class(hf_cfg: Any) -> type[PreTrainedModel]:
    from transformers import Qwen2MoeForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    return {
        "qwen3": Qwen3ForCausalLM,
        "qwen3_moe": Qwen3MoeForCausalLM,
        "qwen2_moe": Qwen2MoeForCausalLM,
    }[hf_cfg.model_type]


def build_model(
    cfg: ModelConfig, *, vocab_size: int, eos_id: int, pad_id: int, seed: int
) -> nn.Module:
    """A freshly initialised model (float32) with routers wrapped for balancing if MoE."""
    hcfg = hf_config(cfg, vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id)
    torch.manual_seed(seed)
    model = model_class(hcfg)(hcfg)
    _init_scaled(model, cfg)
    if cfg.moe:
        install_routers(model, cfg)
    return model


def _init_scaled(model: nn.Module, cfg: ModelConfig) -> None:
    # GPT-2 style: scale the residual output projections by 1/sqrt(2 * layers).
    std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.normal_(0.0, std)


def load_model(path: str, cfg: ModelConfig | None = None) -> nn.Module:
    """Load an HF checkpoint dir in float32 (for continued pretraining / SFT)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if cfg is not None and getattr(model.config, "num_experts", None):
        install_routers(model, cfg)
    return model


class BalancedRouter(nn.Module):
    """Top-k softmax router that records loads for global-batch balancing.

    Same parameter (``weight``) and outputs as transformers' Qwen3-MoE router, so state dicts
    stay compatible. ``expert_bias`` (aux-free balancing) shifts only the top-k choice.
    """

    expert_bias: torch.Tensor  # [E] buffers
    step_counts: torch.Tensor

    def __init__(self, weight: nn.Parameter, top_k: int, norm_topk_prob: bool, use_bias: bool):
        super().__init__()
        self.weight = weight
        self.num_experts, self.hidden_dim = weight.shape
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.use_bias = use_bias
        self.register_buffer("expert_bias", torch.zeros(self.num_experts), persistent=False)
        self.register_buffer("step_counts", torch.zeros(self.num_experts), persistent=False)
        self.last_probs_mean: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None

    def forward(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h_TD = hidden_states.reshape(-1, self.hidden_dim)
        logits_TE = F.linear(h_TD, self.weight)
        probs_TE = torch.softmax(logits_TE, dtype=torch.float, dim=-1)
        choice_TE = probs_TE + self.expert_bias if self.use_bias else probs_TE
        _, idx_TK = torch.topk(choice_TE.detach(), self.top_k, dim=-1)
        top_TK = probs_TE.gather(-1, idx_TK)
        if self.norm_topk_prob:
            top_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
        if self.training:
            counts_E = torch.bincount(idx_TK.flatten(), minlength=self.num_experts).float()
            self.last_counts = counts_E
            self.last_probs_mean = probs_TE.mean(0)
        return logits_TE, top_TK.to(logits_TE.dtype), idx_TK


def routers(model: nn.Module) -> list[BalancedRouter]:
    return [m for m in model.modules() if isinstance(m, BalancedRouter)]


def install_routers(model: nn.Module, cfg: ModelConfig) -> None:
    """Replace each MoE block's `gate` with a `BalancedRouter` sharing its weight."""
    for mod in list(model.modules()):
        gate = getattr(mod, "gate", None)
        if gate is not None and hasattr(gate, "top_k") and not isinstance(gate, BalancedRouter):
            mod.gate = BalancedRouter(
                gate.weight, gate.top_k, gate.norm_topk_prob, use_bias=cfg.balance == "aux_free"
            )


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def balance_loss(model: nn.Module, cfg: ModelConfig) -> torch.Tensor | None:
    """Global-batch load-balancing loss over all MoE layers of the last forward (or None).

    Also adds this micro-batch's counts into each router's ``step_counts`` (all-reduced),
    which both the loss (for later micro-batches) and the aux-free update read.
    """
    rs = routers(model)
    if not rs:
        return None
    losses = []
    for r in rs:
        assert r.last_counts is not None and r.last_probs_mean is not None
        r.step_counts += _all_reduce(r.last_counts)
        if cfg.balance == "aux_loss":
            f_E = r.step_counts / r.step_counts.sum().clamp(min=1.0)
            losses.append(r.num_experts * (f_E * r.last_probs_mean).sum())
        r.last_counts = r.last_probs_mean = None
    if cfg.balance != "aux_loss":
        return None
    return torch.stack(losses).mean()


@torch.no_grad()
def end_step_balance(model: nn.Module, cfg: ModelConfig) -> dict[str, float]:
    """After the optimizer step: aux-free bias update; returns max load / mean load (imbalance)."""
    rs = routers(model)
    if not rs:
        return {}
    imbalance = []
    for r in rs:
        load = r.step_counts
        mean = load.mean().clamp(min=1e-9)
        imbalance.append(float(load.max() / mean))
        if cfg.balance == "aux_free":
            r.expert_bias += cfg.bias_update_rate * torch.sign(mean - load)
        r.step_counts.zero_()
    return {"moe_max_over_mean_load": sum(imbalance) / len(imbalance)}


def router_biases(model: nn.Module) -> list[torch.Tensor]:
    return [r.expert_bias.clone() for r in routers(model)]


def set_router_biases(model: nn.Module, biases: list[torch.Tensor]) -> None:
    for r, b in zip(routers(model), biases, strict=True):
        r.expert_bias.copy_(b)


def _hf(model: nn.Module) -> PreTrainedModel:
    """`model` as the transformers model it is (`build_model`, `load_model`)."""
    from transformers import PreTrainedModel

    assert isinstance(model, PreTrainedModel), f"not a transformers model: {type(model)}"
    return model


def _embedding_numel(model: PreTrainedModel) -> int:
    emb = model.get_input_embeddings()
    assert isinstance(emb, nn.Embedding)
    return emb.weight.numel()


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(all, active-per-token) parameters that take part in matmuls (input embedding excluded)."""
    cfg: Any = _hf(model).config
    n_exp = getattr(cfg, "num_experts", 0) or 0
    k = getattr(cfg, "num_experts_per_tok", 0) or 0
    total = active = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or p.dim() < 2:
            continue
        n = p.numel()
        total += n
        is_expert = ".experts." in name or name.endswith(
            ("experts.gate_up_proj", "experts.down_proj")
        )
        active += n * k // n_exp if (is_expert and n_exp) else n
    if getattr(cfg, "tie_word_embeddings", False):
        total += _embedding_numel(_hf(model))
        active += _embedding_numel(_hf(model))
    return total, active


def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token for unpacked rows of `seq_len`: 6 * active matmul params +
    causal attention (PaLM appendix B). Packed rows with document masking do less attention
    work: `train_flops` counts that exactly."""
    cfg: Any = _hf(model).config  # a Qwen config: the base class declares none of its sizes
    _, active = matmul_params(model)
    # QK^T and AV: 2 matmuls * 2 FLOPs * heads*head_dim * seq, x3 for fwd+bwd, /2 for causal.
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * _head_dim(cfg) * seq_len
    return 6.0 * active + attn


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def attention_pairs(positions: Any) -> int:
    """Query-key pairs of a document-masked causal attention over packed rows.

    `positions` restart at 0 at every document, so the token at position p sees p + 1 keys and
    a document of n tokens costs n(n+1)/2 pairs, not the row's causal triangle.
    """
    import numpy as np

    return int((np.asarray(positions, dtype=np.int64) + 1).sum())


def train_flops_counter(model: nn.Module) -> Any:
    """``count(positions) -> FLOPs``: useful training FLOPs of one forward + backward over
    packed rows with these positions.

    6 * active matmul params per token, plus attention: QK^T and AV, 2 FLOPs per multiply-add,
    per head_dim, head, layer and query-key pair (`attention_pairs`), x3 for the backward.
    Padding counts as tokens (it goes through the matmuls).
    """
    import numpy as np

    cfg: Any = _hf(model).config  # a Qwen config: the base class declares none of its sizes
    _, active = matmul_params(model)
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * _head_dim(cfg)

    def count(positions: Any) -> float:
        n_tokens = int(np.asarray(positions).size)
        return 6.0 * active * n_tokens + float(attn) * attention_pairs(positions)

    return count


def train_flops(model: nn.Module, positions: Any) -> float:
    """Useful training FLOPs over packed rows with these positions (`train_flops_counter`)."""
    return train_flops_counter(model)(positions)


def count_params_from_config(cfg: ModelConfig, vocab_size: int) -> tuple[int, int]:
    """(total, active) parameters of a config, built on the meta device (no memory)."""
    hcfg = hf_config(cfg, vocab_size=vocab_size, eos_id=0, pad_id=1)
    with torch.device("meta"):
        model = model_class(hcfg)(hcfg)
    total = sum(p.numel() for p in model.parameters())
    emb = _embedding_numel(model)
    _, active = matmul_params(model)
    return total, active + (0 if cfg.tie_word_embeddings else emb)


def export(model: nn.Module, tokenizer: Any, out_dir: str, dtype: str = "float32") -> None:
    """Save an HF checkpoint dir (safetensors + config + tokenizer) that vLLM loads unchanged."""
    rs = routers(model)
    if rs and any(r.use_bias for r in rs):
        size = max(float(r.expert_bias.abs().max()) for r in rs)
        warnings.warn(
            f"aux-free router biases (max |b| = {size:.3g}) are not part of the Qwen-MoE format; "
            "the exported model routes without them",
            stacklevel=2,
        )
    model = _hf(model)
    model.config.use_cache = True
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    state = {k: v.to(getattr(torch, dtype)) for k, v in model.state_dict().items()}
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    model.config.dtype = dtype
    model.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    from climbrl.pretrain.presets import MODEL_PRESETS

    for name, fields in MODEL_PRESETS.items():
        t, a = count_params_from_config(ModelConfig(**fields), vocab_size=32_000)
        print(f"{name:18s} total={t / 1e6:.2f}M active={a / 1e6:.2f}M")

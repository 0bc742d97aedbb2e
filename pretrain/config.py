"""Pretraining configuration: pydantic models, loaded from TOML with ``--set key=value`` overrides.

Every field carries a description; cross-field checks live in validators. The resolved config
is saved next to the run as ``config.json``. No torch import here, so the CLI's ``--help`` stays
instant.

    from climbrl.pretrain.config import load_config
    cfg = load_config("examples/pretrain_demo.toml", overrides=["train.steps=10"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from climbrl.config import ConfigBase, read_toml  # one base, one loader everywhere

_Strict = ConfigBase


class ModelConfig(_Strict):
    """The network: a Qwen3 (dense) or Qwen3-MoE block stack built with transformers."""

    preset: str | None = Field(
        default=None,
        description="Name in climbrl.pretrain.presets.MODEL_PRESETS; fields set here override it.",
    )
    hidden_size: int = Field(default=128, gt=0, description="Residual stream width.")
    num_layers: int = Field(default=4, gt=0, description="Number of transformer blocks.")
    num_heads: int = Field(default=4, gt=0, description="Query heads per attention layer.")
    num_kv_heads: int = Field(
        default=2, gt=0, description="Key/value heads (GQA); must divide num_heads."
    )
    head_dim: int | None = Field(
        default=None, description="Per-head width; default hidden_size // num_heads."
    )
    intermediate_size: int = Field(
        default=384, gt=0, description="SwiGLU hidden width of dense MLPs."
    )
    max_position_embeddings: int = Field(
        default=2048, gt=0, description="Longest sequence RoPE is set for."
    )
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base frequency.")
    tie_word_embeddings: bool = Field(
        default=False, description="Share input embedding and LM head."
    )
    rms_norm_eps: float = Field(default=1e-6, gt=0, description="RMSNorm epsilon.")
    init_std: float = Field(
        default=0.02, gt=0, description="Std of the normal init of weight matrices."
    )
    moe: bool = Field(
        default=False, description="Use Qwen3-MoE sparse blocks instead of dense MLPs."
    )
    num_experts: int = Field(
        default=8, gt=0, description="Routed experts per MoE layer (fine-grained: many, small)."
    )
    num_experts_per_tok: int = Field(
        default=2, gt=0, description="Experts each token is routed to (top-k)."
    )
    moe_intermediate_size: int = Field(
        default=96, gt=0, description="SwiGLU width of each routed expert."
    )
    shared_expert_intermediate_size: int = Field(
        default=0,
        ge=0,
        description="Width of an always-on shared expert; 0 = none. A shared expert exports as "
        "Qwen2-MoE (which has the slot) instead of Qwen3-MoE.",
    )
    balance: Literal["aux_loss", "aux_free", "none"] = Field(
        default="aux_loss",
        description="MoE load balancing: 'aux_loss' = Switch-style loss with expert loads counted "
        "over the global batch (all micro-batches and data-parallel ranks); 'aux_free' = "
        "DeepSeek-V3 per-expert routing bias nudged toward balance after each step.",
    )
    aux_loss_coef: float = Field(
        default=0.01, ge=0, description="Weight of the load-balancing loss."
    )
    bias_update_rate: float = Field(
        default=1e-3, ge=0, description="Step size of the aux-free bias update."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads, or set head_dim")
        if self.moe and self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok cannot exceed num_experts")
        if self.shared_expert_intermediate_size and not self.moe:
            raise ValueError("shared_expert_intermediate_size needs moe = true")
        if self.shared_expert_intermediate_size and self.balance == "aux_free":
            raise ValueError(
                "balance='aux_free' is implemented for Qwen3-MoE only (no shared expert)"
            )
        return self


class FileSource(_Strict):
    """One input: local files of one domain."""

    paths: list[str] = Field(
        description="Files or globs: .txt (one doc per blank-line block), .jsonl, .parquet."
    )
    domain: str = Field(
        default="default", description="Domain name, for mixing weights and the funnel."
    )
    weight: float = Field(
        default=1.0, gt=0, description="Relative share of output tokens for this domain."
    )
    text_field: str = Field(
        default="text", description="Field/column holding the text (jsonl, parquet)."
    )


class DataConfig(_Strict):
    """Where tokens come from, how they are cleaned, and how they are packed."""

    source: Literal["synthetic", "files", "packed"] = Field(
        default="synthetic",
        description="'synthetic' = generate a task corpus; 'files' = run the data pipeline on "
        "`files`; 'packed' = use an existing packed dir (`packed_dir`).",
    )
    task: str = Field(
        default="add", description="Synthetic task name (climbrl.pretrain.synthetic.TASKS)."
    )
    num_docs: int = Field(default=200_000, gt=0, description="Synthetic documents to generate.")
    mistake_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Synthetic source: share of the training documents that carry the task's "
        "common mistake (add: every carry dropped) instead of the true answer, among those "
        "where the two differ. Held-out documents and the RL task's answers stay true.",
    )
    files: list[FileSource] = Field(default_factory=list, description="Inputs for source='files'.")
    packed_dir: str | None = Field(default=None, description="Packed data dir for source='packed'.")
    tokenizer: str | None = Field(
        default=None, description="Existing tokenizer dir; default: train one."
    )
    vocab_size: int = Field(
        default=512, gt=0, description="Vocabulary size when training a tokenizer."
    )
    split_digits: bool = Field(
        default=True, description="One token per digit in a trained tokenizer."
    )
    tokenizer_train_docs: int = Field(
        default=20_000, gt=0, description="Docs the tokenizer is trained on."
    )
    seq_len: int = Field(default=256, gt=1, description="Packed sequence length (tokens per row).")
    eval_fraction: float = Field(
        default=0.02, ge=0, lt=0.5, description="Share of rows held out for NLL."
    )
    exact_dedup: bool = Field(
        default=True, description="Drop documents whose normalised text hash repeats."
    )
    fuzzy_dedup: bool = Field(default=True, description="Drop near-duplicates with MinHash-LSH.")
    fuzzy_threshold: float = Field(
        default=0.8, gt=0, le=1, description="Jaccard threshold for near-duplicates."
    )
    minhash_perm: int = Field(default=128, gt=0, description="MinHash permutations.")
    shingle_words: int = Field(default=5, gt=0, description="Word n-gram size of MinHash shingles.")
    min_chars: int = Field(default=1, ge=0, description="Quality: drop docs shorter than this.")
    max_chars: int = Field(
        default=1_000_000, gt=0, description="Quality: drop docs longer than this."
    )
    max_symbol_ratio: float = Field(
        default=0.5, gt=0, le=1, description="Quality: max share of symbol chars."
    )
    max_dup_ngram_frac: float = Field(
        default=0.3, gt=0, le=1, description="Quality: max share of word 3-grams that are repeats."
    )
    decontam_files: list[str] = Field(
        default_factory=list, description="Eval sets (txt/jsonl/parquet) to decontaminate against."
    )
    decontam_ngram: int = Field(
        default=8, gt=0, description="Word n-gram size for decontamination."
    )
    mix_on_exhaust: Literal["stop", "continue"] = Field(
        default="stop",
        description="When a domain runs out: 'stop' keeps the weights exact, 'continue' "
        "renormalises over the rest.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "files" and not self.files:
            raise ValueError("data.source = 'files' needs at least one [[data.files]] entry")
        if self.source == "packed" and not self.packed_dir:
            raise ValueError("data.source = 'packed' needs data.packed_dir")
        if self.min_chars > self.max_chars:
            raise ValueError("data.min_chars must be <= data.max_chars")
        return self


class TrainConfig(_Strict):
    """The optimisation: schedule, optimizer, precision, checkpoints and logging."""

    steps: int = Field(default=1000, gt=0, description="Optimizer steps.")
    batch_size: int = Field(default=16, gt=0, description="Rows per micro-batch.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    optimizer: Literal["adamw", "muon"] = Field(
        default="adamw",
        description="'muon' = torch.optim.Muon on hidden 2-D weight matrices, AdamW on embeddings, "
        "LM head, norms and routers.",
    )
    lr: float = Field(default=3e-3, gt=0, description="Peak AdamW learning rate.")
    muon_lr: float | None = Field(
        default=None,
        gt=0,
        description="Peak Muon lr; default = lr (Muon's update is RMS-matched to AdamW's, "
        "torch's adjust_lr_fn='match_rms_adamw').",
    )
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Final lr as a fraction of peak."
    )
    weight_decay: float = Field(
        default=0.1, ge=0, description="Decoupled weight decay on matrices."
    )
    beta1: float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(default=0.95, ge=0, lt=1, description="AdamW beta2.")
    schedule: Literal["cosine", "wsd"] = Field(
        default="cosine", description="'cosine' = warmup then cosine; 'wsd' = warmup-stable-decay."
    )
    warmup_steps: int = Field(default=50, ge=0, description="Linear warmup steps.")
    decay_fraction: float = Field(
        default=0.2, gt=0, le=1, description="WSD: share of steps in the final decay."
    )
    grad_clip: float = Field(default=1.0, ge=0, description="Max global grad norm; 0 = off.")
    z_loss: float = Field(
        default=1e-4, ge=0, description="Weight of the z-loss, mean(logsumexp(logits)^2)."
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="Autocast: 'auto' = bf16 on CUDA, fp32 on CPU."
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the forward + loss (inductor; fuses the norm, RoPE, SwiGLU "
        "and loss elementwise work). Costs a one-off compilation (tens of seconds on CPU).",
    )
    seed: int = Field(default=0, description="Seed for init, data order and everything else.")
    threads: int = Field(
        default=0, ge=0, description="torch CPU threads; 0 = leave torch's default."
    )
    log_every: int = Field(default=10, gt=0, description="Steps between log lines.")
    eval_every: int = Field(
        default=200, gt=0, description="Steps between held-out NLL evaluations."
    )
    eval_batches: int = Field(
        default=8, gt=0, description="Batches in each held-out NLL evaluation."
    )
    ckpt_every: int = Field(default=200, gt=0, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(default=2, gt=0, description="Checkpoints kept on disk.")
    max_seconds: float = Field(
        default=0.0, ge=0, description="Stop early after this wall time; 0 = off."
    )
    fit_steps_to_budget: bool = Field(
        default=False,
        description="With max_seconds: after 10 steps, lower `steps` to what the measured speed "
        "fits in the budget, so the lr schedule runs to its end instead of being cut.",
    )
    peak_flops: float = Field(
        default=0.0, ge=0, description="Device peak FLOP/s for MFU; 0 = auto (CUDA only)."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")
        return self


class InitConfig(_Strict):
    """Continued pretraining / SFT: start from an existing HF checkpoint."""

    from_dir: str | None = Field(
        default=None, description="HF model dir (safetensors + tokenizer) to start from."
    )
    replay_dir: str | None = Field(
        default=None, description="Packed dir of the original data, replayed."
    )
    replay_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="Share of each batch's rows from replay_dir."
    )

    @model_validator(mode="after")
    def _check(self) -> InitConfig:
        if self.replay_ratio > 0 and not self.replay_dir:
            raise ValueError("init.replay_ratio > 0 needs init.replay_dir")
        if self.replay_dir and not self.from_dir:
            raise ValueError("init.replay_dir is for continued pretraining: set init.from_dir too")
        return self


class SFTConfig(_Strict):
    """Supervised fine-tuning on chat data, loss on assistant tokens only (TRL SFTTrainer)."""

    data: str = Field(description="jsonl with a 'messages' list of {role, content} per line.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the data.")
    lr: float = Field(default=1e-4, gt=0, description="Learning rate.")
    batch_size: int = Field(default=8, gt=0, description="Per-device batch size.")
    max_length: int = Field(
        default=512, gt=0, description="Truncate conversations to this many tokens."
    )
    max_steps: int = Field(default=-1, description="Stop after this many steps; -1 = use epochs.")


class PretrainConfig(_Strict):
    """A pretraining (or continued pretraining, or SFT) run."""

    run_dir: str = Field(
        default="runs/pretrain", description="Where checkpoints, logs and the export go."
    )
    mode: Literal["pretrain", "sft"] = Field(
        default="pretrain", description="'sft' runs [sft] with TRL."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The network.")
    data: DataConfig = Field(default_factory=DataConfig, description="The data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The optimisation.")
    init: InitConfig = Field(default_factory=InitConfig, description="Start from a checkpoint.")
    sft: SFTConfig | None = Field(default=None, description="SFT settings (mode='sft').")
    eval_task_examples: int = Field(
        default=200,
        ge=0,
        description="Synthetic source: held-out task examples scored greedily at the end.",
    )

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.mode == "sft" and (self.sft is None or not self.init.from_dir):
            raise ValueError("mode = 'sft' needs an [sft] table and init.from_dir")
        if self.init.from_dir and self.model.preset:
            raise ValueError(
                "init.from_dir takes the architecture from the checkpoint; drop model.preset"
            )
        return self


def resolve_presets(data: dict[str, Any]) -> dict[str, Any]:
    """Expand ``model.preset`` into fields; explicit fields in the file win."""
    from climbrl.pretrain.presets import MODEL_PRESETS

    model = data.get("model", {})
    name = model.get("preset")
    if name is not None:
        if name not in MODEL_PRESETS:
            raise ValueError(
                f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}"
            )
        data["model"] = {**MODEL_PRESETS[name], **model}
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a TOML config (or start from defaults), apply overrides and presets, validate."""
    data = read_toml(path, overrides)
    return PretrainConfig.model_validate(resolve_presets(data))

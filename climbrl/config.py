"""Run configuration: pydantic models loaded from TOML, with ``--set a.b=value`` overrides.

Every field has a description and bad values fail with a message that says what to change.
The launcher saves the resolved config next to the run (``OUTPUT_DIR/config.resolved.toml``)
and hands that file to every process, so each process can also be started alone with it.
This module imports neither torch nor vLLM, so ``--help`` stays instant.

``[learner]`` nests ``optim`` (AdamW), ``algo`` (the objective: a tagged union on ``name``, so
each objective has only its own fields), ``shaping``, ``offpolicy`` and ``weights`` (mode,
transport, lora). ``ConfigBase`` and ``read_toml`` are the base and loader that the pretraining
config (climbrl.pretrain.config) shares.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_M = TypeVar("_M", bound=BaseModel)


class ConfigBase(BaseModel):
    """Base of every config section, here and in climbrl.pretrain.config: unknown keys are
    errors and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_Cfg = ConfigBase


class RunCfg(_Cfg):
    name: str = Field(default="climbrl-run", description="Run name, used in logs and the run id.")
    output_dir: str = Field(
        default="runs/latest", description="Where metrics, checkpoints and logs go."
    )
    seed: int = Field(
        default=0,
        description="Seed of the learner's data order and torch initialisation, and of every "
        "sample's sampling seed (with the order id, sample index and turn). It does not reach "
        "the environment: an env gets its own `seed` from env.args (0 unless set there), so "
        "its tasks, held-out ones included, stay the same whatever the run's seed.",
    )
    on_child_death: Literal["stop", "continue", "restart"] = Field(
        default="stop",
        description="Launcher: when a rollout server dies, stop everything ('stop'), let the "
        "learner carry on with the remaining servers ('continue'), or also start it again "
        "('restart': it rejoins under the same server id and the learner sends it the current "
        "weights; while none is alive the learner waits up to wire.connect_timeout_s).",
    )
    max_restarts: int = Field(
        default=3,
        ge=0,
        description="With on_child_death = 'restart': restarts per rollout server before the "
        "launcher gives up and stops the run.",
    )


class ModelCfg(_Cfg):
    path: str = Field(..., description="HF model directory (safetensors + config + tokenizer).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Dtype of both the engine and the learner."
    )


class EnvCfg(_Cfg):
    name: str = Field(
        default="copy_first",
        description="The environment, found like `climbrl env-check NAME` finds it (first match "
        "wins): an entry point of that name in the 'climbrl.envs' group (a plugin package "
        'declares `[project.entry-points."climbrl.envs"] my_env = "my_pkg.envs:MyEnv"`); '
        "a dotted path 'pkg.mod:Class' or 'pkg.mod.Class' (modules of the current folder "
        "included); a file path 'path/to/file.py:Class' (relative to the folder `climbrl "
        "run` starts in); or a built-in name such as copy_first or math (the keys of "
        "climbrl.envs.base.BUILTIN_ENVS; an unknown name's error lists every one).",
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword args for the env's constructor, `seed` included (run.seed does "
        "not reach the env).",
    )
    step_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Limit on each environment call (reset, respond, score, close). An env that "
        "raises or runs past it costs that episode only (finish_reason 'env_error'); the "
        "learner leaves the episode out of its group and counts it as env_errors.",
    )


class RolloutCfg(_Cfg):
    num_servers: int = Field(default=1, ge=1, description="Rollout server processes to start.")
    max_concurrency: int = Field(default=64, ge=1, description="Episodes in flight per server.")
    extra_envs: list[str] = Field(
        default_factory=list,
        description="Environments besides env.name that a rollout server runs work orders for "
        "(registry names or dotted paths, built with no args). A work order naming any other "
        "env is refused: the wire selects among the environments the config names, it never "
        "names code to import.",
    )
    kv_cache_gb: float = Field(
        default=1.0,
        gt=0,
        description="vLLM KV cache size per server, GiB, on the CPU (on CUDA "
        "placement.gpu_memory_utilization sizes it).",
    )
    max_model_len: int = Field(default=512, ge=16, description="Max prompt+completion tokens.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature for training.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Top-p for training samples.")
    top_k: int = Field(default=-1, description="Top-k for training samples (-1 = off).")
    max_tokens: int = Field(default=16, ge=1, description="Max new tokens per turn.")
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Deadline for one generation request once the engine has it; past it the "
        "request is aborted in the engine and its work order fails (counted by "
        "wire.max_order_failures), so a stuck engine cannot hold an episode forever.",
    )
    loop_lag_warn_s: float = Field(
        default=0.5,
        gt=0,
        description="The learner warns when a rollout server's event loop was blocked longer "
        "than this (seconds) since the previous step, naming what the loop was running "
        "(rollout_loop_lag_max_s in metrics.jsonl holds every step's worst). Env code runs on "
        "that loop: synchronous work in an async env method stalls generation and weight "
        "updates alike. Raise it on a busy machine where short stalls are expected.",
    )
    repack_delay_s: float = Field(
        default=0.005,
        ge=0,
        description="After a weight update's ack, the rollout server waits this long before "
        "it repacks the CPU kernels' weights in the background (rollout/weight_receiver.py), "
        "so the ack leaves first.",
    )
    cpu_fast_path: bool = Field(
        default=True,
        description="Load weight updates on a CPU engine by climbrl's fast path into vLLM's "
        "internals (climbrl/weights/vllm_cpu.py: full updates packed straight from the "
        "weights file, in the background where a CPU is spare; MoE experts prepacked again "
        "on reload). false: vLLM's own reload_weights for every update.",
    )
    enforce_eager: bool = Field(
        default=True, description="Skip graph capture (faster start on CPU)."
    )
    cpu_threads: int = Field(
        default=0,
        ge=0,
        description="On the CPU: the OpenMP threads of each rollout server's vLLM worker, bound "
        "to the first cpu_threads cores this process may use, none reserved. 0 = vLLM's own "
        "binding, which keeps one core for the engine's scheduler. With max_staleness = 0 the "
        "engine and the learner take turns, so both can use every core (set it to the core "
        "count and learner.threads to it as well); in an asynchronous run they share the "
        "cores. Ignored on GPUs.",
    )
    replay_sampling_mask: bool = Field(
        default=True,
        description="Record each sampled token's top-p/top-k kept set (as an exact kept count) "
        "so the learner applies the same mask before its log-softmax. Acts only when top_p < 1 "
        "or top_k > 0; on CPU climbrl does the filtering itself in a vLLM logits processor.",
    )
    replay_routing: bool = Field(
        default=True,
        description="MoE router replay (R3): record the experts every position was routed to, "
        "per layer, so the learner forces the same experts. Acts only for MoE models.",
    )
    fp32_lm_head: bool = Field(
        default=True,
        description="Engine LM head in float32 for bfloat16/float16 models (vLLM's head_dtype "
        "override: hidden states and head weight cast to float32 for the logits matmul). The "
        "sampler is float32 regardless; a no-op for float32 models. Pair with "
        "learner.fp32_lm_head.",
    )


class OptimCfg(_Cfg):
    """AdamW of the policy (and of PPO's critic, which has its own learning rate)."""

    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field(
        default=(0.9, 0.99),
        description="AdamW (beta1, beta2) of the policy (and PPO's critic), each in [0, 1).",
    )
    grad_clip: float = Field(default=1.0, gt=0, description="Max gradient norm.")

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"learner.optim.adam_betas = {list(v)}: each beta must be in [0, 1)")
        return v


class _AlgoBase(_Cfg):
    """What every objective has: the ratio clip, the loss aggregation, KL and entropy terms."""

    name: str = Field(default="grpo", description="The objective (learner/algos/).")

    clip_low: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Ratio clip below: 1 - clip_low (for cispo: lower bound of the IS weight; "
        "1 = no lower bound).",
    )
    clip_high: float = Field(
        default=0.28, ge=0, description="PPO ratio clip above: 1 + clip_high (DAPO)."
    )
    loss_agg: Literal["token", "sample", "fixed"] = Field(
        default="token",
        description="Loss aggregation: token (sum over all tokens / tokens, DAPO), sample (mean "
        "per sample, then over samples, GRPO), fixed (sum / (samples x loss_agg_len), Dr. GRPO).",
    )
    loss_agg_len: int = Field(
        default=0,
        ge=0,
        description="Constant length for loss_agg='fixed' and overlong shaping "
        "(0 = rollout.max_tokens).",
    )
    kl_coef: float = Field(default=0.0, ge=0, description="KL-to-reference coefficient (0 = off).")
    kl_estimator: Literal["off", "k3"] = Field(
        default="k3",
        description="KL-to-reference loss term when kl_coef > 0: 'k3' = exp(d) - d - 1 with "
        "d = log pi_ref - log pi on the sampled tokens (its value estimates KL(pi || pi_ref), its "
        "gradient is that of KL(pi_ref || pi)), or 'off'. k1 is refused: its expected gradient "
        "is 0.",
    )
    ref_model_path: str = Field(
        default="",
        description="Reference model for the KL term (empty = model.path); loaded only when "
        "kl_coef > 0.",
    )
    entropy_coef: float = Field(
        default=0.0, description="Entropy bonus: loss -= coef x mean entropy."
    )

    @field_validator("kl_estimator", mode="before")
    @classmethod
    def _no_k1(cls, v: Any) -> Any:
        # as a loss term k1 = log pi - log pi_ref has expected gradient E_pi[grad log pi] = 0
        if v == "k1":
            raise ValueError(
                "learner.algo.kl_estimator = 'k1' applies no KL pressure as a loss term "
                "(its expected gradient, E_pi[grad log pi], is 0): use "
                "kl_estimator = 'k3'"
            )
        return v

    @model_validator(mode="after")
    def _check_algo(self) -> _AlgoBase:
        if self.kl_coef > 0 and self.kl_estimator == "off":
            raise ValueError(
                "learner.algo.kl_coef > 0 with kl_estimator = 'off': use "
                "kl_estimator = 'k3', or set kl_coef = 0"
            )
        ratio_cap = getattr(self, "ratio_cap", 0.0)
        if ratio_cap > 0 and ratio_cap <= 1.0 + self.clip_high:
            raise ValueError(
                f"learner.algo.ratio_cap ({ratio_cap}) must exceed "
                f"1 + clip_high ({1.0 + self.clip_high})"
            )
        return self


_RATIO_CAP_DOC = (
    "Hard outer ratio clip (dual-clip, TRL's delta): the unclipped ratio is capped at this "
    "value; 0 = off. Must exceed 1 + clip_high."
)
_ADV_STD_NORM_DOC = "Divide advantages by the group std (GRPO)."


class GrpoAlgo(_AlgoBase):
    """GRPO/DAPO: token ratio, PPO clip; with adv_std_norm = false and loss_agg = 'fixed' it
    is Dr. GRPO (learner/algos/grpo.py)."""

    name: Literal["grpo"] = Field(default="grpo", description="The objective (learner/algos/).")
    adv_std_norm: bool = Field(default=True, description=_ADV_STD_NORM_DOC)
    ratio_cap: float = Field(default=0.0, ge=0, description=_RATIO_CAP_DOC)


class GspoAlgo(_AlgoBase):
    """GSPO: the sequence-level, length-normalised ratio (learner/algos/gspo.py)."""

    name: Literal["gspo"] = Field(default="gspo", description="The objective (learner/algos/).")
    adv_std_norm: bool = Field(default=True, description=_ADV_STD_NORM_DOC)
    ratio_cap: float = Field(default=0.0, ge=0, description=_RATIO_CAP_DOC)


class CispoAlgo(_AlgoBase):
    """CISPO: the clipped stop-grad IS weight times the log-prob (learner/algos/cispo.py);
    clip_high bounds the weight, so it has no ratio_cap."""

    name: Literal["cispo"] = Field(default="cispo", description="The objective (learner/algos/).")
    adv_std_norm: bool = Field(default=True, description=_ADV_STD_NORM_DOC)


class PpoAlgo(_AlgoBase):
    """PPO: GAE advantages from a learned critic (learner/algos/ppo.py)."""

    name: Literal["ppo"] = Field(default="ppo", description="The objective (learner/algos/).")
    ratio_cap: float = Field(default=0.0, ge=0, description=_RATIO_CAP_DOC)
    critic: Literal["head", "model"] = Field(
        default="head",
        description="PPO critic: a value head on the policy's last hidden state (shared "
        "backbone) or a separate value model initialised from model.path.",
    )
    critic_lr: float = Field(default=1e-3, gt=0, description="PPO critic AdamW learning rate.")
    vf_coef: float = Field(default=0.5, ge=0, description="PPO value-loss coefficient.")
    gamma: float = Field(default=1.0, ge=0, le=1, description="PPO GAE discount.")
    gae_lambda: float = Field(default=0.95, ge=0, le=1, description="PPO GAE lambda.")
    adv_whiten: bool = Field(default=True, description="PPO: whiten GAE advantages over the batch.")
    value_clip: float = Field(
        default=0.0,
        ge=0,
        description="PPO value clip eps_v (0 = off): the critic's loss is max((V - R)^2, "
        "(V_clip - R)^2) / 2 with V_clip = V_old + clip(V - V_old, -eps_v, eps_v), V_old the "
        "values the returns were computed with (before the batch's first optimizer step); it "
        "binds from the second step over a batch (minibatches or epochs > 1).",
    )


AlgoCfg = Annotated[GrpoAlgo | GspoAlgo | CispoAlgo | PpoAlgo, Field(discriminator="name")]
ALGOS: dict[str, type[_AlgoBase]] = {
    "grpo": GrpoAlgo,
    "gspo": GspoAlgo,
    "cispo": CispoAlgo,
    "ppo": PpoAlgo,
}


class ShapingCfg(_Cfg):
    """Reward shaping, batch filters and the adaptive clip-high (learner/algos/shaping.py)."""

    overlong_buffer: int = Field(
        default=0,
        ge=0,
        description="DAPO soft overlong punishment: penalty ramps from 0 to -overlong_penalty "
        "over the last N tokens of the budget; 0 = off.",
    )
    overlong_penalty: float = Field(
        default=1.0, ge=0, description="Scale of the overlong punishment."
    )
    mask_truncated: bool = Field(
        default=False,
        description="DAPO overlong filtering: no loss on completions stopped by the "
        "token budget (finish_reason 'length').",
    )
    length_penalty_coef: float = Field(
        default=0.0, ge=0, description="Kimi k1.5 length penalty coefficient (0 = off)."
    )
    length_penalty_difficulty_aware: bool = Field(
        default=True,
        description="Scale the length penalty by the group's pass rate (easy prompts are "
        "pushed to be short, hard ones barely).",
    )
    dynamic_sampling: bool = Field(
        default=False,
        description="DAPO dynamic sampling: drop groups whose pass rate is 0 or 1 and refill "
        "the batch with new groups.",
    )
    pass_rate_band: list[float] = Field(
        default_factory=lambda: [0.0, 1.0],
        description="Trainability filter: keep only groups whose measured pass rate lies in "
        "[lo, hi], e.g. [0.1, 0.8]; dropped groups are replaced by new ones.",
    )
    filter_max_dropped: int = Field(
        default=8,
        ge=1,
        description="Per step, at most this many x batch_groups groups are dropped by the "
        "filters; past that the step trains on what arrives (a warning is logged).",
    )
    target_entropy: float = Field(
        default=0.0,
        ge=0,
        description="Adaptive clip-high: steer learner.algo.clip_high toward this mean token "
        "entropy (nats); 0 = off.",
    )
    clip_high_lr: float = Field(
        default=0.05,
        gt=0,
        description="Adaptive clip-high step: clip_high += lr x (target - entropy).",
    )
    clip_high_min: float = Field(default=0.2, ge=0, description="Adaptive clip-high lower bound.")
    clip_high_max: float = Field(default=0.5, ge=0, description="Adaptive clip-high upper bound.")

    @model_validator(mode="after")
    def _check_band(self) -> ShapingCfg:
        if len(self.pass_rate_band) != 2 or not (
            0.0 <= self.pass_rate_band[0] <= self.pass_rate_band[1] <= 1.0
        ):
            raise ValueError(
                f"learner.shaping.pass_rate_band must be [lo, hi] with 0 <= lo <= hi <= 1, "
                f"got {list(self.pass_rate_band)}"
            )
        return self

    @property
    def filtering(self) -> bool:
        """Whether a per-group pass-rate filter is on (dynamic sampling or a band)."""
        return self.dynamic_sampling or list(self.pass_rate_band) != [0.0, 1.0]


class OffPolicyCfg(_Cfg):
    """Corrections for samples from a stale or mismatched sampler (learner/algos/common.py)."""

    correction: Literal["none", "tis", "icepop"] = Field(
        default="none",
        description="Off-policy correction for async data: none (ratio against the rollout's "
        "log-probs), tis (truncated IS weight) or icepop (mask tokens whose weight leaves "
        "[low, high]). With tis/icepop the objective is decoupled (Hilton et al. 2022; AReaL): "
        "the behaviour policy mu is the sampler's log-probs, the proximal policy pi_prox the "
        "learner's weights when the batch is taken; the weight is pi_prox / mu and the clip is "
        "on pi_theta / pi_prox (live from the second optimizer step over a batch: minibatches "
        "or epochs > 1).",
    )
    level: Literal["token", "sequence"] = Field(
        default="token",
        description="TIS/IcePop weight per token or per sequence (product of ratios).",
    )
    low: float = Field(default=0.0, ge=0, description="TIS/IcePop lower bound on the weight.")
    high: float = Field(default=2.0, gt=0, description="TIS/IcePop upper bound on the weight.")
    stale_policy: Literal["drop", "correct"] = Field(
        default="drop",
        description="Beyond learner.max_staleness: drop the group (its prompt is re-queued) or "
        "keep it with a truncated importance weight (capped at tis_cap).",
    )
    tis_cap: float = Field(
        default=2.0, gt=0, description="Truncation cap of the IS weight ('correct')."
    )

    @model_validator(mode="after")
    def _check_band(self) -> OffPolicyCfg:
        if self.low >= self.high:
            raise ValueError("learner.offpolicy.low must be below learner.offpolicy.high")
        if self.correction == "icepop" and self.level == "token" and not self.low < 1.0 < self.high:
            raise ValueError(
                "learner.offpolicy.correction = 'icepop' masks tokens outside [low, high]; "
                "that band must contain 1 (e.g. [0.5, 2.0]) or on-policy tokens are masked too"
            )
        return self


class LoraCfg(_Cfg):
    r: int = Field(default=8, ge=1, description="LoRA rank (learner.weights.mode = 'lora').")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha; the scale is alpha / r.")
    targets: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="Module names (last path component) that get LoRA adapters.",
    )


class WeightsCfg(_Cfg):
    """How new weights reach the engines (climbrl/weights/, learner/weights.py)."""

    mode: Literal["full", "delta", "lora"] = Field(
        default="full",
        description="full: every tensor each publish. delta: full finetuning, but only tensors "
        "that changed since the engine's version travel, bit-exact (sparse or compressed xor "
        "encoding); a server at another version gets a full sync. lora: train peft LoRA "
        "adapters only (base frozen); after a server's first full sync only the adapter factors "
        "travel and the engine merges W + B@A*alpha/r.",
    )
    transport: Literal["auto", "zmq"] = Field(
        default="auto",
        description="How full weight syncs reach rollout servers. 'auto': servers on the "
        "learner's host map one file the learner writes under /dev/shm (one write for every "
        "local server, no socket copy, a consistent snapshot of the step), others get ZeroMQ "
        "frames; a server that cannot read the file falls back to frames. 'zmq': frames always.",
    )
    lora: LoraCfg = Field(default_factory=LoraCfg, description="LoRA adapters (mode = 'lora').")

    @model_validator(mode="after")
    def _check_lora(self) -> WeightsCfg:
        if self.mode == "lora" and not self.lora.targets:
            raise ValueError(
                "learner.weights.mode = 'lora' needs learner.weights.lora.targets, "
                "e.g. ['q_proj', 'v_proj']"
            )
        return self


class LearnerCfg(_Cfg):
    total_steps: int = Field(default=50, ge=1, description="Optimizer steps to train.")
    batch_groups: int = Field(default=16, ge=1, description="Groups (prompts) per optimizer step.")
    group_size: int = Field(
        default=8,
        ge=1,
        description="Samples per prompt. Group-relative objectives need at least 2; PPO with "
        "a critic also trains on one rollout per prompt.",
    )
    max_staleness: int = Field(
        default=1, ge=0, description="Max policy versions between a token's weights and training."
    )
    publish_every: int = Field(default=1, ge=1, description="Publish weights every N steps.")
    checkpoint_every: int = Field(
        default=0, ge=0, description="Checkpoint every N steps (0 = at end)."
    )
    max_train_minutes: float = Field(
        default=0.0,
        ge=0,
        description="Wall-clock budget of the training loop in minutes (0 = none): no step "
        "starts after it, even short of total_steps; the step in progress finishes, then the "
        "run evaluates and checkpoints as usual. summary.json's train_loop_s is the loop's "
        "time.",
    )
    eval_size: int = Field(
        default=64, ge=0, description="Held-out tasks evaluated greedily before/after."
    )
    eval_every: int = Field(
        default=0,
        ge=0,
        description="Also evaluate the held-out tasks every this many steps during the run "
        "(metrics.jsonl: eval/test_accuracy at that step; the demo's plot shows them); 0 = only "
        "before and after.",
    )
    micro_batch_size: int = Field(
        default=64,
        ge=1,
        description="Samples per forward/backward chunk (when micro_batch_tokens is 0).",
    )
    mismatch_probe_samples: int = Field(
        default=8,
        ge=0,
        description="Each step, up to this many samples that the last published version "
        "generated (lag >= 1) also run a no-grad forward under that version's weights (a copy "
        "of the trainable ones), so the engine/learner log-prob mismatch (mismatch_* in "
        "metrics.jsonl) is measured at equal weights every step of an asynchronous run, not "
        "only on lag-0 samples. One process only (an FSDP learner measures lag 0 only); "
        "0 = lag 0 only.",
    )
    micro_batch_tokens: int = Field(
        default=0,
        ge=0,
        description="Tokens (prompt + completion) per forward/backward chunk, taken in batch "
        "order; a longer sample is a chunk of its own. 0 = chunks of micro_batch_size samples.",
    )
    pack_length: int = Field(
        default=0,
        ge=0,
        description="Pack each chunk's samples end to end into rows of up to this many tokens "
        "(position ids restart per sample, attention stays within it; no padding) instead of "
        "padding every sample to the longest. 0 = padded rows.",
    )
    skip_zero_advantage: bool = Field(
        default=True,
        description="Leave out of the forward and backward the micro-batches whose every "
        "sample has a group-relative advantage of exactly 0 (its whole group scored the "
        "same): their loss and gradient are exactly 0, so the update is the same, bit for bit, "
        "for less compute. The loss's normaliser still counts their tokens. Acts only where "
        "the loss has no term that does not scale with the advantage (no KL, no entropy bonus, "
        "no adaptive clip-high, not PPO) and without FSDP; a step runs at least one "
        "micro-batch. The entropy, clip and mismatch metrics then cover the samples trained; "
        "skipped_samples counts the others.",
    )
    share_prompts: bool = Field(
        default=True,
        description="Run a prompt the samples of a group share once per micro-batch: one row "
        "holds the prompt and then each sample's completion, which attends to the prompt and "
        "to itself (a 4-D mask). The log-probs are those of each sample alone; the forward "
        "and backward skip group_size - 1 copies of the prompt. Off with MoE routing replay.",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each decoder layer's activations in the backward pass instead "
        "of keeping them (transformers' gradient checkpointing): less memory, about one more "
        "forward of time.",
    )
    minibatches: int = Field(
        default=1,
        ge=1,
        description="Optimizer steps per epoch over a batch (PPO-style): the batch's samples are "
        "split into this many mini-batches, each normalised on its own. After the first "
        "step the ratio pi_theta / pi_old moves away from 1, so the clips bind.",
    )
    epochs: int = Field(
        default=1, ge=1, description="Passes over each batch (each pass takes `minibatches` steps)."
    )
    logprob_impl: Literal["auto", "naive", "chunked"] = Field(
        default="auto",
        description="Log-prob/entropy kernel: climbrl.kernels ('auto') or plain torch.",
    )
    threads: int = Field(
        default=0, ge=0, description="torch threads in the learner (0 = torch default)."
    )
    fp32_lm_head: bool = Field(
        default=True,
        description="LM-head matmul and log-softmax in float32 (matching the engine's sampler); "
        "false does the matmul in the model dtype and only the softmax in float32.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where a single-process learner trains (climbrl/learner/device.py): 'auto' "
        "= the first visible CUDA device when there is one, else the CPU; 'cuda' without a "
        "CUDA device is an error. An FSDP learner (learner.fsdp) takes its rank's GPU.",
    )
    autocast: Literal["auto", "bf16", "off"] = Field(
        default="auto",
        description="Mixed precision of the learner's forward: 'bf16' = torch.autocast to "
        "bfloat16 with float32 master weights (the model is loaded in float32; AdamW and "
        "gradients stay float32) and, with fp32_lm_head, the LM head outside autocast in "
        "float32. 'auto' = bf16 on CUDA for bfloat16/float16 models (model.dtype), off on the "
        "CPU (bf16 is several times slower there) and for float32 models, so the learner "
        "computes in the engine's dtype. 'off' = the model dtype throughout.",
    )
    # --- multi-process learner (learner/fsdp.py)
    fsdp: bool = Field(
        default=False,
        description="Shard the policy with torch FSDP2 (fully_shard) across learner.world_size "
        "processes started torchrun-style (NCCL on GPU, gloo on CPU); micro-batches are split "
        "across the ranks and gradients summed, so a step equals the single-process step.",
    )
    world_size: int = Field(
        default=1,
        ge=1,
        description="Learner processes (one per GPU); more than 1 needs learner.fsdp.",
    )
    fsdp_reshard_after_forward: bool = Field(
        default=True,
        description="FSDP2: free gathered parameters after forward (less memory, one more "
        "all-gather in backward).",
    )
    # --- sections
    optim: OptimCfg = Field(default_factory=OptimCfg, description="AdamW.")
    algo: AlgoCfg = Field(
        default_factory=GrpoAlgo,
        description="The objective, chosen by `name` (grpo, gspo, cispo, ppo; "
        "examples/*.toml has one config per objective) with its own fields.",
    )
    shaping: ShapingCfg = Field(default_factory=ShapingCfg, description="Reward shaping, filters.")
    offpolicy: OffPolicyCfg = Field(
        default_factory=OffPolicyCfg, description="Off-policy corrections."
    )
    weights: WeightsCfg = Field(default_factory=WeightsCfg, description="Weight sync.")

    @field_validator("algo", mode="before")
    @classmethod
    def _algo_name(cls, v: Any) -> Any:
        # [learner.algo] without `name` is GRPO; a key of another objective names its owner
        if isinstance(v, dict):
            v = {"name": "grpo", **v}
            algo = ALGOS.get(v["name"])
            if algo is None:
                raise ValueError(
                    f"learner.algo.name = {v['name']!r} is not an objective: use one of "
                    f"{', '.join(ALGOS)}"
                )
            else:
                for key in v:
                    owners = [n for n, a in ALGOS.items() if key in a.model_fields]
                    if key not in algo.model_fields and owners:
                        raise ValueError(
                            f"learner.algo.{key} belongs to name = "
                            f"{' or '.join(repr(o) for o in owners)}, not {v['name']!r}: "
                            f"remove it or set learner.algo.name = {owners[0]!r}"
                        )
        return v

    @model_validator(mode="after")
    def _check_objective(self) -> LearnerCfg:
        if self.minibatches > self.batch_groups * self.group_size:
            raise ValueError(
                f"learner.minibatches = {self.minibatches} exceeds the batch's "
                f"{self.batch_groups * self.group_size} samples (batch_groups x group_size)"
            )
        if self.group_size < 2 and self.algo.name != "ppo":
            raise ValueError(
                f"learner.group_size = 1 gives {self.algo.name!r} no group to compare against; "
                "use group_size >= 2 or learner.algo.name = 'ppo' (learned critic)"
            )
        if self.group_size < 2 and self.shaping.filtering:
            raise ValueError(
                "learner.shaping.dynamic_sampling and learner.shaping.pass_rate_band measure "
                "a pass rate per group: they need learner.group_size >= 2"
            )
        sh = self.shaping
        if sh.target_entropy > 0 and not (
            sh.clip_high_min <= self.algo.clip_high <= sh.clip_high_max
        ):
            raise ValueError(
                "learner.shaping.target_entropy > 0 needs learner.shaping.clip_high_min <= "
                "learner.algo.clip_high <= learner.shaping.clip_high_max"
            )
        if self.world_size > 1 and not self.fsdp:
            raise ValueError(
                "learner.world_size > 1 shards the model with FSDP2: set "
                "learner.fsdp = true (or world_size = 1)"
            )
        if self.fsdp and self.weights.mode == "lora":
            raise ValueError(
                "learner.fsdp with learner.weights.mode = 'lora' is not supported: the "
                "adapters are small, train them in one process (fsdp = false)"
            )
        if self.fsdp and self.algo.name == "ppo":
            raise ValueError(
                "learner.fsdp with learner.algo.name = 'ppo' is not supported yet (the "
                "critic is not sharded); use grpo/gspo/cispo or fsdp = false"
            )
        return self


class WireCfg(_Cfg):
    host: str = Field(
        default="127.0.0.1", description="Learner bind address (loopback by default)."
    )
    port: int = Field(default=0, ge=0, le=65535, description="Learner port (0 = pick a free one).")
    heartbeat_s: float = Field(default=1.0, gt=0, description="Rollout heartbeat period.")
    dead_after_s: float = Field(
        default=10.0, gt=0, description="Silence after which a server is dead."
    )
    connect_timeout_s: float = Field(
        default=300.0, gt=0, description="Wait for servers to say hello."
    )
    weight_sync_timeout_s: float = Field(
        default=120.0, gt=0, description="Deadline for a weight update."
    )
    weight_phase_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Deadline for each phase of a weight update on a rollout server (recv, "
        "decode, stage, pause, reload, resume); past it the update fails, the engine stays on "
        "its previous weights and the ack reports the error.",
    )
    curve: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="How peers authenticate to the learner (climbrl/wirekeys.py); every peer "
        "does, with credentials generated per run, and one without them is refused. 'on': "
        "ZeroMQ CURVE (encrypted, the run's client key); 'off': ZeroMQ PLAIN with the run's "
        "secret (not encrypted: for loopback or a trusted network); 'auto': CURVE whenever "
        "wire.host is not loopback, PLAIN on loopback.",
    )
    order_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Deadline for one work order: a training order past it is sent again, an "
        "eval order past it scores 0 (summary: eval_timeouts), so evaluation always ends.",
    )
    max_order_failures: int = Field(
        default=16,
        ge=1,
        description="Training work orders a rollout server may fail in a row (no trajectory in "
        "between) before the learner stops sending it orders; once no server is left to take "
        "them the run ends with the last error. A server whose engine died takes no orders at "
        "once. Failed eval orders do not count: they score 0 (summary: eval_env_errors).",
    )
    max_env_failures: int = Field(
        default=64,
        ge=1,
        description="Training episodes the environment may fail in a row, across all servers, "
        "with no episode that ran in between, before the run ends with an error that quotes "
        "the env's last one. An episode fails when the env raises or runs past "
        "env.step_timeout_s; a work order whose episodes all failed counts its group_size. "
        "With a single server, whichever of this and max_order_failures is reached first ends "
        "the run; both messages quote the env's error.",
    )
    max_order_failure_rate: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Largest fraction of the last order_failure_window training orders, across "
        "all servers, that may come back as errors; past it the run ends quoting the last "
        "error. Catches a server or env that fails most orders but not enough in a row for "
        "max_order_failures / max_env_failures. 1 = no limit.",
    )
    order_failure_window: int = Field(
        default=64,
        ge=1,
        description="Training orders that max_order_failure_rate is measured over.",
    )
    progress_timeout_s: float = Field(
        default=1800.0,
        ge=0,
        description="Longest the learner waits, with work orders out, for any of them to come "
        "back with a trajectory; past it the run ends with an error naming each server's state "
        "and the last error (an engine that hangs, servers that heartbeat but never answer). "
        "0 = no limit.",
    )
    send_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest a send may wait on a full queue (ZeroMQ's high-water mark): the "
        "rollout server's send to a learner that stops reading, the learner's hand-off to its "
        "socket thread. Past it the rollout server stops and the learner ends the run, each "
        "with a clear error, instead of hanging.",
    )
    max_message_mb: float = Field(
        default=256.0,
        gt=0,
        description="Largest frame the learner accepts from a rollout server (ZMQ_MAXMSGSIZE, "
        "MiB); a peer that sends a bigger one is disconnected. A trajectory is one frame: "
        "raise this for very long groups with MoE routing.",
    )
    recv_hwm: int = Field(
        default=1000,
        ge=1,
        description="Messages ZeroMQ queues per peer on the learner's socket (ZMQ_RCVHWM) "
        "before it stops reading from that peer.",
    )
    inbox_max: int = Field(
        default=10_000,
        ge=1,
        description="Messages the learner's hub holds for the training thread; when full the "
        "hub stops reading its socket until the training thread catches up.",
    )

    @model_validator(mode="after")
    def _check(self) -> WireCfg:
        if self.dead_after_s <= 2 * self.heartbeat_s:
            raise ValueError("wire.dead_after_s must exceed 2 x wire.heartbeat_s")
        return self


class ServeCfg(_Cfg):
    """The OpenAI HTTP API on each rollout server's engine, during a run."""

    enabled: bool = Field(
        default=False,
        description="Expose vLLM's OpenAI API on every rollout server while training.",
    )
    host: str = Field(
        default="127.0.0.1", description="Bind address (loopback unless told otherwise)."
    )
    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the first server; server i uses port + i (0 = pick free ports).",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys accepted on every path but /health and /ping. Empty: each "
        "run generates one, in OUTPUT_DIR/serving/api_key (mode 0600). The env var "
        "CLIMBRL_API_KEY adds one. An empty key is an error.",
    )
    max_body_mb: float = Field(
        default=16.0, gt=0, description="Largest request body accepted, MiB (larger: 413)."
    )
    max_n: int = Field(
        default=16, ge=1, description="Largest 'n' (and 'best_of') of a request (larger: 400)."
    )
    max_tokens: int = Field(
        default=4096,
        ge=1,
        description="Largest 'max_tokens' / 'max_completion_tokens' of a request (larger: "
        "400); a request without one is bounded by rollout.max_model_len.",
    )
    max_concurrent_per_key: int = Field(
        default=256,
        ge=1,
        description="Requests in flight per API key (more: 429). A run's black-box agents "
        "use the first key: keep this above rollout.max_concurrency.",
    )
    max_sessions: int = Field(
        default=1024,
        ge=1,
        description="Captured sessions kept that training does not hold; past it the oldest "
        "is evicted. Sessions a training episode holds are never evicted.",
    )
    session_max_turns: int = Field(
        default=256, ge=1, description="Requests per captured session (more: 400)."
    )
    session_max_mb: float = Field(
        default=8.0,
        gt=0,
        description="Recorded data per captured session, MiB (tokens, log-probs, versions, "
        "text); a request past it is refused (400).",
    )
    session_max_age_s: float = Field(
        default=3600.0,
        gt=0,
        description="A captured session that training does not hold is dropped this long "
        "after it opened.",
    )
    follow: Literal["latest", "pinned"] = Field(
        default="latest",
        description="'latest': learner updates reach the endpoint live. 'pinned': the server "
        "keeps the weights it starts with (it stops taking training orders; POST /climbrl/pin "
        "with null returns it to 'latest').",
    )
    served_model_name: str = Field(
        default="", description="Model name in the API (default: model.path)."
    )
    vllm_args: list[str] = Field(
        default_factory=list,
        description="Extra vLLM serve options, e.g. ['--enable-auto-tool-choice', "
        "'--tool-call-parser', 'hermes'].",
    )

    @field_validator("api_keys")
    @classmethod
    def _no_empty_key(cls, v: list[str]) -> list[str]:
        if any(not k.strip() for k in v):
            raise ValueError(
                "serve.api_keys has an empty key: remove it, or leave the list "
                "empty to have the run generate one"
            )
        return v


class RayCfg(_Cfg):
    """`climbrl run --launcher ray`: where and with what resources the processes are placed."""

    address: str = Field(
        default="",
        description="Ray cluster: 'host:port' of a running head, 'auto' (a cluster running on "
        "this machine), 'local' (start a private one for this run). Empty: RAY_ADDRESS if set, "
        "else a running cluster on this machine, else a private one.",
    )
    namespace: str = Field(default="climbrl", description="Ray namespace of the run's actors.")
    placement_strategy: Literal["auto", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="auto",
        description="Placement group strategy for the learner + rollout bundles. 'auto': "
        "STRICT_PACK (one node) while wire.host is loopback, since servers elsewhere could not "
        "reach the learner; PACK otherwise.",
    )
    learner_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved for the learner.")
    learner_gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs reserved for the learner (learner.world_size with FSDP).",
    )
    rollout_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per rollout server.")
    rollout_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved per rollout server.")
    placement_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Wait this long for the cluster to grant the placement group.",
    )
    start_timeout_s: float = Field(
        default=300.0, gt=0, description="Wait this long for the learner to publish its endpoint."
    )


class PlacementCfg(_Cfg):
    """Which GPUs the learner and the rollout servers get (climbrl/placement.py). Inert on a
    machine without CUDA. GPU indices count the devices the local launcher sees (its own
    CUDA_VISIBLE_DEVICES, when set, is the list they index); under --launcher ray, Ray picks
    the GPUs and the mode sets how many each actor asks for."""

    mode: Literal["auto", "separate", "colocated"] = Field(
        default="auto",
        description="'separate': the learner on its own GPUs (learner.world_size of them), "
        "each rollout server on one GPU of its own. 'colocated': rollout server i shares the "
        "GPU of learner rank i: the engine takes placement.gpu_memory_utilization of it and, "
        "with sleep_level > 0, starts with vLLM's sleep mode, so it can free its memory while "
        "the learner steps (how TRL, verl and OpenRLHF train on one GPU). 'auto': separate "
        "when the machine has a GPU for every process, else colocated; the local launcher "
        "writes the mode it picks into the resolved config (under --launcher ray, 'auto' asks "
        "Ray for no GPUs). A rollout server started alone treats 'auto' as separate.",
    )
    learner_gpus: list[int] = Field(
        default_factory=list,
        description="GPU indices of the learner's processes, one per rank (learner.world_size "
        "of them). Empty: the first ones.",
    )
    rollout_gpus: list[int] = Field(
        default_factory=list,
        description="GPU index of each rollout server (rollout.num_servers of them). Empty: "
        "'separate' takes the GPUs after the learner's, 'colocated' server i takes the GPU of "
        "learner rank i.",
    )
    gpu_memory_utilization: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Fraction of its GPU's memory each vLLM engine may take, weights and KV "
        "cache included (vLLM's gpu_memory_utilization; on CUDA it sizes the KV cache in "
        "place of rollout.kv_cache_gb). 0 = 0.9 when separate, 0.5 when colocated (the rest "
        "is the learner's).",
    )
    sleep_level: Literal[0, 1, 2] = Field(
        default=0,
        description="Colocated: the engines sleep (vLLM's sleep mode) while the learner steps "
        "and wake before the weight update that follows, so the learner has the GPU's memory "
        "to itself; needs learner.max_staleness = 0 (no generation overlaps a step). 1 = a "
        "sleeping engine keeps its weights in CPU memory and frees the KV cache; 2 = it frees "
        "both (the next weight sync is a full one); 0 = no sleep (the memory fraction alone "
        "shares the GPU, and generation overlaps the learner's steps). Ignored when separate "
        "and on the CPU.",
    )


class Config(_Cfg):
    run: RunCfg = Field(default_factory=RunCfg)
    model: ModelCfg
    env: EnvCfg = Field(default_factory=EnvCfg)
    rollout: RolloutCfg = Field(default_factory=RolloutCfg)
    learner: LearnerCfg = Field(default_factory=LearnerCfg)
    wire: WireCfg = Field(default_factory=WireCfg)
    serve: ServeCfg = Field(default_factory=ServeCfg)
    ray: RayCfg = Field(default_factory=RayCfg)
    placement: PlacementCfg = Field(default_factory=PlacementCfg)

    @model_validator(mode="after")
    def _check_placement(self) -> Config:
        from climbrl.placement import check_config

        check_config(self)
        return self

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.learner.batch_groups * self.learner.group_size < 2:
            raise ValueError("learner.batch_groups x learner.group_size must be at least 2")
        if self.learner.publish_every - 1 > self.learner.max_staleness:
            raise ValueError(
                "learner.publish_every - 1 must not exceed learner.max_staleness, or every "
                "group generated between publishes would be too stale to train on"
            )
        if self.rollout.max_tokens >= self.rollout.max_model_len:
            raise ValueError("rollout.max_tokens must be below rollout.max_model_len")
        if 0 < self.ray.learner_gpus < self.learner.world_size:
            raise ValueError(
                f"ray.learner_gpus ({self.ray.learner_gpus}) is below "
                f"learner.world_size ({self.learner.world_size}): one GPU per "
                "learner process"
            )
        budget = self.learner.algo.loss_agg_len or self.rollout.max_tokens
        if self.learner.shaping.overlong_buffer > budget:
            raise ValueError(
                f"learner.shaping.overlong_buffer ({self.learner.shaping.overlong_buffer}) must "
                f"not exceed the length budget ({budget}: learner.algo.loss_agg_len or "
                "rollout.max_tokens)"
            )
        return self


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as JSON/TOML, else a string)."""
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like section.key=value")
        key, raw = ov.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {ov!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def read_toml(
    path: str | Path | None, overrides: list[str] | None = None, moved: dict[str, str] | None = None
) -> dict[str, Any]:
    """The raw dict of a TOML file (or ``{}``) with ``--set`` overrides applied: the loader
    that climbrl's and pretrain's configs share. A key of ``moved`` (an old dotted name) is an
    error that names its new place."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    for ov in overrides or []:
        key = ov.split("=", 1)[0].strip()
        if key in (moved or {}):
            raise ValueError(f"{_moved_msg(key, moved)} (in --set {ov.strip()})")
    data = apply_overrides(data, overrides or [])
    found = [k for k in (moved or {}) if _has_key(data, k)]
    if found:
        raise ValueError(
            "config: "
            + "; ".join(_moved_msg(k, moved) for k in found)
            + (f" (in {str(path)!r})" if path is not None else "")
        )
    return data


def _has_key(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _moved_msg(key: str, moved: dict[str, str] | None) -> str:
    return f"{key} moved: use {(moved or {})[key]}"


# Flat keys and the nested key that holds each: a config or --set that uses one gets an error
# naming the nested key.
MOVED: dict[str, str] = {
    **{f"learner.{k}": f"learner.optim.{k}" for k in OptimCfg.model_fields},
    "learner.objective": "learner.algo.name",
    **{
        f"learner.{k}": f"learner.algo.{k}"
        for a in ALGOS.values()
        for k in a.model_fields
        if k != "name"
    },
    **{f"learner.{k}": f"learner.shaping.{k}" for k in ShapingCfg.model_fields},
    **{
        f"learner.offpolicy_{k}": f"learner.offpolicy.{k}"
        for k in ("correction", "level", "low", "high")
    },
    "learner.stale_policy": "learner.offpolicy.stale_policy",
    "learner.tis_cap": "learner.offpolicy.tis_cap",
    "learner.weight_sync": "learner.weights.mode",
    "wire.weight_transport": "learner.weights.transport",
    **{f"learner.lora_{k}": f"learner.weights.lora.{k}" for k in LoraCfg.model_fields},
}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config, apply overrides and validate. Errors name the bad field."""
    data = read_toml(path, overrides, MOVED)
    return validate(Config, data)


def validate(model: type[_M], data: dict[str, Any]) -> _M:
    """``model.model_validate(data)`` with pydantic's errors as one ValueError, a line per bad
    field, an unknown key with the closest field names."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [
            f"  {_where(err['loc'])}: {err['msg']}{_did_you_mean(model, err)}" for err in e.errors()
        ]
        raise ValueError("invalid config:\n" + "\n".join(lines)) from None


def _where(loc: tuple[Any, ...]) -> str:
    """An error's dotted location, without the tag pydantic adds inside a tagged union
    (learner.algo.ppo.gama -> learner.algo.gama)."""
    parts = [p for i, p in enumerate(loc) if not (i and loc[i - 1] == "algo" and p in ALGOS)]
    return ".".join(map(str, parts))


def _section(annotation: Any, part: Any) -> Any:
    """The config class of a field's annotation; for a tagged union, the variant ``part``
    names (pydantic puts the tag in an error's location)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section(arg, part)
        if found is not None:
            name = found.model_fields.get("name")
            if name is None or part is None or name.default == part:
                return found
    return None


def _did_you_mean(root: type[BaseModel], err: Any) -> str:
    """For an unknown key (pydantic's extra_forbidden): the closest field names of its section,
    e.g. learner.bach_groups -> `batch_groups`."""
    if err["type"] != "extra_forbidden":
        return ""
    *section, key = err["loc"]
    model: Any = root
    parts = list(section)
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return ""
        tag = parts[0] if parts and get_args(field.annotation) else None
        model = _section(field.annotation, tag)
        if model is None:
            return ""  # inside a free-form dict (env.args): any key goes
        if tag is not None and model.model_fields.get("name") is not None:
            parts.pop(0)
    close = difflib.get_close_matches(str(key), list(model.model_fields), n=3, cutoff=0.6)
    return "; did you mean " + " or ".join(f"`{c}`" for c in close) + "?" if close else ""


def toml_literal(v: Any) -> str:
    """``v`` as a TOML value (inline tables and arrays for dicts and lists)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_literal(x)}" for k, x in v.items()) + "}"
    if v is None:
        raise ValueError("TOML has no null; leave the field out")
    raise TypeError(type(v))


def dump_toml(cfg: BaseModel) -> str:
    """Serialise a config as TOML: a table per section, nested sections as ``[a.b]`` tables
    (their values as TOML literals; free-form dicts such as env.args inline)."""
    out: list[str] = []

    def table(name: str, m: BaseModel) -> None:
        subs = []
        out.append(f"[{name}]")
        for k in type(m).model_fields:
            v = getattr(m, k)
            if isinstance(v, BaseModel):
                subs.append((f"{name}.{k}", v))
            elif v is not None:
                out.append(f"{k} = {toml_literal(v)}")
        out.append("")
        for sub_name, sub in subs:
            table(sub_name, sub)

    for section in type(cfg).model_fields:
        v = getattr(cfg, section)
        if isinstance(v, BaseModel):
            table(section, v)
    return "\n".join(out)

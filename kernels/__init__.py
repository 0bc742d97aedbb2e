"""Fused, chunked log-prob and entropy kernels that never materialise the full logits.

    from climbrl.kernels import token_logprobs_and_entropy
    logp_N, ent_N = token_logprobs_and_entropy(hidden_NH, lm_head.weight, targets_N)

See ``logprob.py`` for the maths, the implementations and how "auto" chooses among them.
Tests: ``pytest tests/unit/test_kernels.py`` (CPU) and ``pytest -m gpu tests/unit/test_kernels_gpu.py``;
benchmark: ``python benchmarks/logprob_kernel.py``.
"""

from climbrl.kernels.logprob import (
    ENV_VAR,
    IMPLS,
    default_chunk_size,
    keep_count_threshold,
    logprob_impl,
    naive_token_logprobs_and_entropy,
    resolve_impl,
    token_logprobs_and_entropy,
    triton_available,
)

__all__ = [
    "ENV_VAR",
    "IMPLS",
    "default_chunk_size",
    "keep_count_threshold",
    "logprob_impl",
    "naive_token_logprobs_and_entropy",
    "resolve_impl",
    "token_logprobs_and_entropy",
    "triton_available",
]

"""Per-token log-probs and entropy from hidden states, without the full [N, V] logits.

The learner needs, for every trained token n, the log-prob of its target under the sampling
distribution and that distribution's entropy::

    z_n      = (h_n @ W^T) / T                    (logits, optionally in float32: "FP32 head")
    z'_n,v   = z_n,v if v is kept else -inf        (replayed top-k / top-p mask)
    logp_n   = z'_n,t_n - lse_n,   lse_n = log sum_v exp(z'_n,v)
    ent_n    = lse_n - sum_v p_n,v z_n,v,   p = softmax(z')

Materialising z for N tokens and a 150k vocabulary costs N * V * 4 bytes, several times over
once autograd keeps the intermediates. Three implementations share one public function:

- ``naive``: plain torch autograd, the reference the others are tested against;
- ``chunked``: a ``torch.autograd.Function`` that walks the tokens in chunks, keeps only
  ``lse``, ``ent`` (and the top-k threshold) per token, and recomputes each chunk's logits in
  backward. Peak extra memory is two [chunk, V] float32 buffers. Works on CPU and GPU;
- ``triton``: the same chunk loop with the row-wise softmax / entropy / gradient math fused
  into Triton kernels (``triton_logprob.py``); matmuls stay on cuBLAS.

Gradients (both flow to hidden and weight; d/dz of each output, for a kept v):

    d logp_n / d z_n,v = [v == t_n] - p_n,v
    d ent_n  / d z_n,v = -p_n,v (log p_n,v + ent_n)

A target outside the kept set gets logp = -inf (the reference's value, kept so the learner
can see and count train/inference mismatch); its gradient is what the reference gives:
-p over the kept set (no +1 at the target). Callers must mask such tokens out of a loss.

Choosing the implementation: ``impl=`` per call, else the ``logprob_impl(...)`` context
manager, else env ``CLIMBRL_LOGPROB_IMPL``, else "auto" (triton on CUDA when Triton imports,
chunked otherwise).

Run the tests: ``pytest tests/unit/test_kernels.py``; the benchmark:
``python benchmarks/logprob_kernel.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

IMPLS = ("auto", "naive", "chunked", "triton")
ENV_VAR = "CLIMBRL_LOGPROB_IMPL"

# Rows per chunk come from a budget in logits elements with a floor. The floor keeps each
# chunk's three matmuls large (and the per-chunk read-modify-write of grad_weight [V, H] rare);
# the budget bounds the two [chunk, V] float32 buffers: 64 MiB each on CPU (512 rows at 32k),
# 512 MiB on GPU. Peak memory is then about 2 buffers + grad_weight, whatever N is.
_CPU_CHUNK_ELEMS = 1 << 24
_GPU_CHUNK_ELEMS = 1 << 27
_MIN_CHUNK = 256

_impl_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "climbrl_logprob_impl", default=None
)


@contextlib.contextmanager
def logprob_impl(impl: str) -> Iterator[None]:
    """Force the implementation that ``impl="auto"`` resolves to, inside a ``with`` block."""
    _check_impl_name(impl, "logprob_impl")
    token = _impl_override.set(impl)
    try:
        yield
    finally:
        _impl_override.reset(token)


def _check_impl_name(impl: str, where: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{where}: unknown implementation {impl!r}; choose one of {IMPLS}")


def triton_available() -> bool:
    """True when the Triton kernels can run: Triton imports and there is a CUDA device
    (or Triton's CPU interpreter is switched on with TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """The concrete implementation ("naive" | "chunked" | "triton") a call will use."""
    _check_impl_name(impl, "impl")
    if impl == "auto":
        impl = _impl_override.get() or os.environ.get(ENV_VAR) or "auto"
        _check_impl_name(impl, f"{ENV_VAR} / logprob_impl")
    if impl == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "chunked"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU "
            "interpreter); use impl='chunked' on CPU"
        )
    return impl


def default_chunk_size(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: the largest power of two with chunk * vocab <= the device budget."""
    budget = _GPU_CHUNK_ELEMS if device.type == "cuda" else _CPU_CHUNK_ELEMS
    rows = max(_MIN_CHUNK, budget // max(vocab, 1))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n_tokens))


def compute_dtype(dtype: torch.dtype, fp32_head: bool) -> torch.dtype:
    """The dtype of the LM-head matmul: float32 for an FP32 head (float64 stays float64)."""
    if fp32_head and dtype != torch.float64:
        return torch.float32
    return dtype


def keep_count_threshold(z_NV: Tensor, keep_count_N: Tensor) -> Tensor:
    """Per-row value of the keep_count[n]-th highest logit; logits below it are masked.

    Rows with keep_count 0 or >= V keep everything (threshold -inf). Ties at the threshold
    are kept, so a row may keep more than keep_count entries when logits are exactly equal.
    """
    V = z_NV.shape[-1]
    kc = keep_count_N.to(device=z_NV.device, dtype=torch.long)
    active = (kc > 0) & (kc < V)
    thr = torch.full(kc.shape, float("-inf"), dtype=z_NV.dtype, device=z_NV.device)
    if not bool(active.any()):
        return thr
    kmax = int(kc[active].max())
    top = torch.topk(z_NV[active], kmax, dim=-1, sorted=True).values
    thr[active] = top.gather(1, (kc[active] - 1)[:, None]).squeeze(1)
    return thr


# --------------------------------------------------------------------------------------------
# Reference


def naive_token_logprobs_and_entropy(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    temperature: float = 1.0,
    keep_count_N: Tensor | None = None,
    keep_mask_NV: Tensor | None = None,
    fp32_head: bool = True,
) -> tuple[Tensor, Tensor]:
    """Plain-torch reference: full [N, V] logits, log_softmax, autograd for the backward."""
    cdt = compute_dtype(hidden_NH.dtype, fp32_head)
    logits_NV = (hidden_NH.to(cdt) @ weight_VH.to(cdt).T).to(_out_dtype(cdt))
    z_NV = logits_NV / temperature
    drop_NV: Tensor | None = None
    if keep_count_N is not None:
        drop_NV = z_NV < keep_count_threshold(z_NV.detach(), keep_count_N)[:, None]
    elif keep_mask_NV is not None:
        drop_NV = ~keep_mask_NV.to(z_NV.device)
    if drop_NV is not None:
        z_NV = z_NV.masked_fill(drop_NV, float("-inf"))
    logp_all_NV = torch.log_softmax(z_NV, dim=-1)
    logp_N = logp_all_NV.gather(1, targets_N[:, None]).squeeze(1)
    finite_NV = logp_all_NV if drop_NV is None else logp_all_NV.masked_fill(drop_NV, 0.0)
    ent_N = -(logp_all_NV.exp() * finite_NV).sum(-1)
    return logp_N, ent_N


def _out_dtype(cdt: torch.dtype) -> torch.dtype:
    return torch.float64 if cdt == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Chunked torch


class RowMath(Protocol):
    """A chunk's row math: ``_RowMath`` (torch ops) or ``triton_logprob.TritonRowMath``."""

    fold_temperature: bool
    needs_scratch: bool

    def forward(
        self,
        z_CV: Tensor,
        p_CV: Tensor,
        targets_C: Tensor,
        inv_t: float,
        thr_C: Tensor | None,
        keep_CV: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def backward(
        self,
        z_CV: Tensor,
        p_CV: Tensor,
        targets_C: Tensor,
        inv_t: float,
        thr_C: Tensor | None,
        keep_CV: Tensor | None,
        lse_C: Tensor,
        ent_C: Tensor,
        g_logp_C: Tensor | None,
        g_ent_C: Tensor | None,
        target_kept_C: Tensor,
    ) -> Tensor: ...


class _RowMath:
    """Row-wise softmax statistics and logits gradient on one chunk, in torch ops.

    ``triton_logprob.TritonRowMath`` implements the same two methods with fused kernels.
    Both may overwrite ``z_CV`` in place. Masked logits become a finite stand-in for -inf
    (float min) in the forward so that p * z is 0 * big = 0, never 0 * inf = nan.
    """

    #: whether the chunk loop may fold 1/T into the hidden states instead (saves a pass)
    fold_temperature = True
    #: whether forward/backward use the [C, V] scratch buffer p_CV
    needs_scratch = True

    def forward(
        self,
        z_CV: Tensor,
        p_CV: Tensor,
        targets_C: Tensor,
        inv_t: float,
        thr_C: Tensor | None,
        keep_CV: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (lse_C, ent_C, target logit z_t_C, -inf when the target is masked)."""
        if inv_t != 1.0:
            z_CV.mul_(inv_t)
        zt_C = z_CV.gather(1, targets_C[:, None]).squeeze(1)
        drop_CV = _drop(z_CV, thr_C, keep_CV)
        if drop_CV is not None:
            zt_C = zt_C.masked_fill(drop_CV.gather(1, targets_C[:, None]).squeeze(1), float("-inf"))
            z_CV.masked_fill_(drop_CV, torch.finfo(z_CV.dtype).min)
        m_C1 = z_CV.amax(dim=1, keepdim=True)
        z_CV.sub_(m_C1)
        torch.exp(z_CV, out=p_CV)
        s_C = p_CV.sum(dim=1)
        dot_C = torch.bmm(p_CV[:, None, :], z_CV[:, :, None]).view(-1)  # sum_v e_v (z_v - m)
        log_s_C = s_C.log()
        lse_C = m_C1.squeeze(1) + log_s_C
        ent_C = log_s_C - dot_C / s_C
        return lse_C, ent_C, zt_C

    def backward(
        self,
        z_CV: Tensor,
        p_CV: Tensor,
        targets_C: Tensor,
        inv_t: float,
        thr_C: Tensor | None,
        keep_CV: Tensor | None,
        lse_C: Tensor,
        ent_C: Tensor,
        g_logp_C: Tensor | None,
        g_ent_C: Tensor | None,
        target_kept_C: Tensor,
    ) -> Tensor:
        """-> d loss / d z (pre-temperature logits of this chunk), written into z_CV."""
        if inv_t != 1.0:
            z_CV.mul_(inv_t)
        drop_CV = _drop(z_CV, thr_C, keep_CV)
        torch.sub(z_CV, lse_C[:, None], out=p_CV).exp_()
        if drop_CV is not None:
            p_CV.masked_fill_(drop_CV, 0.0)
        if g_ent_C is None:
            # dz = -g_logp p; the chunk loop skips the backward when both grads are None
            assert g_logp_C is not None
            torch.mul(p_CV, -g_logp_C[:, None], out=z_CV)
        else:
            # dz = p * (-g_ent (z - lse + ent) - g_logp) = p * (-g_ent z + c)
            c_C = g_ent_C * (lse_C - ent_C)
            if g_logp_C is not None:
                c_C = c_C - g_logp_C
            torch.addcmul(c_C[:, None], z_CV, -g_ent_C[:, None], out=z_CV)
            z_CV.mul_(p_CV)
        if g_logp_C is not None:
            z_CV.scatter_add_(1, targets_C[:, None], (g_logp_C * target_kept_C)[:, None])
        if inv_t != 1.0:
            z_CV.mul_(inv_t)
        return z_CV


def _scratch(row_math: RowMath, rows: int, V: int, dtype: torch.dtype, dev: torch.device) -> Tensor:
    if row_math.needs_scratch:
        return torch.empty(rows, V, dtype=dtype, device=dev)
    return torch.empty(rows, 0, dtype=dtype, device=dev)


def _drop(z_CV: Tensor, thr_C: Tensor | None, keep_CV: Tensor | None) -> Tensor | None:
    if thr_C is not None:
        return z_CV < thr_C[:, None]
    if keep_CV is not None:
        return ~keep_CV
    return None


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Chunk loop shared by the torch and Triton row math. Saves only per-token vectors."""

    @staticmethod
    def forward(
        ctx: Any,  # torch's FunctionCtx stub lacks the fields a Function stores on it
        hidden_NH: Tensor,
        weight_VH: Tensor,
        targets_N: Tensor,
        temperature: float,
        keep_count_N: Tensor | None,
        keep_mask_NV: Tensor | None,
        fp32_head: bool,
        chunk: int,
        row_math: RowMath,
    ) -> tuple[Tensor, Tensor]:
        N = hidden_NH.shape[0]
        V = weight_VH.shape[0]
        cdt = compute_dtype(hidden_NH.dtype, fp32_head)
        odt = _out_dtype(cdt)
        dev = hidden_NH.device
        w_VH = weight_VH.to(cdt)
        inv_t = 1.0 / temperature
        fold = row_math.fold_temperature and cdt == odt and inv_t != 1.0
        inv_t_rows = 1.0 if fold else inv_t
        logp_N = torch.empty(N, dtype=odt, device=dev)
        ent_N = torch.empty(N, dtype=odt, device=dev)
        lse_N = torch.empty(N, dtype=odt, device=dev)
        thr_N = None if keep_count_N is None else torch.empty(N, dtype=odt, device=dev)
        kept_N = torch.empty(N, dtype=odt, device=dev)
        z_buf = torch.empty(min(chunk, N), V, dtype=cdt, device=dev)
        z32_buf = z_buf if cdt == odt else torch.empty(min(chunk, N), V, dtype=odt, device=dev)
        p_buf = _scratch(row_math, min(chunk, N), V, odt, dev)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            c = e - s
            h_CH = hidden_NH[s:e].to(cdt)
            if fold:
                h_CH = h_CH * inv_t
            z_CV = torch.mm(h_CH, w_VH.T, out=z_buf[:c])
            if z32_buf is not z_buf:
                z32_buf[:c].copy_(z_CV)
                z_CV = z32_buf[:c]
            thr_C = None
            if keep_count_N is not None:
                # the m-th highest of z / T is the m-th highest of z, scaled (monotone)
                thr_C = keep_count_threshold(z_CV, keep_count_N[s:e]) * inv_t_rows
                assert thr_N is not None
                thr_N[s:e] = thr_C
            keep_CV = None if keep_mask_NV is None else keep_mask_NV[s:e]
            lse_C, ent_C, zt_C = row_math.forward(
                z_CV, p_buf[:c], targets_N[s:e], inv_t_rows, thr_C, keep_CV
            )
            lse_N[s:e] = lse_C
            ent_N[s:e] = ent_C
            logp_N[s:e] = zt_C - lse_C
            kept_N[s:e] = torch.isfinite(zt_C).to(odt)
        del z_buf, z32_buf, p_buf
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N, ent_N, kept_N)
        ctx.thr_N = thr_N
        ctx.keep_mask_NV = keep_mask_NV
        ctx.cfg = (temperature, fp32_head, chunk, row_math)
        ctx.set_materialize_grads(False)
        return logp_N, ent_N

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_logp_N: Tensor | None, g_ent_N: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hidden_NH, weight_VH, targets_N, lse_N, ent_N, kept_N = ctx.saved_tensors
        temperature, fp32_head, chunk, row_math = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = (None,) * 7
        if (g_logp_N is None and g_ent_N is None) or not (need_h or need_w):
            return (None, None, *nones)
        N, V = hidden_NH.shape[0], weight_VH.shape[0]
        cdt = compute_dtype(hidden_NH.dtype, fp32_head)
        odt = _out_dtype(cdt)
        dev = hidden_NH.device
        w_VH = weight_VH.to(cdt)
        inv_t = 1.0 / temperature
        fold = row_math.fold_temperature and cdt == odt and inv_t != 1.0
        inv_t_rows = 1.0 if fold else inv_t
        g_logp_N = None if g_logp_N is None else g_logp_N.to(odt)
        g_ent_N = None if g_ent_N is None else g_ent_N.to(odt)
        grad_h = torch.empty(N, hidden_NH.shape[1], dtype=cdt, device=dev) if need_h else None
        grad_w = torch.zeros(V, weight_VH.shape[1], dtype=odt, device=dev) if need_w else None
        z_buf = torch.empty(min(chunk, N), V, dtype=cdt, device=dev)
        z32_buf = z_buf if cdt == odt else torch.empty(min(chunk, N), V, dtype=odt, device=dev)
        p_buf = _scratch(row_math, min(chunk, N), V, odt, dev)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            c = e - s
            h_CH = hidden_NH[s:e].to(cdt)
            if fold:
                h_CH = h_CH * inv_t
            z_CV = torch.mm(h_CH, w_VH.T, out=z_buf[:c])
            if z32_buf is not z_buf:
                z32_buf[:c].copy_(z_CV)
                z_CV = z32_buf[:c]
            g_CV = row_math.backward(
                z_CV,
                p_buf[:c],
                targets_N[s:e],
                inv_t_rows,
                None if ctx.thr_N is None else ctx.thr_N[s:e],
                None if ctx.keep_mask_NV is None else ctx.keep_mask_NV[s:e],
                lse_N[s:e],
                ent_N[s:e],
                None if g_logp_N is None else g_logp_N[s:e],
                None if g_ent_N is None else g_ent_N[s:e],
                kept_N[s:e],
            )
            if g_CV.dtype != cdt:
                g_CV = z_buf[:c].copy_(g_CV)
            if grad_h is not None:
                torch.mm(g_CV, w_VH, out=grad_h[s:e])
                if fold:
                    grad_h[s:e].mul_(inv_t)
            if grad_w is not None:
                if cdt == odt:
                    grad_w.addmm_(g_CV.T, h_CH)
                else:
                    grad_w.add_(g_CV.T @ h_CH)
        gh = None if grad_h is None else grad_h.to(hidden_NH.dtype)
        gw = None if grad_w is None else grad_w.to(weight_VH.dtype)
        return (gh, gw, *nones)


# --------------------------------------------------------------------------------------------
# Public entry point


def token_logprobs_and_entropy(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    *,
    temperature: float = 1.0,
    keep_count_N: Tensor | None = None,
    keep_mask_NV: Tensor | None = None,
    fp32_head: bool = True,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-prob of each target and entropy of each row of softmax(mask(hidden @ W^T / T)).

    Args:
        hidden_NH: [N, H] final hidden states (flatten [B, T, H] first); any float dtype.
        weight_VH: [V, H] LM-head weight.
        targets_N: [N] target token ids.
        temperature: sampling temperature (> 0); logits are divided by it.
        keep_count_N: [N] replayed top-k/top-p mask as "keep the m highest logits"; 0 or
            >= V keeps the whole row. Ties at the m-th value are kept.
        keep_mask_NV: [N, V] bool replayed mask, True = kept. Exclusive with keep_count_N.
        fp32_head: matmul and softmax in float32 (like the engine's FP32 LM head); False does
            the matmul in the input dtype and the softmax in float32.
        impl: "auto" | "naive" | "chunked" | "triton" (see module docstring for "auto").
        chunk_size: tokens per chunk for chunked/triton; default from the vocab size.

    Returns:
        (logp_N, ent_N), float32 (float64 for float64 inputs). logp is -inf where the target
        is outside the kept set.
    """
    _validate(hidden_NH, weight_VH, targets_N, temperature, keep_count_N, keep_mask_NV, chunk_size)
    which = resolve_impl(impl, hidden_NH.device)
    if which == "naive":
        return naive_token_logprobs_and_entropy(
            hidden_NH, weight_VH, targets_N, temperature, keep_count_N, keep_mask_NV, fp32_head
        )
    N, V = hidden_NH.shape[0], weight_VH.shape[0]
    if N == 0:
        odt = _out_dtype(compute_dtype(hidden_NH.dtype, fp32_head))
        # keep the (empty) outputs on the graph so a loss built from them can backward
        empty = hidden_NH.new_zeros(0, dtype=odt) + (weight_VH.sum() + hidden_NH.sum()) * 0
        return empty, empty.clone()
    chunk = chunk_size or default_chunk_size(N, V, hidden_NH.device)
    if which == "triton":
        from climbrl.kernels.triton_logprob import TritonRowMath

        row_math: RowMath = TritonRowMath()
    else:
        row_math = _RowMath()
    if keep_mask_NV is not None:
        keep_mask_NV = keep_mask_NV.to(device=hidden_NH.device, dtype=torch.bool)
    if keep_count_N is not None:
        keep_count_N = keep_count_N.to(hidden_NH.device)
    logp_N, ent_N = _ChunkedLogprobEntropy.apply(
        hidden_NH,
        weight_VH,
        targets_N.to(device=hidden_NH.device, dtype=torch.long),
        float(temperature),
        keep_count_N,
        keep_mask_NV,
        fp32_head,
        chunk,
        row_math,
    )
    return logp_N, ent_N


def _validate(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    temperature: float,
    keep_count_N: Tensor | None,
    keep_mask_NV: Tensor | None,
    chunk_size: int | None,
) -> None:
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden_NH.shape)} and "
            f"{tuple(weight_VH.shape)} (flatten [B, T, H] with .reshape(-1, H))"
        )
    N, H = hidden_NH.shape
    V = weight_VH.shape[0]
    if weight_VH.shape[1] != H:
        raise ValueError(f"hidden size mismatch: hidden has H={H}, weight has {weight_VH.shape[1]}")
    if not (hidden_NH.is_floating_point() and weight_VH.is_floating_point()):
        raise ValueError("hidden and weight must be floating point tensors")
    if targets_N.shape != (N,) or targets_N.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets must be an integer tensor of shape [{N}]; got {targets_N.dtype} "
            f"{tuple(targets_N.shape)}"
        )
    if N and (int(targets_N.min()) < 0 or int(targets_N.max()) >= V):
        raise ValueError(
            f"targets must lie in [0, {V}); got [{int(targets_N.min())}, {int(targets_N.max())}]"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if keep_count_N is not None and keep_mask_NV is not None:
        raise ValueError("give keep_count_N or keep_mask_NV, not both")
    if keep_count_N is not None:
        if keep_count_N.shape != (N,) or keep_count_N.is_floating_point():
            raise ValueError(f"keep_count_N must be an integer tensor of shape [{N}]")
        if N and int(keep_count_N.min()) < 0:
            raise ValueError("keep_count_N must be >= 0 (0 keeps the whole row)")
    if keep_mask_NV is not None:
        if keep_mask_NV.shape != (N, V) or keep_mask_NV.dtype != torch.bool:
            raise ValueError(f"keep_mask_NV must be a bool tensor of shape [{N}, {V}]")
        if N and not bool(keep_mask_NV.any(dim=1).all()):
            raise ValueError("keep_mask_NV keeps nothing in some row; every row needs >= 1 True")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")

"""Triton row kernels for the chunked log-prob / entropy (imported lazily, GPU only).

The chunk loop in ``logprob.py`` computes each chunk's logits with a cuBLAS matmul and hands
the [C, V] buffer to ``TritonRowMath``:

- ``_fwd_kernel``: one program per row, a single read of the row. An online (per-lane) max /
  sum-exp / sum-exp*z gives lse and entropy; temperature and the replayed mask (top-k threshold
  or dense keep mask) are applied on the fly, and the target logit is gathered.
- ``_bwd_kernel``: one program per row, one read and one in-place write: the gradient of
  g_logp * logp + g_ent * ent w.r.t. the raw logits, which the loop then multiplies into
  grad_hidden and grad_weight with cuBLAS.

So both forward and backward of the softmax part are Triton; the matmuls (forward, the
backward recompute, and the two gradient products) are torch. Nothing of size [N, V] is kept.

Runs on CUDA; the tests also run it on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Finite stand-in for -inf: keeps exp(m_old - m_new) and (m_j - M) * s_j free of inf - inf.
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _fwd_kernel(
    z_ptr,
    stride_z,
    tgt_ptr,
    thr_ptr,
    keep_ptr,
    stride_keep,
    lse_ptr,
    ent_ptr,
    zt_ptr,
    V,
    inv_t,
    HAS_THR: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    if HAS_THR:
        thr = tl.load(thr_ptr + row)
    # per-lane running max m, sum of e = exp(z - m), and sum of e * (z - m)
    m = tl.full([BLOCK_V], _NEG, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        valid = idx < V
        z = tl.load(z_row + idx, mask=valid, other=0.0).to(tl.float32) * inv_t
        if HAS_THR:
            valid = valid & (z >= thr)
        if HAS_KEEP:
            k = tl.load(keep_ptr + row * stride_keep + idx, mask=idx < V, other=0)
            valid = valid & (k != 0)
        m_new = tl.maximum(m, tl.where(valid, z, _NEG))
        alpha = tl.exp(m - m_new)
        e = tl.exp(tl.where(valid, z - m_new, _NEG))
        d = alpha * (d + (m - m_new) * s) + e * tl.where(valid, z - m_new, 0.0)
        s = alpha * s + e
        m = m_new
    big_m = tl.max(m, axis=0)
    w = tl.exp(m - big_m)
    big_s = tl.sum(w * s, axis=0)
    big_d = tl.sum(w * (d + (m - big_m) * s), axis=0)
    log_s = tl.log(big_s)
    lse = big_m + log_s
    ent = log_s - big_d / big_s  # pyright: ignore[reportOperatorIssue]  # tl.sum's stub returns a tuple

    tgt = tl.load(tgt_ptr + row)
    zt = tl.load(z_row + tgt).to(tl.float32) * inv_t
    kept = zt == zt  # True
    if HAS_THR:
        kept = kept & (zt >= thr)
    if HAS_KEEP:
        kept = kept & (tl.load(keep_ptr + row * stride_keep + tgt) != 0)
    zt = tl.where(kept, zt, float("-inf"))
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, ent)
    tl.store(zt_ptr + row, zt)


@triton.jit
def _bwd_kernel(
    z_ptr,
    stride_z,
    tgt_ptr,
    thr_ptr,
    keep_ptr,
    stride_keep,
    lse_ptr,
    ent_ptr,
    glogp_ptr,
    gent_ptr,
    kept_ptr,
    V,
    inv_t,
    HAS_THR: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    ent = tl.load(ent_ptr + row)
    g_logp = tl.load(glogp_ptr + row)
    g_ent = tl.load(gent_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    g_tgt = g_logp * tl.load(kept_ptr + row)
    if HAS_THR:
        thr = tl.load(thr_ptr + row)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        in_row = idx < V
        z = tl.load(z_row + idx, mask=in_row, other=0.0).to(tl.float32) * inv_t
        valid = in_row
        if HAS_THR:
            valid = valid & (z >= thr)
        if HAS_KEEP:
            k = tl.load(keep_ptr + row * stride_keep + idx, mask=in_row, other=0)
            valid = valid & (k != 0)
        logp = z - lse
        p = tl.exp(tl.where(valid, logp, _NEG))
        # d/dz [g_logp logp_t + g_ent ent] = g_logp ([v == t] - p) - g_ent p (logp + ent)
        g = -p * (g_logp + g_ent * (logp + ent))
        g = g + tl.where(idx == tgt, g_tgt, 0.0)
        tl.store(z_row + idx, (g * inv_t).to(z_ptr.dtype.element_ty), mask=in_row)


_BLOCK_V = 2048
_NUM_WARPS = 8


class TritonRowMath:
    """Same contract as ``logprob._RowMath``, with fused Triton kernels."""

    #: temperature is applied inside the kernels, for free
    fold_temperature = False
    #: the kernels work in registers: no [C, V] scratch buffer
    needs_scratch = False

    def forward(
        self,
        z_CV: Tensor,
        p_CV: Tensor,
        targets_C: Tensor,
        inv_t: float,
        thr_C: Tensor | None,
        keep_CV: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        C, V = z_CV.shape
        assert z_CV.stride(1) == 1
        lse_C = torch.empty(C, dtype=torch.float32, device=z_CV.device)
        ent_C = torch.empty_like(lse_C)
        zt_C = torch.empty_like(lse_C)
        thr, keep, stride_keep = _mask_args(z_CV, thr_C, keep_CV)
        _fwd_kernel[(C,)](
            z_CV, z_CV.stride(0), targets_C, thr, keep, stride_keep,
            lse_C, ent_C, zt_C, V, float(inv_t),
            HAS_THR=thr_C is not None, HAS_KEEP=keep_CV is not None,
            BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS,  # pyright: ignore[reportCallIssue]  # a launch option
        )  # fmt: skip
        return lse_C.to(z_CV.dtype), ent_C.to(z_CV.dtype), zt_C.to(z_CV.dtype)

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
        C, V = z_CV.shape
        assert z_CV.stride(1) == 1
        zeros = torch.zeros(C, dtype=torch.float32, device=z_CV.device)
        g_logp = zeros if g_logp_C is None else g_logp_C.float().contiguous()
        g_ent = zeros if g_ent_C is None else g_ent_C.float().contiguous()
        thr, keep, stride_keep = _mask_args(z_CV, thr_C, keep_CV)
        _bwd_kernel[(C,)](
            z_CV, z_CV.stride(0), targets_C, thr, keep, stride_keep,
            lse_C.float().contiguous(), ent_C.float().contiguous(), g_logp, g_ent,
            target_kept_C.float().contiguous(), V, float(inv_t),
            HAS_THR=thr_C is not None, HAS_KEEP=keep_CV is not None,
            BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS,  # pyright: ignore[reportCallIssue]  # a launch option
        )  # fmt: skip
        return z_CV


def _mask_args(
    z_CV: Tensor, thr_C: Tensor | None, keep_CV: Tensor | None
) -> tuple[Tensor, Tensor, int]:
    """Kernel pointers for the optional masks (a dummy tensor where a mask is absent)."""
    dummy = z_CV
    thr = dummy if thr_C is None else thr_C.float().contiguous()
    if keep_CV is None:
        return thr, dummy, 0
    keep = keep_CV if keep_CV.stride(1) == 1 else keep_CV.contiguous()
    keep = keep.view(torch.uint8)
    return thr, keep, keep.stride(0)

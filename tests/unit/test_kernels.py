"""CPU tests of climbrl.kernels: chunked log-prob/entropy against the plain-torch reference.

Run: ``pytest tests/unit/test_kernels.py`` (about half a minute on 2 cores). The Triton kernels
are checked here too where Triton is installed: they compile for sm_90 without a GPU, and they
run under Triton's CPU interpreter in a subprocess. On-device runs are in test_kernels_gpu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from climbrl.kernels import (
    ENV_VAR,
    default_chunk_size,
    keep_count_threshold,
    logprob_impl,
    naive_token_logprobs_and_entropy,
    resolve_impl,
    token_logprobs_and_entropy,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}
CPU = torch.device("cpu")


def make_inputs(
    n: int, h: int, v: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden/weight scaled so that logits have a std of about 2, like a trained LM head."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * (2.0 / h**0.5)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden.to(dtype), weight.to(dtype), targets


def run_with_grads(
    impl: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    **kw: object,
) -> tuple[torch.Tensor, ...]:
    """Forward, then backward of sum(g_logp * logp) + sum(g_ent * ent) over finite logps."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = token_logprobs_and_entropy(h, w, targets, impl=impl, **kw)
    loss = torch.zeros((), dtype=logp.dtype)
    if g_logp is not None:
        loss = loss + torch.where(torch.isfinite(logp), logp, 0.0).mul(g_logp).sum()
    if g_ent is not None:
        loss = loss + ent.mul(g_ent).sum()
    loss.backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], **tol: float) -> None:
    for name, x, y in zip(("logp", "ent", "grad_hidden", "grad_weight"), a, b, strict=True):
        torch.testing.assert_close(x, y, **(tol or TOL), msg=lambda m, n=name: f"{n}: {m}")


def mask_kwargs(variant: str, n: int, v: int, targets: torch.Tensor, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    if variant == "plain":
        return {}
    if variant == "temperature":
        return {"temperature": 0.7}
    if variant == "keep_count":
        # mix of real top-k rows, keep-all rows (0 and >= V) and top-1
        kc = torch.randint(1, max(2, v // 3), (n,), generator=g)
        kc[::5] = 0
        kc[1::7] = v + 3
        kc[2::11] = 1
        return {"keep_count_N": kc, "temperature": 1.3}
    if variant == "keep_mask":
        keep = torch.rand(n, v, generator=g) < 0.3
        keep[torch.arange(n), targets] |= torch.rand(n, generator=g) < 0.8  # some targets dropped
        keep[:, 0] = True
        return {"keep_mask_NV": keep, "temperature": 0.9}
    raise AssertionError(variant)


SHAPES = [(1, 8, 5), (37, 16, 101), (130, 32, 257), (64, 24, 1000)]
VARIANTS = ["plain", "temperature", "keep_count", "keep_mask"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_matches_reference(shape: tuple[int, int, int], variant: str) -> None:
    n, h, v = shape
    hidden, weight, targets = make_inputs(n, h, v, seed=n + v)
    kw = mask_kwargs(variant, n, v, targets, seed=n)
    g = torch.Generator().manual_seed(7)
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1
    ref = run_with_grads("naive", hidden, weight, targets, g_logp, g_ent, **kw)
    for chunk in (1, 7, None) if n < 64 else (7, None):
        got = run_with_grads(
            "chunked", hidden, weight, targets, g_logp, g_ent, chunk_size=chunk, **kw
        )
        assert torch.equal(torch.isfinite(got[0]), torch.isfinite(ref[0]))
        assert_same(got, ref)
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_gradcheck_float64(variant: str) -> None:
    """The hand-written backward against finite differences, independently of the reference."""
    n, h, v = 6, 5, 13
    hidden, weight, targets = make_inputs(n, h, v, seed=3, dtype=torch.float64)
    kw = mask_kwargs(variant, n, v, targets, seed=3)
    hidden.requires_grad_()
    weight.requires_grad_()

    def fn(hd: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp, ent = token_logprobs_and_entropy(hd, w, targets, impl="chunked", chunk_size=4, **kw)
        return torch.where(torch.isfinite(logp), logp, 0.0), ent

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("used", ["logp_only", "ent_only"])
def test_one_output_used(used: str) -> None:
    n, h, v = 40, 16, 300
    hidden, weight, targets = make_inputs(n, h, v, seed=11)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    grads = (g, None) if used == "logp_only" else (None, g)
    ref = run_with_grads("naive", hidden, weight, targets, *grads, temperature=0.8)
    got = run_with_grads("chunked", hidden, weight, targets, *grads, temperature=0.8, chunk_size=16)
    assert_same(got, ref)


def test_target_outside_kept_set() -> None:
    """logp is -inf there, like the reference, and the gradient is the reference's: -p * g."""
    n, h, v = 9, 8, 50
    hidden, weight, targets = make_inputs(n, h, v, seed=5)
    keep = torch.zeros(n, v, dtype=torch.bool)
    keep[:, :10] = True
    targets[:4] = 20 + torch.arange(4)  # dropped
    targets[4:] = torch.arange(5)  # kept
    g = torch.randn(n, generator=torch.Generator().manual_seed(2))
    out = {}
    for impl in ("naive", "chunked"):
        hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = token_logprobs_and_entropy(
            hd, w, targets, keep_mask_NV=keep, impl=impl, chunk_size=4
        )
        assert torch.isneginf(logp[:4]).all() and torch.isfinite(logp[4:]).all()
        out[impl] = (logp.detach(), ent.detach(), *torch.autograd.grad(logp, (hd, w), g))
    for x, y in zip(out["chunked"], out["naive"], strict=True):
        assert torch.isfinite(x[~torch.isinf(x)]).all()
        torch.testing.assert_close(x, y, **TOL)


def test_keep_count_semantics() -> None:
    n, h, v = 20, 12, 64
    hidden, weight, targets = make_inputs(n, h, v, seed=9)
    z = hidden @ weight.T
    targets = z.argmax(-1)
    one = torch.ones(n, dtype=torch.long)
    logp, ent = token_logprobs_and_entropy(hidden, weight, targets, keep_count_N=one)
    torch.testing.assert_close(logp, torch.zeros(n), atol=0, rtol=0)  # top-1: prob 1
    torch.testing.assert_close(ent, torch.zeros(n), atol=1e-6, rtol=0)
    # 0 and >= V keep everything
    plain = token_logprobs_and_entropy(hidden, weight, targets)
    for kc in (torch.zeros(n, dtype=torch.long), torch.full((n,), v)):
        torch.testing.assert_close(
            token_logprobs_and_entropy(hidden, weight, targets, keep_count_N=kc), plain, **TOL
        )
    # keep_count m == the dense mask of the m highest logits
    m = torch.randint(1, v, (n,), generator=torch.Generator().manual_seed(4))
    order = z.argsort(dim=-1, descending=True)
    keep = torch.zeros(n, v, dtype=torch.bool)
    keep.scatter_(1, order, torch.arange(v)[None, :] < m[:, None])
    a = token_logprobs_and_entropy(
        hidden, weight, targets, keep_count_N=m, impl="chunked", chunk_size=3
    )
    b = token_logprobs_and_entropy(
        hidden, weight, targets, keep_mask_NV=keep, impl="chunked", chunk_size=5
    )
    torch.testing.assert_close(a, b, **TOL)
    thr = keep_count_threshold(z, m)
    assert torch.equal((z >= thr[:, None]).sum(-1), m)


def test_low_precision_inputs() -> None:
    n, h, v = 48, 32, 500
    hidden, weight, targets = make_inputs(n, h, v, seed=13)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    g = torch.Generator().manual_seed(3)
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1
    # FP32 head: the same numbers as float32 inputs holding the bf16 values; grads come back bf16
    ref = run_with_grads("naive", hb.float(), wb.float(), targets, g_logp, g_ent, temperature=0.6)
    got = run_with_grads("chunked", hb, wb, targets, g_logp, g_ent, temperature=0.6, chunk_size=8)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)
    torch.testing.assert_close(got[2], ref[2].bfloat16(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got[3], ref[3].bfloat16(), rtol=1e-2, atol=1e-3)
    # bf16 head: chunked vs naive agree to bf16 precision, outputs stay float32
    kw = {"temperature": 0.6, "fp32_head": False}
    ref16 = run_with_grads("naive", hb, wb, targets, g_logp, g_ent, **kw)
    got16 = run_with_grads("chunked", hb, wb, targets, g_logp, g_ent, chunk_size=8, **kw)
    assert got16[0].dtype == torch.float32
    assert_same(got16, ref16, rtol=2e-2, atol=2e-2)


def test_saves_no_vocab_sized_tensor() -> None:
    """The memory claim: autograd keeps only inputs and [N] vectors, never [N, V]."""
    n, h, v = 64, 16, 4096
    hidden, weight, targets = make_inputs(n, h, v, seed=1)
    hidden.requires_grad_()
    weight.requires_grad_()
    saved: dict[str, int] = {}
    for impl in ("naive", "chunked"):
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_logprobs_and_entropy(hidden, weight, targets, impl=impl, temperature=0.5)
        saved[impl] = max(sizes)
    assert saved["naive"] >= n * v
    assert saved["chunked"] == v * h  # the weight itself, by reference


def test_no_grad_inputs_and_empty() -> None:
    hidden, weight, targets = make_inputs(10, 8, 30)
    with torch.no_grad():
        a = token_logprobs_and_entropy(hidden, weight, targets, impl="chunked")
    b = naive_token_logprobs_and_entropy(hidden, weight, targets)
    torch.testing.assert_close(a, b, **TOL)
    w = weight.clone().requires_grad_()
    logp, ent = token_logprobs_and_entropy(hidden[:0], w, targets[:0])
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_impl("auto", CPU) == "chunked"
    assert resolve_impl("naive", CPU) == "naive"
    with logprob_impl("naive"):
        assert resolve_impl("auto", CPU) == "naive"
        assert resolve_impl("chunked", CPU) == "chunked"  # an explicit impl wins
    monkeypatch.setenv(ENV_VAR, "naive")
    assert resolve_impl("auto", CPU) == "naive"
    with logprob_impl("chunked"):  # the context manager wins over the env var
        assert resolve_impl("auto", CPU) == "chunked"
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_impl("auto", CPU)
    with pytest.raises(ValueError, match="unknown implementation"):
        resolve_impl("cuda", CPU)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_impl("triton", CPU)
    assert default_chunk_size(100_000, 32_768, CPU) == 512
    assert default_chunk_size(100_000, 152_064, CPU) == 256
    assert default_chunk_size(5, 1000, CPU) == 5


def test_bad_input() -> None:
    hidden, weight, targets = make_inputs(4, 8, 30)
    f = token_logprobs_and_entropy
    with pytest.raises(ValueError, match="flatten"):
        f(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="hidden size"):
        f(hidden[:, :4], weight, targets)
    with pytest.raises(ValueError, match="targets must lie"):
        f(hidden, weight, targets + 30)
    with pytest.raises(ValueError, match="temperature"):
        f(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="not both"):
        f(hidden, weight, targets, keep_count_N=torch.ones(4, dtype=torch.long),
          keep_mask_NV=torch.ones(4, 30, dtype=torch.bool))  # fmt: skip
    with pytest.raises(ValueError, match=">= 1 True"):
        f(hidden, weight, targets, keep_mask_NV=torch.zeros(4, 30, dtype=torch.bool))
    with pytest.raises(ValueError, match=">= 0"):
        f(hidden, weight, targets, keep_count_N=-torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        f(hidden, weight, targets, chunk_size=0)


# --------------------------------------------------------------------------------------------
# Triton kernels without a GPU


def test_triton_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from climbrl.kernels import triton_logprob as tk

    common = {"z_ptr": "*fp32", "stride_z": "i64", "tgt_ptr": "*i64", "thr_ptr": "*fp32",
              "keep_ptr": "*u8", "stride_keep": "i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32"}  # fmt: skip
    tail = {"V": "i32", "inv_t": "fp32", "HAS_THR": "constexpr", "HAS_KEEP": "constexpr",
            "BLOCK_V": "constexpr"}  # fmt: skip
    sig_f = {**common, "zt_ptr": "*fp32", **tail}
    sig_b = {**common, "z_ptr": "*bf16", "glogp_ptr": "*fp32", "gent_ptr": "*fp32",
             "kept_ptr": "*fp32", **tail}  # fmt: skip
    for fn, sig in ((tk._fwd_kernel, sig_f), (tk._bwd_kernel, sig_b)):
        for has_thr, has_keep in ((False, False), (True, False), (False, True)):
            src = ASTSource(
                fn, sig, constexprs={"HAS_THR": has_thr, "HAS_KEEP": has_keep, "BLOCK_V": 2048}
            )
            kernel = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            assert "cubin" in kernel.asm


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    from climbrl.kernels import token_logprobs_and_entropy as f
    torch.manual_seed(0)
    n, h, v = 19, 16, 2500
    hidden = torch.randn(n, h) * 0.5
    weight = torch.randn(v, h) * 0.5
    targets = torch.randint(0, v, (n,))
    keep = torch.rand(n, v) < 0.5
    keep[:, 0] = True
    cases = [{}, {"temperature": 0.7}, {"keep_count_N": torch.randint(0, 40, (n,))},
             {"keep_mask_NV": keep, "temperature": 1.3}]
    g = torch.randn(2, n)
    for kw in cases:
        res = []
        for impl in ("naive", "triton"):
            hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            logp, ent = f(hd, w, targets, impl=impl, chunk_size=8, **kw)
            (torch.where(torch.isfinite(logp), logp, 0) * g[0] + ent * g[1]).sum().backward()
            res.append((logp.detach(), ent.detach(), hd.grad, w.grad))
        for x, y in zip(*res):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    print("ok")
    """
)


def test_triton_kernels_in_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env.pop(ENV_VAR, None)
    res = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]

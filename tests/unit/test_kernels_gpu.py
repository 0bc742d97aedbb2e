"""GPU tests of climbrl.kernels: the Triton kernel (and chunked torch on CUDA) against the reference.

Run on a machine with CUDA and Triton: ``pytest -m gpu tests/unit/test_kernels_gpu.py``.
Every test is marked ``gpu`` and skips without CUDA, so the default suite
(``-m "not slow and not gpu"``) never collects work here.
"""

from __future__ import annotations

import pytest
import torch

from climbrl.kernels import (
    logprob_impl,
    resolve_impl,
    token_logprobs_and_entropy,
    triton_available,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {"rtol": 1e-5, "atol": 1e-5}
SHAPES = [(1, 8, 5), (37, 16, 101), (130, 64, 4099), (300, 128, 32768)]
VARIANTS = ["plain", "temperature", "keep_count", "keep_mask"]


def needs_triton() -> None:
    if not triton_available():
        pytest.skip("Triton is not importable")


def make_case(n: int, h: int, v: int, variant: str, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=torch.float64) * (2.0 / h**0.5)).float()
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).float()
    targets = torch.randint(0, v, (n,), generator=g)
    kw: dict = {}
    if variant == "temperature":
        kw = {"temperature": 0.7}
    elif variant == "keep_count":
        kc = torch.randint(1, max(2, v // 3), (n,), generator=g)
        kc[::5] = 0
        kc[2::11] = 1
        kw = {"keep_count_N": kc.cuda(), "temperature": 1.3}
    elif variant == "keep_mask":
        keep = torch.rand(n, v, generator=g) < 0.3
        keep[torch.arange(n), targets] |= torch.rand(n, generator=g) < 0.8
        keep[:, 0] = True
        kw = {"keep_mask_NV": keep.cuda(), "temperature": 0.9}
    g_out = torch.randn(2, n, generator=g)
    return hidden.cuda(), weight.cuda(), targets.cuda(), kw, g_out.cuda()


def fwd_bwd(impl: str, hidden, weight, targets, kw, g_out, **extra) -> tuple:  # noqa: ANN001
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = token_logprobs_and_entropy(h, w, targets, impl=impl, **kw, **extra)
    loss = (torch.where(torch.isfinite(logp), logp, 0.0) * g_out[0]).sum() + (ent * g_out[1]).sum()
    loss.backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def assert_same(a: tuple, b: tuple, **tol: float) -> None:
    for name, x, y in zip(("logp", "ent", "grad_hidden", "grad_weight"), a, b, strict=True):
        torch.testing.assert_close(x, y, **(tol or TOL), msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(autouse=True)
def _exact_fp32_matmul() -> None:
    # TF32 would put 1e-3 errors into both sides differently
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_matches_reference_on_gpu(shape: tuple[int, int, int], variant: str, impl: str) -> None:
    if impl == "triton":
        needs_triton()
    case = make_case(*shape, variant, seed=shape[0])
    ref = fwd_bwd("naive", *case)
    for chunk in (7, None):
        got = fwd_bwd(impl, *case, chunk_size=chunk)
        assert torch.equal(torch.isfinite(got[0]), torch.isfinite(ref[0]))
        assert_same(got, ref)


def test_triton_bf16_inputs() -> None:
    needs_triton()
    hidden, weight, targets, kw, g_out = make_case(200, 64, 5000, "temperature", seed=3)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    ref = fwd_bwd("naive", hb.float(), wb.float(), targets, kw, g_out)
    got = fwd_bwd("triton", hb, wb, targets, kw, g_out, chunk_size=64)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)
    torch.testing.assert_close(got[2], ref[2].bfloat16(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got[3], ref[3].bfloat16(), rtol=1e-2, atol=1e-3)
    ref16 = fwd_bwd("naive", hb, wb, targets, kw, g_out, fp32_head=False)
    got16 = fwd_bwd("triton", hb, wb, targets, kw, g_out, fp32_head=False, chunk_size=64)
    assert_same(got16, ref16, rtol=2e-2, atol=2e-2)


def test_auto_picks_triton_on_cuda() -> None:
    needs_triton()
    dev = torch.device("cuda")
    assert resolve_impl("auto", dev) == "triton"
    with logprob_impl("chunked"):
        assert resolve_impl("auto", dev) == "chunked"


def test_triton_peak_memory_below_naive() -> None:
    needs_triton()
    n, h, v = 2048, 256, 152064
    hidden, weight, targets, kw, g_out = make_case(n, h, v, "plain")
    peaks = {}
    for impl in ("naive", "triton"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(impl, hidden, weight, targets, kw, g_out)
        torch.cuda.synchronize()
        peaks[impl] = torch.cuda.max_memory_allocated() - base
    assert peaks["triton"] * 2 < peaks["naive"], peaks

"""The learner's device and precision without a GPU (learner/device.py): learner.device,
learner.autocast with float32 master weights, and the float32 LM head under autocast."""

from __future__ import annotations

import pytest
import torch

from climbrl.config import Config, load_config
from climbrl.learner import device as D
from climbrl.learner.logprobs import head_logprobs


def cfg_of(*overrides: str) -> Config:
    return load_config(None, ["model.path=/m", *overrides])


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch sees one CUDA device with bfloat16 (nothing here touches it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(D, "bf16_supported", lambda dev: True)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_is_the_cpu_without_cuda(no_cuda: None) -> None:
    assert D.resolve_device(cfg_of().learner) == torch.device("cpu")
    assert D.resolve_device(cfg_of("learner.device=cpu").learner) == torch.device("cpu")


def test_cuda_without_cuda_is_a_clear_error(no_cuda: None) -> None:
    with pytest.raises(ValueError, match=r"learner\.device = 'cuda'.*learner\.device = 'auto'"):
        D.resolve_device(cfg_of("learner.device=cuda").learner)


def test_auto_and_cuda_take_the_gpu(fake_cuda: None) -> None:
    for dev in ("auto", "cuda"):
        assert D.resolve_device(cfg_of(f"learner.device={dev}").learner) == torch.device("cuda", 0)
    assert D.resolve_device(cfg_of("learner.device=cpu").learner) == torch.device("cpu")


def test_bad_device_names_the_field() -> None:
    with pytest.raises(ValueError, match="learner.device"):
        cfg_of("learner.device=tpu")
    with pytest.raises(ValueError, match="learner.autocast"):
        cfg_of("learner.autocast=fp16")


@pytest.mark.parametrize(
    "ov, want",
    [
        (["model.dtype=bfloat16"], torch.bfloat16),
        (["model.dtype=float16"], torch.bfloat16),
        ([], None),  # a float32 model: the learner computes as its float32 engine does
        (["model.dtype=bfloat16", "learner.autocast=off"], None),
        (["learner.autocast=bf16"], torch.bfloat16),
    ],
)
def test_autocast_on_cuda(fake_cuda: None, ov: list[str], want: torch.dtype | None) -> None:
    assert D.resolve_autocast(cfg_of(*ov), torch.device("cuda", 0)) == want


def test_auto_autocast_is_off_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert D.resolve_autocast(cfg_of("model.dtype=bfloat16"), cpu) is None
    assert D.resolve_autocast(cfg_of("learner.autocast=bf16"), cpu) == torch.bfloat16


def test_bf16_on_a_gpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "bf16_supported", lambda dev: False)
    gpu = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="learner.autocast = 'off'"):
        D.resolve_autocast(cfg_of("learner.autocast=bf16"), gpu)
    assert D.resolve_autocast(cfg_of("model.dtype=bfloat16"), gpu) is None


def test_master_weights_are_float32_under_autocast(fake_cuda: None) -> None:
    p = D.learner_precision(cfg_of("model.dtype=bfloat16"))
    assert p.device == torch.device("cuda", 0)
    assert p.autocast_dtype == torch.bfloat16 and p.param_dtype == torch.float32
    assert p.fp32_lm_head
    off = D.learner_precision(cfg_of("model.dtype=bfloat16", "learner.autocast=off"))
    assert off.param_dtype == torch.bfloat16


def test_an_fsdp_rank_keeps_its_device(fake_cuda: None) -> None:
    p = D.learner_precision(cfg_of("model.dtype=bfloat16"), torch.device("cuda", 3))
    assert p.device == torch.device("cuda", 3) and p.autocast_dtype == torch.bfloat16


def test_autocast_computes_in_bf16_and_keeps_float32_gradients() -> None:
    p = D.learner_precision(cfg_of("learner.autocast=bf16", "learner.device=cpu"))
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).to(p.param_dtype)
    with p.autocast():
        y = lin(torch.randn(4, 8))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    with D.learner_precision(cfg_of("learner.device=cpu")).autocast():
        assert lin(torch.randn(4, 8)).dtype == torch.float32  # auto: off on the CPU


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_the_lm_head_stays_float32_under_autocast(impl: str) -> None:
    """Autocast runs a matmul in bfloat16 whatever its inputs' dtype; head_logprobs switches
    it off for an fp32 head, so its log-probs equal those computed without autocast."""
    torch.manual_seed(0)
    h, W = torch.randn(6, 16), torch.randn(50, 16)
    tgt = torch.randint(0, 50, (6,))
    ref_logp, ref_ent = head_logprobs(h, W, tgt, 1.0, impl, fp32_head=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = head_logprobs(h, W, tgt, 1.0, impl, fp32_head=True)
        bf16_logits = torch.nn.functional.linear(h, W)  # what the head would get
        with D.lm_head_scope("cpu", True):
            fp32_logits = torch.nn.functional.linear(h, W)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=0)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=0)
    assert bf16_logits.dtype == torch.bfloat16 and fp32_logits.dtype == torch.float32


def test_lm_head_scope_is_a_no_op_without_autocast_or_for_a_model_dtype_head() -> None:
    with D.lm_head_scope("cpu", True):
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), D.lm_head_scope("cpu", False):
        assert torch.is_autocast_enabled("cpu")

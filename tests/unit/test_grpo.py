"""GRPO advantages and the clipped loss, against hand-computed values."""

import math

import pytest
import torch

from climbrl.learner.algos.common import kl_estimate
from climbrl.learner.algos.grpo import clipped_pg_loss, group_advantages


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = group_advantages(r, std_norm=True, eps=0.0 + 1e-6)
    std = math.sqrt(((0.5**2) * 4) / 3)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.all(a[1] == 0)  # a group with one reward carries no signal
    dr = group_advantages(r, std_norm=False)  # Dr. GRPO
    assert torch.allclose(dr[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_loss_matches_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.5, -1.0]], dtype=torch.float64)
    adv = torch.tensor([2.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, st = clipped_pg_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    r = [1.0, math.exp(-0.5)]  # second ratio 0.607 < 0.8: clipping does not bind for A > 0
    expect = -(r[0] * 2 + r[1] * 2) / 2
    assert float(loss) == pytest.approx(expect, rel=1e-12)
    loss.backward()
    # d/dlogp of -ratio*A/2 = -ratio*A/2; masked token gets no gradient
    assert logp.grad[0, 0].item() == pytest.approx(-1.0)
    assert logp.grad[0, 1].item() == pytest.approx(-r[1])
    assert logp.grad[0, 2].item() == 0.0


def test_clip_high_bounds_positive_advantage():
    logp = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-1.0]])  # ratio e = 2.718 > 1.28
    loss, st = clipped_pg_loss(
        logp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28
    )
    assert float(loss) == pytest.approx(-1.28)
    loss.backward()
    assert logp.grad.item() == 0.0  # clipped: no gradient
    assert st["clip_count"].item() == 1


def test_clip_low_bounds_negative_advantage():
    logp = torch.tensor([[-2.0]], requires_grad=True)
    old = torch.tensor([[0.0]])  # ratio 0.135 < 0.8
    loss, _ = clipped_pg_loss(
        logp, old, torch.tensor([-1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28
    )
    assert float(loss) == pytest.approx(0.8)


def test_total_tokens_normalises_micro_batches():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + 0.01 * torch.randn(4, 5, dtype=torch.float64)
    adv = torch.randn(4, dtype=torch.float64)
    mask = (torch.rand(4, 5) > 0.3).double()
    full, _ = clipped_pg_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    tot = float(mask.sum())
    parts = sum(
        clipped_pg_loss(
            logp[i : i + 2],
            old[i : i + 2],
            adv[i : i + 2],
            mask[i : i + 2],
            clip_low=0.2,
            clip_high=0.28,
            total_tokens=tot,
        )[0]
        for i in (0, 2)
    )
    assert float(parts) == pytest.approx(float(full), rel=1e-12)


def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -2.0])
    assert torch.allclose(kl_estimate(lp, ref, "k1"), torch.tensor([0.5, 0.0]))
    d = torch.tensor([-0.5, 0.0])
    assert torch.allclose(kl_estimate(lp, ref, "k3"), torch.exp(d) - d - 1)
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k2")


def test_importance_weight_scales_loss():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    base, _ = clipped_pg_loss(
        logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.2
    )
    w, _ = clipped_pg_loss(
        logp,
        logp.detach(),
        torch.tensor([1.0]),
        torch.ones(1, 1),
        clip_low=0.2,
        clip_high=0.2,
        is_weight_BT=torch.tensor([[0.5]]),
    )
    assert float(w) == pytest.approx(0.5 * float(base))

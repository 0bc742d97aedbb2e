"""Objectives, shaping and filters against hand-computed cases (the TRL parity lives in
test_objectives_trl.py; the learner driving them in test_objectives_learner.py)."""

from __future__ import annotations

import math

import pytest
import torch

from climbrl.learner.algos.common import BatchNorm, aggregate, mismatch_sums, offpolicy_weights
from climbrl.learner.algos.grpo import group_advantages
from climbrl.learner.algos.gspo import gspo_log_ratio
from climbrl.learner.algos.loss import PolicyLoss
from climbrl.learner.algos.ppo import gae, terminal_rewards, value_loss, whiten
from climbrl.learner.algos.shaping import (
    ClipHighController,
    keep_group,
    length_penalty,
    overlong_penalty,
    pass_rate,
    truncated_mask,
)
from climbrl.wire import Sample

D = torch.float64


def test_gae_hand_computed_different_lengths_and_env_tokens():
    # sample 0: 3 policy tokens; sample 1: policy, env token (mask 0), policy, padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]], dtype=D)
    values = torch.tensor([[0.5, 0.2, 0.4, 0.0], [0.3, 9.0, 0.1, 7.0]], dtype=D)
    r = terminal_rewards(torch.tensor([1.0, -1.0], dtype=D), mask)
    assert r.tolist() == [[0, 0, 1, 0], [0, 0, -1, 0]]
    adv, ret = gae(r, values, mask, gamma=0.9, lam=0.8)
    # by hand: delta_t = r_t + 0.9 V_next - V_t, A_t = delta_t + 0.72 A_next (over mask=1 steps)
    exp_adv = [[0.10624, 0.592, 0.6, 0.0], [-1.002, 0.0, -1.1, 0.0]]
    exp_ret = [[0.60624, 0.792, 1.0, 0.0], [-0.702, 0.0, -1.0, 0.0]]
    assert torch.allclose(adv, torch.tensor(exp_adv, dtype=D), atol=1e-12)
    assert torch.allclose(ret, torch.tensor(exp_ret, dtype=D), atol=1e-12)


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    mask = torch.ones(1, 4, dtype=D)
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=D)
    adv, ret = gae(terminal_rewards(torch.tensor([2.0], dtype=D), mask), values, mask, 1.0, 1.0)
    assert torch.allclose(adv, 2.0 - values) and torch.allclose(ret, torch.full_like(ret, 2.0))


def test_ppo_loss_and_value_loss_hand_computed():
    logp = torch.tensor([[-1.0, -0.5]], dtype=D, requires_grad=True)
    old = torch.tensor([[-1.2, -0.5]], dtype=D)
    adv = torch.tensor([[1.0, -2.0]], dtype=D)
    mask = torch.ones(1, 2, dtype=D)
    norm = BatchNorm(tokens=2.0, samples=1.0)
    loss, st = PolicyLoss("ppo", clip_low=0.1, clip_high=0.1, aggregation="token")(
        logp, old, adv, mask, norm
    )
    r0 = math.exp(0.2)  # 1.221 > 1.1 with A > 0: clipped at 1.1, no gradient
    assert float(loss) == pytest.approx(-(1.1 * 1.0 + 1.0 * -2.0) / 2, abs=1e-12)
    assert st["clipped"] == 1.0 and r0 > 1.1
    loss.backward()
    assert logp.grad[0, 0] == 0.0 and float(logp.grad[0, 1]) == pytest.approx(1.0)
    v = torch.tensor([[0.5, 0.0]], dtype=D)
    ret = torch.tensor([[1.0, 1.0]], dtype=D)
    assert float(value_loss(v, ret, mask, norm)) == pytest.approx(0.5 * (0.25 + 1.0) / 2)


def test_ratio_cap_bounds_negative_advantage_loss():
    logp = torch.tensor([[0.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[-3.0]], dtype=D)  # ratio e^3 = 20
    norm = BatchNorm(1.0, 1.0)
    adv = torch.tensor([-1.0], dtype=D)
    free, _ = PolicyLoss("grpo", 0.2, 0.28)(logp, old, adv, torch.ones(1, 1), norm)
    capped, _ = PolicyLoss("grpo", 0.2, 0.28, ratio_cap=3.0)(logp, old, adv, torch.ones(1, 1), norm)
    assert float(free) == pytest.approx(math.exp(3.0)) and float(capped) == pytest.approx(3.0)
    capped.backward()
    assert logp.grad.item() == 0.0  # beyond the cap: no gradient pushing it further


def test_gspo_ratio_is_length_normalised_and_per_sequence():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=D)
    old = torch.tensor([[-1.5, -2.0, -9.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0]], dtype=D)
    assert float(gspo_log_ratio(logp, old, mask)) == pytest.approx(0.25)  # (0.5 + 0) / 2


def test_cispo_keeps_gradient_where_ppo_clip_kills_it():
    logp = torch.tensor([[0.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[-1.0]], dtype=D)  # ratio e > 1 + eps
    norm, adv, mask = BatchNorm(1.0, 1.0), torch.tensor([1.0], dtype=D), torch.ones(1, 1)
    loss, st = PolicyLoss("cispo", clip_low=1.0, clip_high=1.0)(logp, old, adv, mask, norm)
    loss.backward()
    assert st["clipped"] == 1.0
    assert logp.grad.item() == pytest.approx(-2.0)  # -clip(e, 0, 2) * A, still flowing
    logp.grad = None
    PolicyLoss("grpo", 0.2, 0.2)(logp, old, adv, mask, norm)[0].backward()
    assert logp.grad.item() == 0.0


@pytest.mark.parametrize("mode", ["token", "sample", "fixed"])
@pytest.mark.parametrize("objective", ["grpo", "gspo", "cispo", "ppo"])
def test_micro_batches_add_up_to_the_full_batch(mode, objective):
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(6, 5, generator=g, dtype=D)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(6, 5, generator=g, dtype=D)
    adv = torch.randn(6, 5, generator=g, dtype=D)
    mask = (torch.rand(6, 5, generator=g) > 0.3).to(D)
    mask[:, 0] = 1
    ent = torch.rand(6, 5, generator=g, dtype=D)
    norm = BatchNorm(float(mask.sum()), 6.0, 5.0)
    pl = PolicyLoss(objective, 0.2, 0.28, aggregation=mode, entropy_coef=0.01)
    full, _ = pl(logp, old, adv, mask, norm, entropy_BT=ent)
    (g_full,) = torch.autograd.grad(full, logp)
    parts = [
        pl(
            logp[i : i + 2],
            old[i : i + 2],
            adv[i : i + 2],
            mask[i : i + 2],
            norm,
            entropy_BT=ent[i : i + 2],
        )[0]
        for i in range(0, 6, 2)
    ]
    total = sum(parts)
    (g_parts,) = torch.autograd.grad(total, logp)
    assert float(total) == pytest.approx(float(full), abs=1e-12)
    assert torch.allclose(g_parts, g_full, atol=1e-12)


def test_aggregations_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=D)
    norm = BatchNorm(tokens=4.0, samples=2.0, fixed_len=10.0)
    assert float(aggregate(loss, mask, "token", norm)) == pytest.approx(10 / 4)
    assert float(aggregate(loss, mask, "sample", norm)) == pytest.approx((2.0 + 4.0) / 2)
    assert float(aggregate(loss, mask, "fixed", norm)) == pytest.approx(10 / 20)


def test_group_advantages_dr_grpo_and_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=D)
    assert torch.allclose(group_advantages(r, std_norm=False), r - 0.25)
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    assert float(group_advantages(r, eps=0.0)[0, 0]) == pytest.approx(0.75 / std)


def test_whiten_over_masked_entries():
    x = torch.tensor([[1.0, 3.0, 100.0]], dtype=D)
    w = whiten(x, torch.tensor([[1, 1, 0]], dtype=D))
    assert w[0, 2] == 0 and float(w[0, 0]) == pytest.approx(-float(w[0, 1]))


def test_kl_term_uses_reference():
    logp = torch.tensor([[-1.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-1.5]], dtype=D)
    pl = PolicyLoss("grpo", 0.2, 0.2, kl_coef=0.1, kl_estimator="k1")
    loss, st = pl(
        logp,
        logp.detach(),
        torch.zeros(1, dtype=D),
        torch.ones(1, 1),
        BatchNorm(1, 1),
        ref_logp_BT=ref,
    )
    assert float(loss) == pytest.approx(0.1 * 0.5) and st["kl_sum"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reference"):
        pl(logp, logp.detach(), torch.zeros(1, dtype=D), torch.ones(1, 1), BatchNorm(1, 1))


# ----------------------------------------------------------------------------- off-policy


def test_tis_token_truncates_and_counts():
    logp = torch.tensor([[0.0, 0.0, 0.0]], dtype=D)
    roll = torch.tensor([[-2.0, 0.1, 0.0]], dtype=D)  # weights e^2, e^-0.1, 1
    mask = torch.tensor([[1, 1, 0]], dtype=D)
    w, changed = offpolicy_weights(logp, roll, mask, "tis", "token", 0.0, 2.0)
    assert torch.allclose(w, torch.tensor([[2.0, math.exp(-0.1), 1.0]], dtype=D))
    assert changed.tolist() == [[True, False, False]]


def test_icepop_token_masks_outside_band():
    logp = torch.zeros(1, 3, dtype=D)
    roll = torch.tensor([[-2.0, 0.1, 1.0]], dtype=D)  # e^2, e^-0.1, e^-1 = 0.37
    w, changed = offpolicy_weights(logp, roll, torch.ones(1, 3), "icepop", "token", 0.5, 2.0)
    assert w[0, 0] == 0 and w[0, 2] == 0 and float(w[0, 1]) == pytest.approx(math.exp(-0.1))
    assert changed.sum() == 2


def test_sequence_level_uses_the_product_of_ratios():
    logp = torch.zeros(2, 2, dtype=D)
    roll = torch.tensor([[-0.5, -0.5], [0.2, -0.1]], dtype=D)  # seq log-weights 1.0 and -0.1
    mask = torch.ones(2, 2, dtype=D)
    w, ch = offpolicy_weights(logp, roll, mask, "icepop", "sequence", 0.5, 2.0)
    assert w[0].tolist() == [0.0, 0.0] and torch.allclose(
        w[1], torch.full((2,), math.exp(-0.1), dtype=D)
    )
    w, ch = offpolicy_weights(logp, roll, mask, "tis", "sequence", 0.0, 2.0)
    assert w[0].tolist() == [2.0, 2.0] and ch[0].all() and not ch[1].any()


def test_mismatch_sums():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=D)
    roll = torch.tensor([[-1.1, -1.7, -9.0]], dtype=D)
    mm = mismatch_sums(logp, roll, torch.tensor([[1, 1, 0]], dtype=D))
    assert (
        mm["n"] == 2 and mm["abs_sum"] == pytest.approx(0.4) and mm["abs_max"] == pytest.approx(0.3)
    )
    kl = (math.exp(0.1) - 0.1 - 1) + (math.exp(-0.3) + 0.3 - 1)
    assert mm["kl_sum"] == pytest.approx(kl)


# ----------------------------------------------------------------------------- shaping, filters


def test_overlong_penalty_dapo():
    pen = overlong_penalty(torch.tensor([10, 12, 14, 16, 17]), max_len=16, buffer=4, factor=1.0)
    assert pen.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_len=4, buffer=5)


def test_length_penalty_difficulty_aware():
    L = torch.tensor([[2, 4, 6, 6]])
    c = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # pass rate 0.5
    lam = [0.5, 0.0, -0.5, -0.5]
    pen = length_penalty(L, c, coef=1.0, difficulty_aware=True)
    assert torch.allclose(pen, 0.5 * torch.tensor([[lam[0], lam[1], lam[2], lam[3]]], dtype=D))
    flat = length_penalty(L, c, coef=1.0, difficulty_aware=False)
    assert torch.allclose(flat, torch.tensor([lam], dtype=D))
    wrong_short = length_penalty(torch.tensor([[2, 6]]), torch.tensor([[0.0, 1.0]]), 1.0, False)
    assert wrong_short[0, 0] == 0  # a short wrong answer is never rewarded for being short
    assert torch.all(length_penalty(torch.tensor([[3, 3]]), torch.ones(1, 2), 1.0) == 0)


def _s(reward: float, finish: str = "stop", correct: float | None = None) -> Sample:
    return Sample(
        prompt_ids=[1],
        completion_ids=[2],
        completion_mask=[1],
        logprobs=[-1.0],
        versions=[0],
        reward=reward,
        finish_reason=finish,
        metrics={} if correct is None else {"correct": correct},
    )


def test_pass_rate_and_filters():
    g = [_s(1.0), _s(0.0), _s(0.3, correct=1.0), _s(1.0, correct=0.0)]
    assert pass_rate(g, reward_max=1.0) == 0.5  # the env's 'correct' metric wins over reward
    assert keep_group(0.5, True, (0.0, 1.0))
    assert not keep_group(0.0, True, (0.0, 1.0)) and not keep_group(1.0, True, (0.0, 1.0))
    assert keep_group(1.0, False, (0.0, 1.0))
    assert not keep_group(0.05, False, (0.1, 0.8)) and not keep_group(0.9, False, (0.1, 0.8))
    assert keep_group(0.1, False, (0.1, 0.8)) and keep_group(0.8, False, (0.1, 0.8))


def test_truncated_mask():
    assert truncated_mask(["stop", "length", "abort"]).tolist() == [1.0, 0.0, 1.0]


def test_clip_high_controller_steers_toward_target():
    c = ClipHighController(clip_high=0.28, target=1.0, lr=0.1, lo=0.2, hi=0.4)
    assert c.update(0.5) == pytest.approx(0.33)  # entropy too low: open the upper clip
    assert c.update(2.0) == pytest.approx(0.23)  # too high: close it
    assert c.update(9.0) == 0.2 and c.update(-9.0) == 0.4  # bounded
    assert c.update(float("nan")) == 0.4

"""The KL-to-reference term (issue #18): the reference log-prob comes from the reference's own
full distribution under top-p/top-k replay, and the estimators train what they are named after.

Every expected number here is computed in the test, in float64, from full softmaxes and exact
sums over a vocabulary; none comes from ``climbrl.learner``.

Run: ``pytest tests/unit/test_kl_reference.py`` (CPU, no engine; a few seconds).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from climbrl.config import load_config
from climbrl.learner.algos.common import kl_estimate
from climbrl.learner.trainer import Trainer
from climbrl.wire import Sample, Trajectory
from tests.unit.tiny_learner import bare_learner, tiny_qwen3

D = torch.float64
V, T, KEEP = 40, 0.7, 3  # vocabulary, sampling temperature, top-k kept by the rollout


def _qwen3(seed: int) -> torch.nn.Module:
    return tiny_qwen3(seed, V)


def _learner(policy: torch.nn.Module, ref: torch.nn.Module, overrides: list[str]) -> Trainer:
    return bare_learner(policy, T, ref=ref, overrides=overrides)


def _next_logits(model: torch.nn.Module, prompt: list[int]) -> Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].to(D) / T


def _policy_top_not_ref_top(policy: torch.nn.Module, ref: torch.nn.Module) -> tuple[list[int], int]:
    """A prompt and a token inside the policy's top-KEEP set but outside the reference's."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        prompt = torch.randint(0, V, (4,), generator=g).tolist()
        pol_top = set(_next_logits(policy, prompt).topk(KEEP).indices.tolist())
        ref_top = set(_next_logits(ref, prompt).topk(KEEP).indices.tolist())
        if pol_top - ref_top:
            return prompt, min(pol_top - ref_top)
    raise AssertionError("no prompt separates the two models' kept sets")


def test_reference_logprob_is_its_full_distribution_under_top_k_replay():
    """Sampled token in the policy's top-k, outside the reference's top-k: the reference
    log-prob train_step feeds the loss is log softmax(ref_logits / T)[token] (not a masked 0),
    and the logged KL is the exact k3 of that token."""
    policy, ref = _qwen3(0), _qwen3(1)
    prompt, tok = _policy_top_not_ref_top(policy, ref)
    z_pol, z_ref = _next_logits(policy, prompt), _next_logits(ref, prompt)
    kept = z_pol.masked_fill(z_pol < z_pol.topk(KEEP).values[-1], float("-inf"))
    logp_pol = float(torch.log_softmax(kept, -1)[tok])  # what the engine reports (top-k, /T)
    logp_ref = float(torch.log_softmax(z_ref, -1)[tok])  # the reference's own full distribution
    d = logp_ref - logp_pol
    k3 = math.exp(d) - d - 1

    L = _learner(policy, ref, ["learner.algo.kl_coef=0.1", 'learner.algo.kl_estimator="k3"'])
    samples = [
        Sample(
            prompt_ids=prompt,
            completion_ids=[tok],
            completion_mask=[1],
            logprobs=[logp_pol],
            versions=[0],
            reward=r,
            finish_reason="stop",
            keep_counts=[KEEP],
        )
        for r in (0.0, 1.0)
    ]
    tr = Trajectory(
        order_id="o",
        server_id="r0",
        policy_version=0,
        samples=samples,
        gen_seconds=0.0,
        num_generated_tokens=2,
    )
    seen: list[Tensor] = []
    micro_loss = L.obj.micro_loss
    L.obj.micro_loss = lambda batch, i, b, ref_logp, *a: (
        seen.append(ref_logp) or micro_loss(batch, i, b, ref_logp, *a)
    )
    st = L.train_step([tr], 0)

    assert len(seen) == 1 and seen[0] is not None
    assert seen[0][:, 0].tolist() == pytest.approx([logp_ref] * 2, abs=1e-5)
    assert st["replay_miss_tokens"] == 0  # the token is inside the policy's replayed set
    assert math.isfinite(st["kl_ref"]) and st["kl_ref"] == pytest.approx(k3, rel=1e-4, abs=1e-6)


def _expected_grad(kind: str, theta_V: Tensor, ref_logp_V: Tensor) -> Tensor:
    """d/dtheta of E_{y~pi}[k(y)], the sampling weight pi(y) held fixed (what a loss term
    averaged over on-policy samples follows), summed exactly over the vocabulary."""
    theta_V = theta_V.detach().clone().requires_grad_(True)
    logp_V = torch.log_softmax(theta_V, -1)
    d_V = ref_logp_V - logp_V
    if kind == "ours":
        k_V = kl_estimate(logp_V, ref_logp_V, "k3")
    else:
        k_V = {"k1": -d_V, "k3": torch.exp(d_V) - d_V - 1}[kind]
    (grad,) = torch.autograd.grad((logp_V.exp().detach() * k_V).sum(), theta_V)
    return grad


def _kl_grads(theta_V: Tensor, ref_logp_V: Tensor) -> tuple[Tensor, Tensor]:
    """Exact gradients of KL(pi || pi_ref) and of KL(pi_ref || pi) with respect to theta."""
    theta_V = theta_V.detach().clone().requires_grad_(True)
    logp_V = torch.log_softmax(theta_V, -1)
    fwd = (logp_V.exp() * (logp_V - ref_logp_V)).sum()
    rev = (ref_logp_V.exp() * (ref_logp_V - logp_V)).sum()
    (g_fwd,) = torch.autograd.grad(fwd, theta_V, retain_graph=True)
    (g_rev,) = torch.autograd.grad(rev, theta_V)
    return g_fwd, g_rev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_has_no_expected_gradient_and_k3_follows_the_reverse_kl(seed):
    g = torch.Generator().manual_seed(seed)
    theta_V = torch.randn(7, generator=g, dtype=D)
    ref_logp_V = torch.log_softmax(torch.randn(7, generator=g, dtype=D), -1)
    grad_fwd, grad_rev = _kl_grads(theta_V, ref_logp_V)
    assert grad_rev.abs().max() > 1e-2 and (grad_fwd - grad_rev).abs().max() > 1e-3
    # k1: E_pi[grad log pi] = sum_y grad pi(y) = 0, so as a loss term it pulls nowhere
    assert _expected_grad("k1", theta_V, ref_logp_V).abs().max() < 1e-12
    # k3: its value estimates KL(pi || pi_ref), its expected gradient is that of KL(pi_ref || pi)
    g3 = _expected_grad("k3", theta_V, ref_logp_V)
    assert torch.allclose(g3, grad_rev, atol=1e-12)
    assert not torch.allclose(g3, grad_fwd, atol=1e-3)
    assert torch.allclose(_expected_grad("ours", theta_V, ref_logp_V), grad_rev, atol=1e-12)
    logp_V = torch.log_softmax(theta_V, -1)
    d_V = ref_logp_V - logp_V
    value = float((logp_V.exp() * (torch.exp(d_V) - d_V - 1)).sum())
    assert value == pytest.approx(float((logp_V.exp() * -d_V).sum()), rel=1e-12)


def test_config_refuses_k1_and_names_k3():
    for ov in (
        ["learner.algo.kl_coef=0.1", 'learner.algo.kl_estimator="k1"'],
        ['learner.algo.kl_estimator="k1"'],
    ):
        with pytest.raises(ValueError, match=r"k1.*'k3'"):
            load_config(None, ["model.path=m", *ov])
    with pytest.raises(ValueError, match="k3") as e:  # kl_coef > 0 with 'off': offers k3 only
        load_config(
            None, ["model.path=m", "learner.algo.kl_coef=0.1", 'learner.algo.kl_estimator="off"']
        )
    assert "k1" not in str(e.value)
    assert (
        load_config(None, ["model.path=m", "learner.algo.kl_coef=0.1"]).learner.algo.kl_estimator
        == "k3"
    )

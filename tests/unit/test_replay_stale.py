"""Top-p/top-k replay at staleness 0 and 1 (issue #18): the learner's kept set is its own
top-n union the sampled token, so a sampled token the newer weights rank below the n-th is
still trained, with a finite log-prob, and counted as a replay miss.

Every expected number is computed here in float64 from the model's hidden state and LM head
(softmax by hand); none comes from ``climbrl.learner`` or ``climbrl.kernels``.

Run: ``pytest tests/unit/test_replay_stale.py`` (CPU, no engine; a few seconds).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor

from climbrl.learner.logprobs import completion_logprobs
from climbrl.learner.trainer import Trainer
from climbrl.wire import Sample, Trajectory
from tests.unit.tiny_learner import bare_learner, tiny_qwen3

D = torch.float64
V, T, N = 40, 0.7, 3  # vocabulary, sampling temperature, top-n kept by the sampler


def _qwen3(seed: int) -> torch.nn.Module:
    return tiny_qwen3(seed, V)


def _learner(policy: torch.nn.Module) -> Trainer:
    return bare_learner(policy, T)


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(sampler, learner): the learner is the sampler one update later (LM head moved)."""
    sampler = _qwen3(0)
    learner = copy.deepcopy(sampler)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        learner.lm_head.weight.add_(0.01 * torch.randn(learner.lm_head.weight.shape, generator=g))
    return sampler, learner


def _hidden(model: torch.nn.Module, prompt: list[int]) -> Tensor:
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1].to(D)


def _z(model: torch.nn.Module, prompt: list[int]) -> Tensor:
    """float64 tempered logits of the next token."""
    return _hidden(model, prompt) @ model.lm_head.weight.detach().to(D).T / T


def _topn(z: Tensor) -> set[int]:
    return set(z.topk(N).indices.tolist())


def _softmax_over(z: Tensor, support: set[int]) -> Tensor:
    """p restricted to ``support`` and renormalised, by hand: exp(z - max) / sum."""
    idx = torch.tensor(sorted(support))
    e = torch.zeros_like(z)
    e[idx] = torch.exp(z[idx] - z[idx].max())
    return e / e.sum()


def _stale_case(sampler: torch.nn.Module, learner: torch.nn.Module) -> tuple[list[int], int]:
    """A prompt and a token in the sampler's top-n that the learner ranks below its n-th
    (the two top-n sets still overlap, as one small update leaves them)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        prompt = torch.randint(0, V, (4,), generator=g).tolist()
        old, new = _topn(_z(sampler, prompt)), _topn(_z(learner, prompt))
        out = old - new
        if out and old & new:
            return prompt, min(out)
    raise AssertionError("no prompt separates the sampler's and the learner's top-n")


def _sample(prompt: list[int], tok: int, old_logp: float, reward: float = 0.0) -> Sample:
    return Sample(
        prompt_ids=prompt,
        completion_ids=[tok],
        completion_mask=[1],
        logprobs=[old_logp],
        versions=[0],
        reward=reward,
        finish_reason="stop",
        keep_counts=[N],
    )


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_lag0_replay_is_the_samplers_top_n_log_softmax(impl):
    sampler, _ = _models()
    prompt = [3, 9, 4, 1]
    z = _z(sampler, prompt)
    top = _topn(z)
    tok = int(z.topk(N).indices[1])  # inside the top-n
    want = math.log(float(_softmax_over(z, top)[tok]))
    with torch.no_grad():
        b = completion_logprobs(sampler, [_sample(prompt, tok, want)], T, impl=impl)
    assert float(b["logp"][0, 0]) == pytest.approx(want, abs=1e-5)
    assert b["replay_miss"].tolist() == [[0.0]] and b["mask"].tolist() == [[1.0]]


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_lag1_sampled_token_outside_learner_top_n_is_trained_over_top_n_plus_it(impl):
    sampler, learner = _models()
    prompt, tok = _stale_case(sampler, learner)
    z_old, z_new = _z(sampler, prompt), _z(learner, prompt)
    old_logp = math.log(float(_softmax_over(z_old, _topn(z_old))[tok]))
    support = _topn(z_new) | {tok}
    assert tok not in _topn(z_new) and len(support) == N + 1
    q = _softmax_over(z_new, support)  # p_y / (sum_{top-n} p + p_y)
    want = math.log(float(q[tok]))

    learner.zero_grad(set_to_none=True)
    b = completion_logprobs(learner, [_sample(prompt, tok, old_logp)], T, impl=impl)
    got = float(b["logp"][0, 0].detach())
    assert math.isfinite(got) and got == pytest.approx(want, abs=1e-5)
    assert b["replay_miss"].tolist() == [[1.0]]  # counted as a miss ...
    assert b["mask"].tolist() == [[1.0]]  # ... and still in the loss
    (-(b["logp"] * b["mask"]).sum()).backward()
    # d(-log q_y)/dW_v = -(1[v = y] - q_v) h / T over the support, 0 outside it
    h = _hidden(learner, prompt)
    onehot = torch.zeros(V, dtype=D)
    onehot[tok] = 1.0
    want_grad = -((onehot - q)[:, None] * h[None, :]) / T
    grad = learner.lm_head.weight.grad.to(D)
    assert float(grad.abs().sum()) > 0
    assert torch.allclose(grad, want_grad, atol=1e-5)


def test_step_metrics_log_replay_miss_frac():
    """A group of two at lag 1: one sampled token inside the learner's top-n, one outside."""
    sampler, learner = _models()
    prompt, miss_tok = _stale_case(sampler, learner)
    z_old, z_new = _z(sampler, prompt), _z(learner, prompt)
    hit_tok = min(_topn(z_old) & _topn(z_new))
    p_old = _softmax_over(z_old, _topn(z_old))
    samples = [
        _sample(prompt, t, math.log(float(p_old[t])), reward=r)
        for t, r in ((hit_tok, 0.0), (miss_tok, 1.0))
    ]
    L = _learner(learner)
    tr = Trajectory(
        order_id="o",
        server_id="r0",
        policy_version=0,
        samples=samples,
        gen_seconds=0.0,
        num_generated_tokens=2,
    )
    st = L.train_step([tr], 1)  # one version ahead of the sampler: lag 1
    assert st["staleness_max"] == 1.0
    assert st["replay_miss_tokens"] == 1.0
    assert st["replay_miss_frac"] == pytest.approx(0.5)  # 1 miss / 2 trainable tokens
    assert math.isfinite(st["loss"]) and st["grad_norm"] > 0  # the miss is in the loss

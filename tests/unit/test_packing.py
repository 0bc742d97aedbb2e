"""Sequence packing and token-budget micro-batches in the learner (learner/logprobs.py).

The reference is independent of the packing code: each sample run alone through the HF model
(no padding, no mask), float64, log softmax(logits / T) gathered at the sampled tokens."""

from __future__ import annotations

import pytest
import torch

from climbrl.learner.logprobs import completion_logprobs, layout, micro_chunks
from climbrl.wire import Sample
from tests.unit.tiny_learner import bare_learner, tiny_qwen3

T = 0.7


def _sample(prompt: list[int], completion: list[int]) -> Sample:
    n = len(completion)
    return Sample(
        prompt_ids=prompt,
        completion_ids=completion,
        completion_mask=[1] * n,
        logprobs=[-1.0] * n,
        versions=[0] * n,
        reward=0.0,
        finish_reason="stop",
    )


def _samples(vocab: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, c in [(3, 5), (6, 2), (2, 9), (4, 4), (5, 1), (3, 7)]:
        out.append(
            _sample(
                torch.randint(1, vocab, (p,), generator=g).tolist(),
                torch.randint(1, vocab, (c,), generator=g).tolist(),
            )
        )
    return out


def _alone(model: torch.nn.Module, s: Sample) -> torch.Tensor:
    ids = torch.tensor([s.prompt_ids + s.completion_ids[:-1]])
    logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 :]
    return torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(s.completion_ids)[:, None])[
        :, 0
    ]


def test_layout_packs_first_fit_decreasing_with_restarting_positions():
    s = [_sample([1, 2], [3, 4, 5]), _sample([6], [7]), _sample([8, 9, 10], [11, 12])]
    lay = layout(s, pack_length=6)  # inputs of 4, 1 and 4 tokens
    # longest first: sample 0 (4) opens row 0, sample 2 (4) opens row 1, sample 1 (1) fits row 0
    assert lay.ids_RL.tolist() == [[1, 2, 3, 4, 6], [8, 9, 10, 11, 0]]
    assert lay.posids_RL.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 3, 0]]
    assert lay.attn_RL is None
    # sample 0's completion tokens are predicted at inputs 1, 2, 3 of row 0 (flat 1, 2, 3)
    assert lay.index_BT.tolist() == [[1, 2, 3], [4, 0, 0], [7, 8, 0]]
    pad = layout(s, pack_length=0)
    assert pad.ids_RL.shape == (3, 4) and pad.posids_RL is None
    assert pad.index_BT.tolist() == [[1, 2, 3], [4, 0, 0], [10, 11, 0]]


@pytest.mark.parametrize("pack", [0, 8, 16, 1000])
def test_packed_logprobs_and_grads_match_each_sample_alone(pack):
    model = tiny_qwen3(0, 50).double()
    samples = _samples(50)
    got = completion_logprobs(model, samples, T, impl="naive", pack_length=pack, fp32_head=False)
    for b, s in enumerate(samples):
        want = _alone(model, s)
        assert torch.allclose(got["logp"][b, : len(want)], want, atol=1e-10), (b, pack)
    loss = -(got["logp"] * torch.arange(1, 7, dtype=torch.float64)[:, None]).sum()
    g_got = torch.autograd.grad(loss, list(model.parameters()))
    ref = -sum(_alone(model, s).sum() * (b + 1) for b, s in enumerate(samples))
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    for a, r in zip(g_got, g_ref):
        assert torch.allclose(a, r, atol=1e-9)


def test_micro_chunks_by_token_budget():
    s = _samples(50)  # prompt + completion tokens: 8, 8, 11, 8, 6, 10
    assert micro_chunks(s, 4) == [(0, 4), (4, 2)]
    assert micro_chunks(s, 4, tokens=16) == [(0, 2), (2, 1), (3, 2), (5, 1)]
    assert micro_chunks(s, 4, tokens=5) == [(i, 1) for i in range(6)]  # at least one each
    assert micro_chunks([], 4, tokens=5) == []


def test_a_packed_token_budget_step_equals_the_padded_step():
    """``train_step`` with packing and token-budget micro-batches gives the padded step's
    loss and gradients (same normalisation over the batch, however it is chunked)."""
    from climbrl.wire import Trajectory

    samples = _samples(50)
    for i, s in enumerate(samples):
        s.reward = float(i % 2)
    groups = [
        Trajectory(
            order_id=f"o{i}",
            server_id="r0",
            policy_version=0,
            samples=samples[2 * i : 2 * i + 2],
            sent_at=0.0,
            gen_seconds=0.0,
            num_generated_tokens=0,
        )
        for i in range(3)
    ]
    grads = {}
    for name, over in {
        "padded": [],
        "packed": ["learner.pack_length=16", "learner.micro_batch_tokens=24"],
    }.items():
        policy = tiny_qwen3(0, 50)
        L = bare_learner(policy, T, overrides=["learner.group_size=2", *over])
        st = L.train_step(groups, 0)
        grads[name] = (st["loss"], [p.grad.clone() for p in policy.parameters()])
    assert any(float(g.abs().max()) > 1e-4 for g in grads["padded"][1])
    assert grads["packed"][0] == pytest.approx(grads["padded"][0], abs=1e-6)
    for a, b in zip(grads["packed"][1], grads["padded"][1]):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("pack", [0, 16])
def test_activation_checkpointing_gives_the_same_gradients(pack):
    """``learner.activation_checkpointing`` (transformers' gradient checkpointing, as the
    learner enables it) recomputes the layers in the backward pass: same gradients."""
    samples = _samples(50)
    grads = []
    for ckpt in (False, True):
        model = tiny_qwen3(0, 50).double().train()
        if ckpt:
            model.config.use_cache = False
            model.gradient_checkpointing_enable({"use_reentrant": False})
            assert model.is_gradient_checkpointing
        b = completion_logprobs(model, samples, T, impl="naive", pack_length=pack, fp32_head=False)
        b["logp"].sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, r in zip(*grads):
        assert torch.allclose(a, r, atol=1e-10)


def _grouped(vocab: int) -> list[Sample]:
    """Two groups of four samples sharing a prompt each, completions of 1 to 6 tokens, and a
    sample of its own."""
    g = torch.Generator().manual_seed(3)
    out = []
    for p, lens in [(5, [3, 1, 6, 2]), (3, [4, 4, 1, 5]), (4, [2])]:
        prompt = torch.randint(1, vocab, (p,), generator=g).tolist()
        out += [_sample(prompt, torch.randint(1, vocab, (c,), generator=g).tolist()) for c in lens]
    return out


@pytest.mark.parametrize("row_tokens", [2048, 8])
def test_shared_prompt_logprobs_and_grads_match_each_sample_alone(row_tokens, monkeypatch):
    """One row per group (the prompt once, each completion attending to it and to itself),
    or, with a small row budget, a group split over rows: each sample's log-probs and the
    gradients are those of the sample run alone (float64)."""
    import climbrl.learner.logprobs as lp

    samples = _grouped(50)
    lay = lp.shared_prompt_layout(samples, row_tokens)
    assert lay is not None and lay.allowed_RLL is not None
    assert (len(lay.ids_RL) == 3) == (row_tokens == 2048)
    monkeypatch.setattr(
        lp,
        "shared_prompt_layout",
        lambda ss, row_tokens_=row_tokens: lay if ss is samples else None,
    )
    model = tiny_qwen3(0, 50).double()
    got = completion_logprobs(model, samples, T, impl="naive", share_prompts=True, fp32_head=False)
    for b, s in enumerate(samples):
        want = _alone(model, s)
        assert torch.allclose(got["logp"][b, : len(want)], want, atol=1e-10), b
    w = torch.arange(1, len(samples) + 1, dtype=torch.float64)
    g_got = torch.autograd.grad(-(got["logp"] * w[:, None]).sum(), list(model.parameters()))
    ref = -sum(_alone(model, s).sum() * w[b] for b, s in enumerate(samples))
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    for a, r in zip(g_got, g_ref):
        # transformers' RMSNorm computes in float32 even in a float64 model: the gradient
        # the samples of one row send back through it is rounded to float32 once, summed,
        # where run alone it is rounded per sample (same float32 rounding, 1e-7 relative)
        assert float((a - r).abs().max()) <= 1e-6 * float(r.abs().max()) + 1e-12


def test_shared_prompts_only_when_samples_share_one():
    from climbrl.learner.logprobs import shared_prompt_layout

    assert shared_prompt_layout(_samples(50)) is None  # every prompt differs


def test_a_shared_prompt_step_equals_the_padded_step():
    """``train_step`` with ``learner.share_prompts`` (the default) on groups that share their
    prompts gives the loss and gradients of the padded step."""
    from climbrl.wire import Trajectory

    samples = _grouped(50)[:8]
    for i, s in enumerate(samples):
        s.reward = float(i % 3 == 0)
    groups = [
        Trajectory(
            order_id=f"o{i}",
            server_id="r0",
            policy_version=0,
            samples=samples[4 * i : 4 * i + 4],
            sent_at=0.0,
            gen_seconds=0.0,
            num_generated_tokens=0,
        )
        for i in range(2)
    ]
    out = {}
    for share in (False, True):
        policy = tiny_qwen3(0, 50)
        L = bare_learner(
            policy,
            T,
            overrides=[
                "learner.group_size=4",
                "learner.micro_batch_size=8",
                f"learner.share_prompts={str(share).lower()}",
            ],
        )
        st = L.train_step(groups, 0)
        out[share] = (st["loss"], [p.grad.clone() for p in policy.parameters()])
    assert any(float(g.abs().max()) > 1e-4 for g in out[False][1])
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-6)
    for a, b in zip(out[True][1], out[False][1]):
        assert torch.allclose(a, b, atol=1e-6)

"""Learner-side replay (climbrl.learner.replay, climbrl.learner.logprobs): mask encoding,
routing encoding on the wire, forced MoE routing in the HF Qwen3-MoE forward.

Run: ``pytest tests/unit/test_replay_learner.py`` (no engine; a few seconds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from climbrl.learner.logprobs import completion_logprobs
from climbrl.learner.replay import (
    decode_routing,
    encode_routing,
    forced_routing,
    keep_counts_BT,
    model_moe_shape,
    moe_routers,
    routing_BLNK,
)
from climbrl.wire import LEARNER_ACCEPTS, Codec, Routing, Sample, Trajectory


def _sample(prompt, completion, keep=(), routing=None, logprobs=None) -> Sample:
    return Sample(
        prompt_ids=list(prompt),
        completion_ids=list(completion),
        completion_mask=[1] * len(completion),
        logprobs=list(logprobs or [0.0] * len(completion)),
        versions=[0] * len(completion),
        reward=0.0,
        finish_reason="length",
        keep_counts=list(keep),
        routing=routing,
    )


def _moe(seed: int = 0, layers: int = 2, experts: int = 6, top_k: int = 2):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        tie_word_embeddings=False,
    )
    m = Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():  # HF leaves the router at zeros until init; make routing non-trivial
        for _, r in moe_routers(m):
            r.weight.normal_(0, 0.5)
    return m


# ------------------------------------------------------------------ top-p / top-k keep counts


def test_keep_counts_layout_and_errors():
    s1 = _sample([1, 2], [3, 4, 5], keep=[2, 0, 7])
    s2 = _sample([1], [3])  # recorded nothing
    kc = keep_counts_BT([s1, s2], Tc=3)
    assert kc.tolist() == [[2, 0, 7], [0, 0, 0]]
    assert keep_counts_BT([s2], Tc=1) is None
    with pytest.raises(ValueError, match="must align"):
        keep_counts_BT([_sample([1], [3, 4], keep=[1])], Tc=2)
    with pytest.raises(ValueError, match=">= 0"):
        keep_counts_BT([_sample([1], [3], keep=[-1])], Tc=1)


def test_keep_counts_survive_the_wire():
    s = _sample(
        [1, 2],
        [3, 4],
        keep=[5, 70000],
        routing=Routing(**encode_routing(np.array([[[1, 2]], [[0, 3]], [[4, 5]]]))),
    )
    tr = Trajectory(
        order_id="o",
        server_id="r0",
        policy_version=0,
        samples=[s],
        gen_seconds=0.0,
        num_generated_tokens=2,
    )
    msg, _ = Codec(LEARNER_ACCEPTS).decode(Codec.encode(tr))
    got = msg.samples[0]
    assert got.keep_counts == [5, 70000]
    assert decode_routing(got.routing).tolist() == [[[1, 2]], [[0, 3]], [[4, 5]]]
    # an older peer's Sample without the replay fields still decodes
    old = _sample([1], [2])
    assert old.keep_counts == [] and old.routing is None


def test_learner_applies_keep_counts_before_log_softmax():
    """logp equals a hand-made top-n log-softmax; n=1 on a non-argmax target is a miss."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    m = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            tie_word_embeddings=False,
        )
    ).eval()
    prompt, T = [3, 9, 4], 0.7
    with torch.no_grad():
        z = m(torch.tensor([prompt])).logits[0, -1].float() / T
    order = z.argsort(descending=True)
    tgt_in, tgt_out = int(order[2]), int(order[5])
    for impl in ("naive", "chunked"):
        with torch.no_grad():
            b = completion_logprobs(
                m,
                [_sample(prompt, [tgt_in], keep=[4]), _sample(prompt, [tgt_out], keep=[4])],
                T,
                impl=impl,
            )
        kept = z.masked_fill(z < z[order[3]], float("-inf"))
        want = torch.log_softmax(kept, -1)[tgt_in]
        assert torch.allclose(b["logp"][0, 0], want, atol=1e-5), impl
        # outside the learner's top-n: flagged, kept in the loss, over the top-n and the token
        assert b["replay_miss"].tolist() == [[0.0], [1.0]]
        union = z.masked_fill((z < z[order[3]]) & (torch.arange(len(z)) != tgt_out), float("-inf"))
        assert b["mask"].tolist() == [[1.0], [1.0]]
        assert torch.allclose(b["logp"][1, 0], torch.log_softmax(union, -1)[tgt_out], atol=1e-5)
        with torch.no_grad():
            off = completion_logprobs(
                m, [_sample(prompt, [tgt_in], keep=[4])], T, impl=impl, replay_mask=False
            )
        assert torch.allclose(off["logp"][0, 0], torch.log_softmax(z, -1)[tgt_in], atol=1e-5)


# ------------------------------------------------------------------ routing encoding


@pytest.mark.parametrize("max_id", [7, 300])
def test_routing_encoding_roundtrip(max_id):
    a = np.random.default_rng(0).integers(0, max_id + 1, size=(5, 3, 2))
    a[1, 2] = -1  # not recorded
    enc = encode_routing(a)
    assert enc["dtype"] == ("uint8" if max_id < 255 else "int16")
    assert len(enc["data"]) == a.size * (1 if max_id < 255 else 2)
    assert (decode_routing(Routing(**enc)) == a).all()


def test_routing_decode_rejects_bad_input():
    with pytest.raises(ValueError, match="dtype"):
        decode_routing(Routing(dtype="float32", shape=[1, 1, 1], data=b"\0\0\0\0"))
    with pytest.raises(ValueError, match="needs"):
        decode_routing(Routing(dtype="uint8", shape=[2, 1, 2], data=b"\0\0\0"))
    s = _sample([1, 2], [3], routing=Routing(**encode_routing(np.zeros((2, 3, 2), int))))
    with pytest.raises(ValueError, match="another model"):
        routing_BLNK([s], L=2, num_layers=2, top_k=2)


# ------------------------------------------------------------------ forced routing (R3)


def _block_reference(block, h_NH: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
    """Qwen3-MoE sparse block by hand: sum_k w_k expert_{e_k}(x), w = renormalised softmax."""
    gate, ex = block.gate, block.experts
    p_NE = torch.softmax(F.linear(h_NH, gate.weight).float(), -1)
    w_NK = p_NE.gather(1, experts_NK)
    w_NK = w_NK / w_NK.sum(-1, keepdim=True)
    out = torch.zeros_like(h_NH)
    for n in range(h_NH.shape[0]):
        for k in range(experts_NK.shape[1]):
            e = int(experts_NK[n, k])
            g, u = F.linear(h_NH[n], ex.gate_up_proj[e]).chunk(2, dim=-1)
            out[n] += w_NK[n, k] * F.linear(ex.act_fn(g) * u, ex.down_proj[e])
    return out


def test_forced_routing_uses_the_given_experts_and_falls_back_on_minus_one():
    m = _moe()
    block = m.model.layers[0].mlp
    torch.manual_seed(1)
    h = torch.randn(1, 5, 32)
    forced = torch.tensor([[0, 1], [2, 3], [4, 5], [5, 0], [-1, -1]])
    E = torch.full((1, 5, 2, 2), -1, dtype=torch.long)
    E[0, :, 0] = forced
    with torch.no_grad():
        natural = torch.topk(torch.softmax(F.linear(h[0], block.gate.weight), -1), 2).indices
        with forced_routing(m, E):
            got = block(h)[0]
        want_idx = forced.clone()
        want_idx[4] = natural[4]
        want = _block_reference(block, h[0], want_idx)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got[:4], _block_reference(block, h[0], natural)[:4], atol=1e-4)
    assert "forward" not in vars(block.gate)  # restored on exit


def test_forcing_the_natural_routing_is_the_identity_and_gradients_flow():
    m = _moe()
    ids = torch.tensor([[1, 5, 7, 2, 9, 3]])
    with torch.no_grad():
        ref = m(ids).logits
    # the natural experts, captured from the unpatched routers
    caught: dict[int, torch.Tensor] = {}
    hooks = [
        r.register_forward_hook(lambda mod, a, out, i=i: caught.__setitem__(i, out[2]))
        for i, r in moe_routers(m)
    ]
    with torch.no_grad():
        m(ids)
    for h in hooks:
        h.remove()
    N, K = model_moe_shape(m)
    E = torch.stack([caught[i].view(1, 6, K) for i in range(N)], dim=2)
    with forced_routing(m, E):
        out = m(ids).logits
    assert torch.allclose(out, ref, atol=1e-6)
    # forcing different experts: still differentiable w.r.t. the router and the experts
    E2 = (E + 1) % 6
    m.zero_grad()
    with forced_routing(m, E2):
        loss = m(ids).logits.logsumexp(-1).sum()
    loss.backward()
    gate = m.model.layers[0].mlp.gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    used = set(E2[0, :, 0].flatten().tolist())
    g = m.model.layers[0].mlp.experts.down_proj.grad
    for e in range(6):
        assert (g[e].abs().sum() > 0) == (e in used)


def test_forced_routing_refuses_dense_models_and_wrong_shapes():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dense = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=20,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            intermediate_size=32,
        )
    )
    with pytest.raises(ValueError, match="no MoE router"):
        with forced_routing(dense, torch.zeros(1, 2, 1, 2, dtype=torch.long)):
            pass
    m = _moe()
    with pytest.raises(ValueError, match="top-3"):
        with forced_routing(m, torch.zeros(1, 2, 2, 3, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="built for"):
        with forced_routing(m, torch.zeros(1, 2, 2, 2, dtype=torch.long)):
            m(torch.tensor([[1, 2, 3]]))
    assert "forward" not in vars(m.model.layers[0].mlp.gate)


def test_completion_logprobs_replays_routing_from_samples():
    """Routing recorded on the samples changes the learner's log-probs, and forcing the
    model's own routing leaves them unchanged."""
    m = _moe()
    prompt, comp = [1, 5, 7, 2], [9, 3, 4]
    ids = torch.tensor([prompt + comp[:-1]])
    caught: dict[int, torch.Tensor] = {}
    hooks = [
        r.register_forward_hook(lambda mod, a, out, i=i: caught.__setitem__(i, out[2]))
        for i, r in moe_routers(m)
    ]
    with torch.no_grad():
        m(ids)
    for h in hooks:
        h.remove()
    natural = torch.stack([caught[i] for i in range(2)], dim=1).numpy()  # [T, layers, K]
    with torch.no_grad():
        base = completion_logprobs(m, [_sample(prompt, comp)], 1.0, impl="naive")["logp"]
        same = completion_logprobs(
            m,
            [_sample(prompt, comp, routing=Routing(**encode_routing(natural)))],
            1.0,
            impl="naive",
        )["logp"]
        other = completion_logprobs(
            m,
            [_sample(prompt, comp, routing=Routing(**encode_routing((natural + 1) % 6)))],
            1.0,
            impl="naive",
        )
        off = completion_logprobs(
            m,
            [_sample(prompt, comp, routing=Routing(**encode_routing((natural + 1) % 6)))],
            1.0,
            impl="naive",
            replay_routing=False,
        )["logp"]
    assert torch.allclose(base, same, atol=1e-6)
    assert (base - other["logp"]).abs().max() > 1e-3
    assert torch.allclose(base, off, atol=1e-6)

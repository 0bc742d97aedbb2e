"""PPO's returns and critic (learner/algos/ppo.py: ``PpoCritic``, ``gae`` and
``value_loss``) against hand-worked numbers and float64 references written here:

- truncated episodes (finish_reason 'length' / 'context') bootstrap GAE from V(s_T), terminated
  ones ('stop') from 0;
- per-turn ``Sample.step_rewards`` land on each turn's last generated token;
- the optional value clip (``learner.algo.value_clip``);
- the critic's values under MoE routing replay equal a forward with the routing forced.

The policy's backbone is faked where the numbers are hand-worked (V(s) = a table entry of the
last token of s, read through the real value head); the MoE tests run a tiny Qwen3-MoE.

Run: ``OMP_NUM_THREADS=1 pytest tests/unit/test_ppo_returns.py`` (a few seconds, CPU).
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from climbrl.config import load_config
from climbrl.learner.algos.common import BatchNorm
from climbrl.learner.algos.ppo import Critic, gae, value_loss
from climbrl.learner.algos.step import ObjectiveStep
from climbrl.learner.logprobs import completion_logprobs
from climbrl.learner.replay import encode_routing, forced_routing
from climbrl.wire import Routing, Sample

ROOT = Path(__file__).resolve().parents[2]
D = torch.float64
GAMMA, LAM = 0.9, 0.8


# ----------------------------------------------------------------------------- fakes and references


class _ValueTable(nn.Module):
    """A backbone whose hidden state at a position is table[token id there]: with a value head
    of weight 1 and bias 0, V(s) is the table entry of the last token of s."""

    def __init__(self, table: dict[int, float]):
        super().__init__()
        t = torch.zeros(64)
        for k, v in table.items():
            t[k] = v
        self.register_buffer("table", t)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(last_hidden_state=self.table[input_ids].unsqueeze(-1))


class _Policy(nn.Module):
    def __init__(self, table: dict[int, float]):
        super().__init__()
        self.base_model = _ValueTable(table)
        self.config = types.SimpleNamespace(hidden_size=1)


def _step(table: dict[int, float], overrides: list[str] = ()) -> tuple[ObjectiveStep, _Policy]:
    cfg = load_config(
        ROOT / "examples" / "ppo.toml",
        [
            "model.path=unused",
            f"learner.algo.gamma={GAMMA}",
            f"learner.algo.gae_lambda={LAM}",
            "learner.algo.adv_whiten=false",
            *overrides,
        ],
    )
    policy = _Policy(table)
    step = ObjectiveStep(cfg, policy, 1.0)
    with torch.no_grad():
        step.critic.head.weight.fill_(1.0)
        step.critic.head.bias.zero_()
    return step, policy


def _sample(
    prompt: list[int],
    completion: list[int],
    mask: list[int] | None = None,
    *,
    reward: float = 1.0,
    finish: str = "stop",
    step_rewards: list[float] = (),
    routing: Routing | None = None,
) -> Sample:
    mask = list(mask or [1] * len(completion))
    return Sample(
        prompt_ids=list(prompt),
        completion_ids=list(completion),
        completion_mask=mask,
        logprobs=[0.0] * len(completion),
        versions=[0] * len(completion),
        reward=reward,
        finish_reason=finish,
        step_rewards=list(step_rewards),
        routing=routing,
    )


def _prepared(step: ObjectiveStep, policy: nn.Module, samples: list[Sample]):
    groups = [types.SimpleNamespace(samples=[s], policy_version=0) for s in samples]
    batch = step.prepare(groups, 0)
    step.prepare_values(policy, batch)
    return batch


def _gae_reference(
    rewards: list[float], values: list[float], v_after: float, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Agent steps only, by the definition: A_t = sum_l (gamma lam)^l delta_{t+l}, float64."""
    n = len(rewards)
    v_next = values[1:] + [v_after]
    delta = [rewards[t] + gamma * v_next[t] - values[t] for t in range(n)]
    adv = [sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, n)) for t in range(n)]
    return adv, [a + v for a, v in zip(adv, values)]


# ----------------------------------------------------------------------------- 1. truncation


def test_gae_bootstraps_from_the_given_value_after_the_last_token():
    # 3 tokens, V(s_0..s_2) = 0.5, 0.2, 0.4, r = 1 on the last; V(s_T) = 0.6 (truncated), 0 (ended)
    mask = torch.ones(2, 3, dtype=D)
    values = torch.tensor([[0.5, 0.2, 0.4]] * 2, dtype=D)
    r = torch.tensor([[0.0, 0.0, 1.0]] * 2, dtype=D)
    adv, ret = gae(r, values, mask, GAMMA, LAM, bootstrap_B=torch.tensor([0.6, 0.0], dtype=D))
    # by hand, gamma*lam = 0.72:
    #   truncated: delta = (-0.32, 0.16, 1 + 0.54 - 0.4 = 1.14); A_1 = 0.16 + 0.72 * 1.14, ...
    #   ended:     delta = (-0.32, 0.16, 0.6)
    want_adv = [[0.386176, 0.9808, 1.14], [0.10624, 0.592, 0.6]]
    want_ret = [[0.886176, 1.1808, 1.54], [0.60624, 0.792, 1.0]]
    assert torch.allclose(adv, torch.tensor(want_adv, dtype=D), atol=1e-12)
    assert torch.allclose(ret, torch.tensor(want_ret, dtype=D), atol=1e-12)
    ref = _gae_reference([0.0, 0.0, 1.0], [0.5, 0.2, 0.4], 0.6, GAMMA, LAM)
    assert np.allclose(ref, [want_adv[0], want_ret[0]], atol=1e-12)


def test_truncated_episode_bootstraps_from_the_critic_value_after_its_last_token():
    # V(s) = table[last token of s]: V(s_0) = t[1], V(s_1) = t[2], V(s_2) = t[3], V(s_T) = t[4]
    step, policy = _step({1: 0.5, 2: 0.2, 3: 0.4, 4: 0.6})
    samples = [_sample([1], [2, 3, 4], finish=f) for f in ("length", "context", "stop")]
    batch = _prepared(step, policy, samples)
    truncated = ([0.386176, 0.9808, 1.14], [0.886176, 1.1808, 1.54])  # V(s_T) = 0.6
    ended = ([0.10624, 0.592, 0.6], [0.60624, 0.792, 1.0])  # V(s_T) = 0
    want_adv = torch.tensor([truncated[0], truncated[0], ended[0]], dtype=D)
    want_ret = torch.tensor([truncated[1], truncated[1], ended[1]], dtype=D)
    assert torch.allclose(batch.adv_BT, want_adv, atol=1e-6), batch.adv_BT
    assert torch.allclose(batch.returns_BT, want_ret, atol=1e-6), batch.returns_BT
    assert torch.allclose(batch.values_BT, torch.tensor([[0.5, 0.2, 0.4]] * 3, dtype=D), atol=1e-6)


# ----------------------------------------------------------------------------- 2. step rewards


def test_step_rewards_land_on_each_turns_last_generated_token():
    # prompt [1]; turn 1 = [2, 3], observation [5, 6] (mask 0), turn 2 = [7, 8];
    # step_rewards (0.3, 0.2), episode reward 1: r = 0.3 on token 3, 0.2 + 1 on token 8.
    # Agent steps a, b, c, d predict 2, 3, 7, 8 with V = t[1], t[2], t[6], t[7]; V(s_T) = t[8].
    step, policy = _step({1: 0.5, 2: 0.2, 3: 9.0, 5: 9.0, 6: 0.4, 7: 0.1, 8: 0.7})
    mask = [1, 1, 0, 0, 1, 1]
    ended = _sample([1], [2, 3, 5, 6, 7, 8], mask, step_rewards=[0.3, 0.2], finish="stop")
    cut = _sample([1], [2, 3, 5, 6, 7, 8], mask, step_rewards=[0.3, 0.2], finish="context")
    batch = _prepared(step, policy, [ended, cut])
    # by hand (ended): delta_d = 1.2 - 0.1 = 1.1, delta_c = 0.09 - 0.4 = -0.31,
    # delta_b = 0.3 + 0.36 - 0.2 = 0.46, delta_a = 0.18 - 0.5 = -0.32; A = delta + 0.72 A_next
    want_adv_end = [0.2610688, 0.80704, 0.0, 0.0, 0.482, 1.1]
    want_ret_end = [0.7610688, 1.00704, 0.0, 0.0, 0.882, 1.2]
    # cut by the context window: delta_d = 1.2 + 0.9 * 0.7 - 0.1 = 1.73
    want_adv_cut = [0.49621504, 1.133632, 0.0, 0.0, 0.9356, 1.73]
    want_ret_cut = [0.99621504, 1.333632, 0.0, 0.0, 1.3356, 1.83]
    for v_after, adv, ret in ((0.0, want_adv_end, want_ret_end), (0.7, want_adv_cut, want_ret_cut)):
        a, r = _gae_reference([0.0, 0.3, 0.0, 1.2], [0.5, 0.2, 0.4, 0.1], v_after, GAMMA, LAM)
        assert np.allclose(a, [adv[i] for i in (0, 1, 4, 5)], atol=1e-12)
        assert np.allclose(r, [ret[i] for i in (0, 1, 4, 5)], atol=1e-12)
    assert torch.allclose(
        batch.adv_BT, torch.tensor([want_adv_end, want_adv_cut], dtype=D), atol=1e-6
    ), batch.adv_BT
    assert torch.allclose(
        batch.returns_BT, torch.tensor([want_ret_end, want_ret_cut], dtype=D), atol=1e-6
    ), batch.returns_BT


def test_step_rewards_that_do_not_match_the_turns_are_refused():
    step, policy = _step({1: 0.5})
    s = _sample([1], [2, 3, 5, 7], [1, 0, 0, 1], step_rewards=[0.3])  # 2 turns, 1 step reward
    with pytest.raises(ValueError, match="1 step_rewards for 2 model turns"):
        _prepared(step, policy, [s])


# ----------------------------------------------------------------------------- 3. value clip


def test_value_clip_hand_computed_values_and_gradients():
    v = torch.tensor([[0.5, 0.0, 1.0, 1.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[0.3, 0.2, 0.95, 0.0]], dtype=D)
    ret = torch.tensor([[1.0, -1.0, 0.0, 0.5]], dtype=D)
    mask = torch.ones(1, 4, dtype=D)
    norm = BatchNorm(tokens=4.0, samples=1.0)
    # eps_v = 0.1: V_clip = (0.4, 0.1, 1.0, 0.1)
    #   (V - R)^2      = 0.25, 1.0,  1.0, 0.25
    #   (V_clip - R)^2 = 0.36, 1.21, 1.0, 0.16
    # max              = 0.36 (clipped), 1.21 (clipped), 1.0 (V inside the band), 0.25 (unclipped)
    loss = value_loss(v, ret, mask, norm, old, clip=0.1)
    assert float(loss.detach()) == pytest.approx(0.5 * (0.36 + 1.21 + 1.0 + 0.25) / 4, abs=1e-12)
    loss.backward()
    # d/dV: 0 where the clipped term wins (the clamp saturates), else 0.5 * 2 (V - R) / 4
    assert torch.allclose(v.grad, torch.tensor([[0.0, 0.0, 0.25, 0.125]], dtype=D), atol=1e-12)
    v.grad = None
    off = value_loss(v, ret, mask, norm, old, clip=0.0)  # off: plain 1/2 (V - R)^2
    assert float(off.detach()) == pytest.approx(0.5 * (0.25 + 1.0 + 1.0 + 0.25) / 4, abs=1e-12)
    off.backward()
    assert torch.allclose(v.grad, torch.tensor([[-0.125, 0.25, 0.25, 0.125]], dtype=D), atol=1e-12)
    with pytest.raises(ValueError, match="old_values_BT"):
        value_loss(v, ret, mask, norm, None, clip=0.1)


@pytest.mark.parametrize("clip", [0.0, 0.1])
def test_value_clip_in_the_ppo_micro_loss(clip):
    """The critic moves by +0.5 after the returns were computed; with eps_v = 0.1 the loss
    takes max((V - R)^2, (V_old + 0.1 - R)^2) per token."""
    step, policy = _step({1: 0.5, 2: 0.2, 3: 0.4, 4: 0.6}, [f"learner.algo.value_clip={clip}"])
    s = _sample([1], [2, 3, 4], finish="stop")
    batch = _prepared(step, policy, [s])
    with torch.no_grad():
        step.critic.head.bias.fill_(0.5)
    ids = torch.tensor([[1, 2, 3]])
    hidden_BTH = policy.base_model(
        input_ids=ids, attention_mask=torch.ones_like(ids)
    ).last_hidden_state
    z = torch.zeros(1, 3)
    b = {
        "logp": z.clone().requires_grad_(True),
        "old_logp": z,
        "mask": torch.ones(1, 3),
        "entropy": z,
        "hidden_BTH": hidden_BTH,
    }
    loss = step.micro_loss(batch, 0, b, None)
    v_old, ret = [0.5, 0.2, 0.4], [0.60624, 0.792, 1.0]  # returns of the ended 3-token example
    terms = [
        max((vo + 0.5 - r) ** 2, (vo + clip - r) ** 2) if clip else (vo + 0.5 - r) ** 2
        for vo, r in zip(v_old, ret)
    ]
    want = 0.5 * sum(terms) / 3
    assert batch.acc["vloss"] == pytest.approx(want, abs=1e-6)
    loss.backward()
    # d vloss / d bias = sum_t 0.5 * 2 (V - R) / 3 over the tokens the unclipped term wins
    grad = sum(
        (vo + 0.5 - r) / 3
        for vo, r, t in zip(v_old, ret, terms)
        if t == pytest.approx((vo + 0.5 - r) ** 2)
    )
    vf = step.lc.algo.vf_coef
    assert float(step.critic.head.bias.grad) == pytest.approx(vf * grad, abs=1e-6)
    if clip:  # only token 0 keeps its gradient: (1.0 - 0.60624)^2 > (0.6 - 0.60624)^2
        assert grad == pytest.approx(0.39376 / 3, abs=1e-12)


def test_value_clip_config():
    cfg = load_config(ROOT / "examples" / "ppo.toml", ["model.path=m"])
    assert cfg.learner.algo.value_clip == 0.0  # off by default
    with pytest.raises(ValueError, match="value_clip"):
        load_config(None, ["model.path=m", "learner.algo.value_clip=0.2"])  # grpo: no critic
    with pytest.raises(ValueError, match="value_clip"):
        load_config(ROOT / "examples" / "ppo.toml", ["model.path=m", "learner.algo.value_clip=-1"])


# ----------------------------------------------------------------------------- 4. MoE routing


def _moe(seed: int = 0):
    from tests.unit.test_replay_learner import _moe as tiny_qwen3_moe

    return tiny_qwen3_moe(seed)


PROMPT, COMPLETION = [3, 9, 4, 7], [11, 2, 30]


def _routed_sample() -> tuple[Sample, Tensor]:
    """A sample with recorded experts (random, two of six) at positions 0..5, the ones the
    engine ran, and the [1, 7, layers, top_k] forced experts they stand for."""
    rng = np.random.default_rng(0)
    rec = np.stack([rng.permutation(6)[:2] for _ in range(6 * 2)]).reshape(6, 2, 2)
    s = _sample(PROMPT, COMPLETION, finish="length", routing=Routing(**encode_routing(rec)))
    experts_BLNK = torch.full((1, 7, 2, 2), -1, dtype=torch.long)  # position 6: not recorded
    experts_BLNK[0, :6] = torch.from_numpy(rec)
    return s, experts_BLNK


def _reference_values(backbone: nn.Module, head: nn.Linear, experts_BLNK: Tensor | None) -> Tensor:
    """V at positions 3, 4, 5 (s_0..s_2) and 6 (s_T) of prompt + completion, from one forward
    of the backbone with the recorded experts forced (None: its own routing)."""
    ids = torch.tensor([PROMPT + COMPLETION])
    route = (
        contextlib.nullcontext() if experts_BLNK is None else forced_routing(backbone, experts_BLNK)
    )
    with torch.no_grad(), route:
        h = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return head(h[0, [3, 4, 5, 6]].float()).squeeze(-1)


def test_value_head_under_replay_equals_a_forward_with_forced_routing():
    """kind='head': the values GAE uses (prepare_values' own backbone forward) and the values
    the loss trains (the policy's forward, read by capture_hidden) both equal the values of a
    forward with the recorded experts forced."""
    model = _moe()
    cfg = load_config(
        ROOT / "examples" / "ppo.toml", ["model.path=unused", "learner.algo.gamma=0.9"]
    )
    step = ObjectiveStep(cfg, model, 1.0)
    with torch.no_grad():
        step.critic.head.weight.normal_(0, 1.0)
    s, experts_BLNK = _routed_sample()
    want = _reference_values(model.model, step.critic.head, experts_BLNK)
    natural = _reference_values(model.model, step.critic.head, None)
    assert (want - natural).abs().max() > 1e-3  # the forced experts change the values
    with torch.no_grad():
        got = step.critic.forward_samples([s], model)[0]
    assert torch.allclose(got, want[:3], atol=1e-5), (got, want)
    with torch.no_grad():
        got_all, got_last = step.critic.state_values([s], model)
    assert torch.allclose(got_all[0], want[:3], atol=1e-5)
    assert torch.allclose(got_last[0], want[3], atol=1e-5)
    batch = _prepared(step, model, [s])
    assert torch.allclose(batch.values_BT[0].float(), want[:3], atol=1e-5)
    for pack in (0, 64):  # the loss's values: the policy forward, padded or packed
        with torch.no_grad():
            b = completion_logprobs(model, [s, s], temperature=1.0, impl="naive", pack_length=pack)
        trained = step.critic.head(b["hidden_BTH"][1].float()).squeeze(-1)
        assert torch.allclose(trained, want[:3], atol=1e-5), (pack, trained, want)


def test_value_model_forward_replays_the_routing(tmp_path):
    """kind='model': the value model's own forward forces the recorded experts."""
    _moe().save_pretrained(tmp_path / "moe")
    critic = Critic("model", 32, str(tmp_path / "moe"), torch.float32).eval()
    with torch.no_grad():
        critic.head.weight.normal_(0, 1.0)
    s, experts_BLNK = _routed_sample()
    want = _reference_values(critic.backbone, critic.head, experts_BLNK)
    natural = _reference_values(critic.backbone, critic.head, None)
    assert (want - natural).abs().max() > 1e-3
    with torch.no_grad():
        got = critic.forward_samples([s])[0]
    assert torch.allclose(got, want[:3], atol=1e-5), (got, want)
    with torch.no_grad():
        got_all, got_last = critic.state_values([s])
    assert torch.allclose(got_all[0], want[:3], atol=1e-5)
    assert torch.allclose(got_last[0], want[3], atol=1e-5)

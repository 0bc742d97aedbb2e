"""The learner driving each objective: the real ``Learner.train_step`` / ``collect`` on a tiny
transformers model, with trajectories built here instead of by an engine (the edge we fake)."""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch

from climbrl.config import load_config
from climbrl.learner.data import DataCursor
from climbrl.learner.learner import Learner
from climbrl.learner.logprobs import completion_logprobs
from climbrl.learner.trainer import Trainer
from climbrl.learner.weights import WeightPublisher
from climbrl.wire import Sample, Trajectory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "ppo"]
SHIFT = 0.05  # the fake engine's log-probs are the learner's minus this: a known mismatch


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_configs_load(name):
    cfg = load_config(ROOT / "examples" / f"{name}.toml", ["model.path=m"])
    expect = {"dr_grpo": "grpo", "dapo": "grpo"}.get(name, name)
    assert cfg.learner.algo.name == expect
    if name == "ppo":
        assert cfg.learner.group_size == 1  # one rollout per prompt


def _learner(
    tiny_model: Path, tmp_path: Path, cfg_file: str | None, overrides: list[str]
) -> Learner:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(
        ROOT / "examples" / cfg_file if cfg_file else None,
        [
            f"model.path={tiny_model}",
            f"run.output_dir={tmp_path / 'run'}",
            "learner.micro_batch_size=3",
            "rollout.max_tokens=6",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    trainer = Trainer(cfg, model, opt=torch.optim.AdamW(model.parameters(), lr=1e-2))
    env = types.SimpleNamespace(reward_range=(0.0, 1.0), num_tasks=lambda split: 1000)
    # the real train_step/collect/checkpoint, no sockets or engine
    return Learner(
        cfg,
        hub=None,
        env=env,
        trainer=trainer,
        weights=WeightPublisher(model, "full", str(tiny_model)),
        tokenizer=AutoTokenizer.from_pretrained(str(tiny_model)),
        cursor=DataCursor(1000),
    )


def _groups(
    L: Learner, n_groups: int, group_size: int, seed: int = 0, finish: str = "stop"
) -> list[Trajectory]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_groups):
        samples = []
        for j in range(group_size):
            n = int(torch.randint(2, 7, (1,), generator=g))  # different lengths
            s = Sample(
                prompt_ids=torch.randint(5, 300, (4,), generator=g).tolist(),
                completion_ids=torch.randint(5, 300, (n,), generator=g).tolist(),
                completion_mask=[1] * n,
                logprobs=[0.0] * n,
                versions=[0] * n,
                reward=float((k + j) % 2),
                finish_reason=finish,
            )
            with torch.no_grad():
                lp = completion_logprobs(L.trainer.model, [s], temperature=1.0)["logp"][0, :n]
            s.logprobs = (lp - SHIFT).tolist()
            samples.append(s)
        seq, _ = L.cursor.take()
        tr = Trajectory(
            order_id=f"o{seed}-{k}",
            server_id="r0",
            policy_version=L.version,
            samples=samples,
            gen_seconds=0.0,
            num_generated_tokens=0,
        )
        L.batcher.seq_of[tr.order_id] = seq
        out.append(tr)
    return out


@pytest.mark.parametrize("name", EXAMPLES)
def test_train_step_runs_each_example_objective(name, tiny_model, tmp_path):
    L = _learner(tiny_model, tmp_path, f"{name}.toml", ["learner.shaping.mask_truncated=false"])
    gs = L.cfg.learner.group_size
    before = {k: v.clone() for k, v in L.trainer.model.state_dict().items()}
    for step in range(2):
        st = L.train_step(_groups(L, 4 if gs > 1 else 8, gs, seed=step))
        assert st["loss"] == st["loss"] and st["grad_norm"] > 0, st
        for k in (
            "mismatch_mean",
            "mismatch_max",
            "mismatch_kl",
            "offpolicy_masked_frac",
            "entropy",
            "clip_frac",
            "reward",
        ):
            assert k in st, k
        # the fake engine is off by exactly SHIFT on every token (first step: unchanged weights)
        if step == 0:
            assert st["mismatch_mean"] == pytest.approx(SHIFT, abs=1e-5)
            assert st["mismatch_max"] == pytest.approx(SHIFT, abs=1e-5)
            assert st["replay_miss_tokens"] == 0  # no kept sets recorded: nothing to miss
            # k3 with d = log pi_train - log mu = SHIFT
            assert st["mismatch_kl"] == pytest.approx(math.exp(SHIFT) - SHIFT - 1, rel=1e-3)
    assert any(not torch.equal(before[k], v) for k, v in L.trainer.model.state_dict().items())
    if name == "ppo":
        assert "value_loss" in st and L.trainer.obj.critic is not None
        assert L.trainer.obj.critic.head.weight.abs().sum() > 0  # the critic was trained


def test_ppo_separate_value_model_trains_and_checkpoints(tiny_model, tmp_path):
    L = _learner(tiny_model, tmp_path, "ppo.toml", ['learner.algo.critic="model"'])
    assert L.trainer.obj.critic.backbone is not None
    v0 = {k: v.clone() for k, v in L.trainer.obj.critic.state_dict().items()}
    st = L.train_step(_groups(L, 6, 1))
    assert st["value_loss"] > 0 and st["critic_grad_norm"] > 0
    changed = [k for k, v in L.trainer.obj.critic.state_dict().items() if not torch.equal(v0[k], v)]
    assert any(k.startswith("backbone.") for k in changed) and "head.weight" in changed
    L.step = 1
    ckpt = L.checkpoint()
    assert (ckpt / "critic.safetensors").is_file() and (ckpt / "critic_optimizer.pt").is_file()
    L2 = _learner(tiny_model, tmp_path, "ppo.toml", ['learner.algo.critic="model"'])
    L2.trainer.obj.load_state({}, ckpt)
    for k, v in L.trainer.obj.critic.state_dict().items():
        assert torch.equal(v, L2.trainer.obj.critic.state_dict()[k]), k


def test_clip_high_controller_state_is_checkpointed(tiny_model, tmp_path):
    L = _learner(
        tiny_model,
        tmp_path,
        "dapo.toml",
        ["learner.shaping.target_entropy=20.0", "learner.shaping.clip_high_max=0.6"],
    )
    L.train_step(_groups(L, 4, 8))  # entropy of a random model is far below 20: clip opens
    assert L.trainer.obj.loss.clip_high > 0.28
    L2 = _learner(
        tiny_model,
        tmp_path,
        "dapo.toml",
        ["learner.shaping.target_entropy=20.0", "learner.shaping.clip_high_max=0.6"],
    )
    L2.trainer.obj.load_state(L.trainer.obj.state())
    assert (
        L2.trainer.obj.loss.clip_high
        == L.trainer.obj.loss.clip_high
        == L2.trainer.obj.controller.clip_high
    )


def test_icepop_masks_the_tokens_the_engine_disagrees_on(tiny_model, tmp_path):
    L = _learner(
        tiny_model,
        tmp_path,
        "grpo.toml",
        [
            'learner.offpolicy.correction="icepop"',
            "learner.offpolicy.low=0.5",
            "learner.offpolicy.high=2.0",
        ],
    )
    groups = _groups(L, 2, 8)
    n_tok = sum(len(s.completion_ids) for g in groups for s in g.samples)
    bad = 0
    for g in groups:
        s = g.samples[0]
        s.logprobs[0] += 3.0  # weight e^-2.95 < 0.5: IcePop masks it
        bad += 1
    st = L.train_step(groups)
    assert st["offpolicy_masked_frac"] == pytest.approx(bad / n_tok)


def _stale(L: Learner, groups: list[Trajectory]) -> list[Trajectory]:
    """The batch as a sampler one version behind would have sent it: lag 1, and log-probs
    that differ from the learner's by e^1 (even samples) or e^-2 (odd ones) in ratio."""
    L.version = 1
    for g in groups:
        g.policy_version = 0
        for j, s in enumerate(g.samples):
            d = -1.0 if j % 2 == 0 else 2.0  # log pi_theta - log mu after the SHIFT is undone
            s.logprobs = [x + SHIFT - d for x in s.logprobs]
    return groups


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_binds_its_clip_on_a_stale_batch(name, tiny_model, tmp_path):
    """Each example trains the objective it is named after: on a stale batch (lag 1, token
    ratios pi_theta / mu of e and e^-2) its clip (grpo, dr_grpo, dapo: token ratio in
    [0.8, 1.2] or [0.8, 1.28]; gspo: sequence ratio in [1 - 3e-4, 1 + 4e-4]; ppo: GAE
    advantages, [0.8, 1.2]) or its capped IS weight (cispo: weight <= 5) binds."""
    L = _learner(tiny_model, tmp_path, f"{name}.toml", ["learner.shaping.mask_truncated=false"])
    gs = L.cfg.learner.group_size
    assert L.cfg.learner.minibatches >= 2  # several steps per batch: the ratio moves
    st = L.train_step(_stale(L, _groups(L, 4 if gs > 1 else 8, gs)))
    assert st["staleness_max"] == 1.0 and st["optimizer_steps"] == 2.0
    assert st["clip_frac"] > 0.0, st
    if name == "cispo":  # the ratios above 5 (e^2) are capped, the ones at e^-1 are not
        assert L.cfg.learner.algo.clip_low == 1.0 and L.cfg.learner.offpolicy.correction == "none"


def _hand_logp(model: torch.nn.Module, samples: list[Sample], T: float) -> list[list[float]]:
    """log softmax(logits / T) of each completion token, by hand from the model's logits."""
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([list(s.prompt_ids) + list(s.completion_ids)])
            z = model(input_ids=ids).logits[0].double() / T
            P = len(s.prompt_ids)
            lp = torch.log_softmax(z[P - 1 : -1], dim=-1)
            out.append([float(lp[t, y]) for t, y in enumerate(s.completion_ids)])
    return out


@pytest.mark.parametrize("minibatches", [1, 2])
def test_decoupled_ratio_is_against_the_proximal_policy(minibatches, tiny_model, tmp_path):
    """offpolicy_correction = 'tis' (decoupled PPO): pi_prox is the weights when the batch is
    taken, computed here by hand on a copy of those weights. With one optimizer step the ratio
    pi_theta / pi_prox is exactly 1 (no clip binds); with two, the second step's ratio moves
    and the clip binds. The TIS weight pi_prox / mu truncates the tokens where mu is e^-1
    below pi_prox, in every step."""
    import copy

    L = _learner(
        tiny_model,
        tmp_path,
        "grpo.toml",
        [
            'learner.offpolicy.correction="tis"',
            "learner.offpolicy.high=2.0",
            f"learner.minibatches={minibatches}",
            'learner.algo.loss_agg="token"',
        ],
    )
    for gr in L.trainer.opt.param_groups:
        gr["lr"] = 0.05  # a step large enough to move the ratio past the clip
    groups = _groups(L, 4, 8)
    truncated = 0
    for g in groups:
        for j, s in enumerate(g.samples):
            if j % 2 == 0:  # log pi_prox - log mu = 1 > log 2: TIS truncates every token
                s.logprobs = [x + SHIFT - 1.0 for x in s.logprobs]
                truncated += len(s.completion_ids)
    n_tok = sum(len(s.completion_ids) for g in groups for s in g.samples)
    samples = [s for g in groups for s in g.samples]
    want_prox = _hand_logp(copy.deepcopy(L.trainer.model), samples, L.cfg.rollout.temperature)
    seen = []
    micro_loss = L.trainer.obj.micro_loss
    L.trainer.obj.micro_loss = lambda batch, *a: seen.append(batch.prox_BT) or micro_loss(batch, *a)
    st = L.train_step(groups)
    assert st["optimizer_steps"] == minibatches
    assert st["offpolicy_masked_frac"] == pytest.approx(truncated / n_tok)
    if minibatches == 1:
        assert seen[0] is None  # pi_prox is this very forward's weights: its detached log-probs
        assert st["clip_frac"] == 0.0
        return
    prox = seen[0]
    for b, want in enumerate(want_prox):
        assert prox[b, : len(want)].tolist() == pytest.approx(want, abs=1e-5)
    assert st["clip_frac"] > 0.0


def test_truncated_completions_are_masked(tiny_model, tmp_path):
    L = _learner(tiny_model, tmp_path, "dapo.toml", [])
    groups = _groups(L, 2, 8) + _groups(L, 2, 8, seed=1, finish="length")
    st = L.train_step(groups)
    assert st["truncated_masked_frac"] == 0.5
    # a batch of only truncated completions has nothing to learn from
    L.trainer.opt.zero_grad()
    st = L.train_step(_groups(L, 2, 8, seed=2, finish="length"))
    assert st["grad_norm"] == 0.0 and st["mismatch_tokens"] == 0


# ----------------------------------------------------------------------------- collect filters


def _traj(seq: int, rewards: list[float]) -> Trajectory:
    ss = [
        Sample(
            prompt_ids=[1],
            completion_ids=[2],
            completion_mask=[1],
            logprobs=[-1.0],
            versions=[0],
            reward=r,
            finish_reason="stop",
        )
        for r in rewards
    ]
    return Trajectory(
        order_id=f"o{seq}",
        server_id="r0",
        policy_version=0,
        samples=ss,
        gen_seconds=0.0,
        num_generated_tokens=len(ss),
    )


def _collector(overrides: list[str], group_rewards: list[list[float]]) -> Learner:
    cfg = load_config(None, ["model.path=m", "learner.group_size=4", *overrides])
    env = types.SimpleNamespace(reward_range=(0.0, 1.0), num_tasks=lambda split: 100)
    L = Learner(cfg, hub=None, env=env, cursor=DataCursor(100))
    for rw in group_rewards:
        seq, _ = L.cursor.take()
        L.batcher.add(_traj(seq, rw), seq)
    L.dispatch = lambda: None
    return L


def test_dynamic_sampling_drops_uniform_groups_and_refills():
    L = _collector(
        ["learner.shaping.dynamic_sampling=true"],
        [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]],
    )
    refills = []

    def pump(timeout: float) -> None:  # the engine delivers a new, informative group
        seq, _ = L.cursor.take()
        L.batcher.ready.append(_traj(seq, [1, 0, 1, 1]))
        L.batcher.seq_of[f"o{seq}"] = seq
        refills.append(seq)

    L._pump = pump
    batch = L.collect(3)
    assert [t.order_id for t in batch] == ["o1", "o3", f"o{refills[0]}"] and len(refills) == 1
    assert L.counters["filtered_groups"] == 2
    assert L.cursor.outstanding == {1, 3, refills[0]}  # filtered prompts count as consumed


def test_pass_rate_band_keeps_trainable_prompts_only():
    L = _collector(
        ["learner.shaping.pass_rate_band=[0.3, 0.7]"],
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]],
    )
    L._pump = lambda timeout: None
    batch = L.collect(2)
    assert [t.order_id for t in batch] == ["o1", "o3"] and L.counters["filtered_groups"] == 3


def test_filter_budget_trains_unfiltered_rather_than_starving():
    L = _collector(
        [
            "learner.shaping.dynamic_sampling=true",
            "learner.shaping.filter_max_dropped=1",
            "learner.batch_groups=2",
        ],
        [[0, 0, 0, 0]] * 4,
    )
    L._pump = lambda timeout: None
    batch = L.collect(2)
    assert len(batch) == 2 and L.counters["filtered_groups"] == 2


@pytest.mark.parametrize(
    "ov,msg",
    [
        (["learner.group_size=1"], "group_size = 1"),
        (
            [
                'learner.algo.name="ppo"',
                "learner.group_size=1",
                "learner.shaping.dynamic_sampling=true",
            ],
            "group_size >= 2",
        ),
        (["learner.algo.kl_coef=0.1", 'learner.algo.kl_estimator="off"'], "kl_estimator"),
        (['learner.algo.name="cispo"', "learner.algo.ratio_cap=5"], "ratio_cap"),
        (["learner.algo.ratio_cap=1.1"], "must exceed"),
        (
            [
                'learner.offpolicy.correction="icepop"',
                "learner.offpolicy.low=1.5",
                "learner.offpolicy.high=3",
            ],
            "contain 1",
        ),
        (["learner.shaping.pass_rate_band=[0.8, 0.1]"], "pass_rate_band"),
        (["learner.shaping.target_entropy=1", "learner.algo.clip_high=0.9"], "clip_high_max"),
        (["learner.shaping.overlong_buffer=50"], "overlong_buffer"),
        (['learner.algo.name="reinforce"'], "learner.algo.name"),
    ],
)
def test_bad_objective_config_is_a_clear_error(ov, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(None, ["model.path=m", *ov])


# ----------------------------------------------------------------------------- env failures


def test_failed_episodes_cost_only_themselves(tiny_model, tmp_path):
    """A group with an episode whose env failed trains exactly like the group without it."""
    from climbrl.learner.algos.grpo import group_advantages
    from climbrl.rollout.episode import failed_sample as _failed

    r = torch.tensor([[1.0, 0.0, 9.0, 1.0, 0.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False, True, True]])
    a = group_advantages(r, valid_GS=valid)
    want = group_advantages(r[:, [0, 1, 3, 4]])
    assert a[0, 2] == 0 and torch.allclose(a[0, [0, 1, 3, 4]], want[0])

    runs = []
    for with_failure in (False, True):
        L = _learner(tiny_model, tmp_path / str(with_failure), "grpo.toml", [])
        groups = _groups(L, 2, 4)
        if with_failure:
            task = types.SimpleNamespace(task_id="t/train/0")
            groups[0].samples.insert(1, _failed(task, "env.respond raised RuntimeError: boom"))
            groups[1].samples.append(_failed(task, "env.respond ran past env.step_timeout_s=5s"))
        st = L.train_step(groups)
        runs.append((st, {k: v.clone() for k, v in L.trainer.model.state_dict().items()}))
    (st0, w0), (st1, w1) = runs
    assert st0["env_errors"] == 0 and st1["env_errors"] == 2
    assert st1["loss"] == pytest.approx(st0["loss"], rel=1e-6)
    for k in w0:
        assert torch.allclose(w0[k], w1[k], atol=1e-7), k

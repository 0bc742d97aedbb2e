"""climbrl's objectives against TRL's GRPOTrainer._compute_loss, in float64.

TRL's own loss code runs on a stub causal LM whose per-token log-probs and entropies are
parameters we set; climbrl's ``PolicyLoss`` gets the same tensors. Loss and gradients (to the
log-probs and to the entropies) must agree within 1e-6 (they agree to ~1e-16).

    .venv/bin/pytest tests/unit/test_objectives_trl.py -q
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections import defaultdict
from typing import Any

import pytest
import torch

from climbrl.learner.algos.common import BatchNorm
from climbrl.learner.algos.loss import PolicyLoss

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import trl  # a hard dependency of these tests: install.sh installs it (the [rl] extra)

B, P, T = 6, 3, 7
TOL = 1e-6


class StubLM(torch.nn.Module):
    """What TRL's fused-LM-head forward returns, with log-probs and entropies we control."""

    def __init__(self, logp_BT: torch.Tensor, ent_BT: torch.Tensor):
        super().__init__()
        self.logp = torch.nn.Parameter(logp_BT.clone())
        self.ent = torch.nn.Parameter(ent_BT.clone())

    def forward(self, input_ids, attention_mask, labels=None, fused_lm_head=False, **kw):  # noqa: ANN001, ANN003, ANN201
        assert fused_lm_head
        n_pad = input_ids.shape[1] - 1 - self.logp.shape[1]  # the fused head drops one position
        pad = torch.zeros(input_ids.shape[0], n_pad, dtype=self.logp.dtype)
        return types.SimpleNamespace(
            log_probs=torch.cat([pad, self.logp], 1), entropy=torch.cat([pad, self.ent], 1)
        )


class _Accelerator:  # one process, no accumulation
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def gather(self, x: Any) -> Any:
        return x

    gather_for_metrics = gather

    def reduce(self, x: Any, reduction: str = "sum") -> Any:
        return x

    def pad_across_processes(self, x: Any, dim: int = 0, pad_index: int = 0) -> Any:
        return x


def trl_loss(
    model: StubLM,
    inputs: dict[str, Any],
    *,
    loss_type: str,
    level: str,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    delta: float | None = None,
    entropy_coef: float = 0.0,
) -> torch.Tensor:
    """TRL's GRPOTrainer._compute_loss on a bare instance carrying only what it reads."""
    t = object.__new__(trl.GRPOTrainer)
    t.model, t.accelerator = model, _Accelerator()
    t.loss_type, t.importance_sampling_level = loss_type, level
    t.epsilon_low, t.epsilon_high, t.beta = eps_low, eps_high, beta
    t.args = types.SimpleNamespace(
        delta=delta, use_bias_correction_kl=False, steps_per_generation=1
    )
    t.top_entropy_quantile, t.aux_loss_enabled, t.off_policy_mask_threshold = 1.0, False, None
    t.use_vllm, t.vllm_importance_sampling_correction = False, False
    t.current_gradient_accumulation_steps, t.max_completion_length = 1, T
    t.entropy_coef, t._entropy_bonus_enabled = entropy_coef, entropy_coef != 0.0
    t.use_adaptive_entropy = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t._compute_loss(model, inputs)


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    logp = -torch.rand(B, T, generator=g, dtype=dt) * 3
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate([7, 3, 5, 1, 6, 4]):  # different lengths
        mask[b, n:] = 0
    return dict(
        logp=logp,
        ent=torch.rand(B, T, generator=g, dtype=dt) * 2,
        old=logp + 0.4 * torch.randn(B, T, generator=g, dtype=dt),  # ratios in and out of clip
        ref=logp + 0.3 * torch.randn(B, T, generator=g, dtype=dt),
        adv=torch.randn(B, generator=g, dtype=dt),
        mask=mask,
    )


# name -> (TRL loss_type, TRL IS level, TRL eps_low, eps_high, climbrl PolicyLoss kwargs)
CASES = {
    "grpo": (
        "grpo",
        "token",
        0.2,
        0.2,
        dict(objective="grpo", aggregation="sample", clip_low=0.2, clip_high=0.2),
    ),
    "dr_grpo": (
        "dr_grpo",
        "token",
        0.2,
        0.2,
        dict(objective="grpo", aggregation="fixed", clip_low=0.2, clip_high=0.2),
    ),
    "dapo_token": (
        "dapo",
        "token",
        0.2,
        0.28,
        dict(objective="grpo", aggregation="token", clip_low=0.2, clip_high=0.28),
    ),
    "gspo": (
        "grpo",
        "sequence",
        3e-2,
        4e-2,
        dict(objective="gspo", aggregation="sample", clip_low=3e-2, clip_high=4e-2),
    ),
    # TRL's CISPO epsilon_high is the absolute cap on the weight; climbrl's is 1 + clip_high
    "cispo": (
        "cispo",
        "token",
        0.2,
        1.3,
        dict(objective="cispo", aggregation="token", clip_low=1.0, clip_high=0.3),
    ),
}
EXTRAS = {
    "plain": {},
    "kl_k3": dict(beta=0.05),
    "entropy": dict(entropy_coef=0.01),
    "ratio_cap": dict(delta=1.5),
}


def compare(case: str, extra: str, seed: int) -> dict[str, float]:
    """Max abs differences of loss and gradients, climbrl vs TRL, on one random input."""
    loss_type, level, eps_low, eps_high, ours = CASES[case]
    ex = EXTRAS[extra]
    x = _inputs(seed)
    model = StubLM(x["logp"], x["ent"])
    inputs = dict(
        prompt_ids=torch.ones(B, P, dtype=torch.long),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.ones(B, T, dtype=torch.long),
        completion_mask=x["mask"],
        advantages=x["adv"],
        old_per_token_logps=x["old"],
        ref_per_token_logps=x["ref"],
        num_items_in_batch=x["mask"].sum(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_loss = trl_loss(
            model,
            inputs,
            loss_type=loss_type,
            level=level,
            eps_low=eps_low,
            eps_high=eps_high,
            **ex,
        )
    ref_loss.backward()

    logp = x["logp"].clone().requires_grad_()
    ent = x["ent"].clone().requires_grad_()
    pl = PolicyLoss(
        **ours,
        kl_coef=ex.get("beta", 0.0),
        kl_estimator="k3",
        entropy_coef=ex.get("entropy_coef", 0.0),
        ratio_cap=ex.get("delta") or 0.0,
    )
    m = x["mask"].double()
    norm = BatchNorm(tokens=float(m.sum()), samples=float(B), fixed_len=float(T))
    loss, st = pl(logp, x["old"], x["adv"], m, norm, ref_logp_BT=x["ref"], entropy_BT=ent)
    loss.backward()
    assert st["clipped"] > 0, "inputs must exercise the clip, or the test proves little"
    return {
        "loss": abs(float(loss.detach()) - float(ref_loss.detach())),
        "grad_logp": float((logp.grad - model.logp.grad).abs().max()),
        "grad_entropy": _grad_diff(ent.grad, model.ent.grad),
        "grad_scale": float(model.logp.grad.abs().max()),
    }


def _grad_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Both None (no entropy term) is a match; one None is a mismatch."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return float((a - b).abs().max())


# TRL applies delta only to the clipped objectives, and climbrl's config refuses it for cispo
PAIRS = [(c, e) for c in CASES for e in EXTRAS if (c, e) != ("cispo", "ratio_cap")]


@pytest.mark.parametrize("case,extra", PAIRS)
def test_loss_and_gradients_match_trl(case: str, extra: str) -> None:
    for seed in range(3):
        d = compare(case, extra, seed)
        assert d["grad_scale"] > 1e-3  # a real gradient to compare
        assert d["loss"] < TOL and d["grad_logp"] < TOL and d["grad_entropy"] < TOL, d


def test_parity_detects_a_wrong_aggregation() -> None:
    """The harness can fail: GRPO's per-sample mean is not DAPO's token mean."""
    CASES["_wrong"] = (
        "grpo",
        "token",
        0.2,
        0.2,
        dict(objective="grpo", aggregation="token", clip_low=0.2, clip_high=0.2),
    )
    try:
        d = compare("_wrong", "plain", 0)
    finally:
        del CASES["_wrong"]
    assert d["loss"] > 1e-3 or d["grad_logp"] > 1e-3


if __name__ == "__main__":  # prints the max abs differences over all cases
    worst: dict[str, float] = defaultdict(float)
    for c, e in PAIRS:
        for s in range(3):
            for k, v in compare(c, e, s).items():
                if k != "grad_scale":
                    worst[f"{c}/{k}"] = max(worst[f"{c}/{k}"], v)
    for k, v in worst.items():
        print(f"{k:28s} {v:.3e}")

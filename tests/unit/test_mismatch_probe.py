"""The engine/learner mismatch at lag 1 (learner/snapshot.py, ``Learner._probe_mismatch``).

The "engine" log-probs here are computed by hand in float64 from the sampler's weights (each
sample alone, log softmax of logits / T); the learner has moved one update since. The probe
must compare them with the sampler's own weights (mismatch ~ 0), where the step's forward
under the moved weights differs by far more."""

from __future__ import annotations

import copy

import torch

from climbrl.wire import Sample, Trajectory
from tests.unit.tiny_learner import bare_learner, tiny_qwen3

V, T = 40, 0.7


def _engine_logp(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> list[float]:
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([prompt + completion[:-1]])).logits[0, len(prompt) - 1 :]
    lp = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
    return lp.tolist()


def _groups(sampler: torch.nn.Module, version: int) -> list[Trajectory]:
    g = torch.Generator().manual_seed(3)
    out = []
    for k in range(2):
        samples = []
        prompt = torch.randint(1, V, (4,), generator=g).tolist()
        for j in range(2):
            comp = torch.randint(1, V, (3 + j,), generator=g).tolist()
            samples.append(
                Sample(
                    prompt_ids=prompt,
                    completion_ids=comp,
                    completion_mask=[1] * len(comp),
                    logprobs=_engine_logp(sampler, prompt, comp),
                    versions=[version] * len(comp),
                    reward=float(j),
                    finish_reason="stop",
                )
            )
        out.append(
            Trajectory(
                order_id=f"o{k}",
                server_id="r0",
                policy_version=version,
                samples=samples,
                gen_seconds=0.0,
                num_generated_tokens=7,
            )
        )
    return out


def _moved(model: torch.nn.Module) -> torch.nn.Module:
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return moved


def test_snapshot_swaps_the_old_weights_in_and_back():
    from climbrl.learner.snapshot import WeightSnapshot

    sampler = tiny_qwen3(0, V)
    live = _moved(sampler)
    params = list(live.parameters())
    snap = WeightSnapshot()
    snap.take(list(sampler.parameters()), 0)  # the copy is of the sampler's weights
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        want_old, want_new = sampler(input_ids=ids).logits, live(input_ids=ids).logits
        with snap.swapped_in(params):
            got_old = live(input_ids=ids).logits
        got_new = live(input_ids=ids).logits
    assert torch.equal(got_old, want_old) and torch.equal(got_new, want_new)
    assert not torch.equal(want_old, want_new)


def _step(learner_model: torch.nn.Module, sampler: torch.nn.Module, probe: int) -> dict:
    L = bare_learner(
        learner_model,
        T,
        overrides=[f"learner.mismatch_probe_samples={probe}", "learner.max_staleness=1"],
    )
    L.snapshot.take(list(sampler.parameters()), 0)  # what publish gave the engine at version 0
    return L.train_step(_groups(sampler, version=0), 1)  # lag 1


def test_probe_measures_lag1_samples_at_the_weights_that_made_them():
    sampler = tiny_qwen3(0, V)
    on = _step(_moved(sampler), sampler, probe=8)
    assert on["mismatch_probe_tokens"] == on["mismatch_tokens"] == 3 + 4 + 3 + 4
    assert on["mismatch_max"] < 1e-5, on  # float32 forward against the float64 engine values

    off = _step(_moved(sampler), sampler, probe=0)  # lag 1, nothing at equal weights
    assert off["mismatch_tokens"] == 0 and off["mismatch_probe_tokens"] == 0

    two = _step(_moved(sampler), sampler, probe=2)  # at most this many samples
    assert two["mismatch_probe_tokens"] == 3 + 4


def test_probe_ignores_samples_of_another_version():
    sampler = tiny_qwen3(0, V)
    L = bare_learner(_moved(sampler), T, overrides=["learner.max_staleness=2"])
    L.snapshot.take(list(sampler.parameters()), 1)  # version 1's weights; the samples are v0
    st = L.train_step(_groups(sampler, version=0), 2)  # lag 2
    assert st["mismatch_probe_tokens"] == 0


def test_a_synchronous_run_keeps_no_weight_copy():
    """max_staleness = 0 with stale groups dropped: no lag >= 1 sample is ever trained, so
    the learner copies no weights (and measures the lag-0 samples in its own forward)."""
    sampler = tiny_qwen3(0, V)
    L = bare_learner(sampler, T, overrides=["learner.max_staleness=0"])
    st = L.train_step(_groups(sampler, version=0), 0)
    assert L.snapshot.version is None and st["mismatch_tokens"] == 3 + 4 + 3 + 4
    assert st["mismatch_probe_tokens"] == 0

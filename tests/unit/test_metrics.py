"""The paired before/after statistics the demo reports for its held-out accuracy."""

import math

import pytest

from climbrl.metrics import paired_change


def test_paired_change_counts_fixed_and_broken_tasks():
    before = [1, 1, 0, 0, 0, 1]
    after = [1, 0, 1, 1, 0, 1]
    r = paired_change(before, after)
    assert (r["tasks"], r["fixed"], r["broken"]) == (6, 2, 1)
    # 3 discordant pairs, 1 the minority: 2 * P(X <= 1 | Bin(3, 1/2)) = 2 * 4/8
    assert r["mcnemar_p"] == pytest.approx(1.0)


def test_paired_change_p_value_is_the_exact_binomial_tail():
    # 44 fixed and 26 broken (the demo's measured change at lr 4e-5): p = 2 P(X <= 26), n = 70
    before = [0] * 44 + [1] * 26 + [1] * 100
    after = [1] * 44 + [0] * 26 + [1] * 100
    r = paired_change(before, after)
    expect = 2 * sum(math.comb(70, i) for i in range(27)) / 2**70
    assert r["mcnemar_p"] == pytest.approx(expect)
    assert 0.03 < r["mcnemar_p"] < 0.05
    assert paired_change([0] * 20, [1] * 20)["mcnemar_p"] < 1e-5
    assert paired_change([1, 0], [1, 0]) == {"tasks": 2, "fixed": 0, "broken": 0, "mcnemar_p": 1.0}


def test_paired_change_refuses_outcomes_of_different_tasks():
    with pytest.raises(ValueError, match="3 outcomes before, 2 after"):
        paired_change([1, 0, 1], [1, 0])


def test_moving_average_is_a_trailing_mean():
    from climbrl.demo import moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([], 3) == []


def test_reward_plot_has_the_moving_average_and_the_held_out_points(tmp_path):
    import json

    from climbrl.demo import plot_rewards

    m = tmp_path / "metrics.jsonl"
    recs = [{"step": 0, "eval/test_accuracy": 0.5}]
    recs += [{"step": s, "reward": 0.5 + s / 100, "correct": 0.4 + s / 100} for s in range(1, 31)]
    recs += [{"step": 30, "eval/test_accuracy": 0.6}]
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = tmp_path / "curve.png"
    plot_rewards(m, png)
    assert png.stat().st_size > 10_000

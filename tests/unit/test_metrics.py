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

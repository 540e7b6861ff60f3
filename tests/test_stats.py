"""Seed-level statistics checked against values computed by hand (closed forms of Student's t at 1 and 2
degrees of freedom), the exact sign-flip test, the Monte-Carlo floor and Holm's step-down adjustment."""

from __future__ import annotations

import math

import pytest

from flexlora.stats import holm, mean_sd, seed_test, sign_flip_test, t_interval


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5.0])[0] == 5.0 and math.isnan(mean_sd([5.0])[1])
    assert all(math.isnan(x) for x in mean_sd([]))


@pytest.mark.parametrize(
    ("diffs", "p"),
    [
        ([1.0, 2.0, 3.0], 2 / 8),  # only +++ and --- reach |mean| = 2
        ([1.0, -1.0], 1.0),
        ([0.0, 0.0, 0.0], 1.0),
        ([3.0, 1.0, 1.0, 1.0], 2 / 16),  # |sum| = 6 needs four equal signs
        ([3.0, 1.0, 1.0, -1.0], 8 / 16),  # |+-3 + t| >= 4 iff t (the 1s) has the 3's sign: 8 of 16
    ],
)
def test_sign_flip_exact_small_cases(diffs, p):
    test = sign_flip_test(diffs)
    assert test.p == pytest.approx(p) and test.exact and not test.at_floor and test.n == len(diffs)


def test_sign_flip_monte_carlo_reports_its_floor_as_a_bound():
    shifted = [1.0 + 0.1 * ((i * 7) % 5 - 2) for i in range(60)]
    test = sign_flip_test(shifted)
    assert test.p == pytest.approx(1 / 20_001) and test.at_floor and (test.draws, test.hits) == (20_000, 0)
    symmetric = [x * (-1) ** i for i, x in enumerate(range(1, 61))]  # mean -0.5 on spread 35
    noisy = sign_flip_test(symmetric)
    assert noisy.p > 0.5 and not noisy.at_floor and noisy.p == (1 + noisy.hits) / 20_001
    assert sign_flip_test(shifted, seed=1) == sign_flip_test(shifted, seed=1)


def test_seed_test_by_hand_three_seeds():
    # d = 1, 2, 3: mean 2, SD 1, t = 2 / (1 / sqrt 3) = sqrt 12 on 2 df, where the t CDF is
    # 1/2 + t / (2 sqrt(t^2 + 2)): two-sided p = 1 - sqrt(12 / 14); the 97.5% quantile solves
    # t^2 / (t^2 + 2) = 0.95^2, t = sqrt(2 * 0.9025 / 0.0975)
    t = seed_test([1.0, 2.0, 3.0])
    assert t.mean == 2.0 and t.p_t == pytest.approx(1 - math.sqrt(12 / 14))
    half = math.sqrt(2 * 0.9025 / 0.0975) / math.sqrt(3)
    assert t.ci == pytest.approx((2 - half, 2 + half))
    assert t.p_sign == pytest.approx(0.25)


def test_seed_test_by_hand_two_seeds_and_edge_cases():
    # d = -0.2, -0.5: mean -0.35, SD 0.3 / sqrt 2, t = -0.35 / 0.15 on 1 df (Cauchy):
    # p = 1 - (2 / pi) atan(|t|); the 97.5% quantile is tan(0.475 pi)
    t = seed_test([-0.2, -0.5])
    assert t.p_t == pytest.approx(1 - 2 / math.pi * math.atan(0.35 / 0.15))
    assert t.ci == pytest.approx(
        (-0.35 - math.tan(0.475 * math.pi) * 0.15, -0.35 + math.tan(0.475 * math.pi) * 0.15)
    )
    assert t.p_sign == pytest.approx(0.5)
    one = seed_test([0.4])
    assert one.mean == 0.4 and math.isnan(one.p_t) and math.isnan(one.p_sign) and math.isnan(one.ci[0])
    assert seed_test([0.0, 0.0]).p_t == 1.0 and seed_test([0.3, 0.3, 0.3]).p_t == 0.0
    assert all(math.isnan(x) for x in t_interval([1.0]))


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 = 0.04, 0.09, 0.08, 0.5, made monotone: 0.04, 0.09, 0.09, 0.5
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    out = holm([0.01, math.nan, 0.04])  # nan stays out of the family: two tests
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0]) and holm([]) == []

"""The real-lens scores (hpc_lensiam/evaluation/lens_scores.py) on numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from hpc_lensiam.evaluation.lens_scores import (
    SCORES,
    bootstrap_score_interval,
    coverage,
    lens_scores,
    median_abs_rel_error,
    median_bias,
    median_rel_bias,
    outlier_fraction,
    paired_differences,
    response_slope,
    spearman,
)

# five lenses: truths, predictions with relative errors -0.5, +0.1, -0.05, +0.2, 0.0
Y = np.array([1.0, 2.0, 2.0, 2.5, 3.0])
P = np.array([0.5, 2.2, 1.9, 3.0, 3.0])
S = np.array([0.4, 0.1, 0.2, 0.4, 0.1])


def test_median_ratio_and_bias_on_known_numbers():
    # |d|/y = 0.5, 0.1, 0.05, 0.2, 0.0 -> median 0.1; d/y -> -0.5, 0.1, -0.05, 0.2, 0 -> median 0.0
    assert median_abs_rel_error(Y, P) == pytest.approx(0.1)
    assert median_rel_bias(Y, P) == pytest.approx(0.0)
    # d = -0.5, 0.2, -0.1, 0.5, 0.0 -> median 0.0
    assert median_bias(Y, P) == pytest.approx(0.0)
    assert median_bias(Y, Y * 1.1) == pytest.approx(0.2)  # a 10% overestimate, median truth 2.0"
    assert median_rel_bias(Y, Y * 0.9) == pytest.approx(-0.1)


def test_outliers_and_coverage_on_known_numbers():
    assert outlier_fraction(Y, P) == pytest.approx(1 / 5)  # only the -50% lens is beyond 0.3
    assert outlier_fraction(Y, P, threshold=0.15) == pytest.approx(2 / 5)
    # |d| = 0.5, 0.2, 0.1, 0.5, 0.0 against sigma 0.4, 0.1, 0.2, 0.4, 0.1: lenses 3 and 5 inside
    assert coverage(Y, P, S) == pytest.approx(2 / 5)
    assert coverage(Y, P, S, k=1.5) == pytest.approx(4 / 5)  # 1.5 sigma: all but lens 2 (0.2 > 0.15)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 5, 9).astype(float)
        p = rng.integers(0, 5, 9).astype(float)
        ref = spearmanr(y, p).statistic
        got = spearman(y, p)
        assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([2, 2, 2], [1, 2, 3]))  # one distinct truth: no ranking to correlate


def test_response_slope_tells_compression_from_bias():
    # dy = -1.1, -0.1, -0.1, 0.4, 0.9 (sum of squares 2.2); dp = -1.62, 0.08, -0.22, 0.88, 0.88 -> cov 2.94
    assert response_slope(Y, P) == pytest.approx(2.94 / 2.2)
    assert response_slope(Y, 2.0 + 0.5 * (Y - 2.0)) == pytest.approx(0.5)  # squeezed towards 2": half the range
    assert response_slope(Y, Y + 0.3) == pytest.approx(1.0)  # a bias moves no slope
    assert math.isnan(response_slope([2.0, 2.0], [1.0, 3.0]))  # one distinct truth: no slope
    squeezed = paired_differences(Y, 2.0 + 0.5 * (Y - 2.0), S, Y + 0.3, S, n_boot=200, seed=4)
    assert squeezed["response_slope"]["value"] == pytest.approx(-0.5)
    assert squeezed["response_slope"]["a_better_fraction"] == pytest.approx(0.0)  # B's slope is 1 on every resample


def test_bootstrap_interval_brackets_the_value_and_collapses_without_spread():
    lo, hi = bootstrap_score_interval(median_abs_rel_error, [Y, P], n_boot=500, seed=1)
    assert 0.0 <= lo <= 0.1 <= hi <= 0.5  # a resample's median is one of the five ratios
    # every lens off by exactly +10%: every resample says 0.1
    assert bootstrap_score_interval(median_abs_rel_error, [Y, Y * 1.1], n_boot=200) == pytest.approx([0.1, 0.1])


def test_lens_scores_every_score_with_interval_and_unlabelled_rows_left_out():
    y = np.r_[Y, np.nan, np.nan]  # two unlabelled lenses are predicted, not scored
    p, s = np.r_[P, 9.0, 9.0], np.r_[S, 1.0, 1.0]
    out = lens_scores(y, p, s, n_boot=300)
    assert out["n"] == 5
    assert set(SCORES) <= set(out)
    assert out["median_abs_rel_error"]["value"] == pytest.approx(0.1)
    assert out["outlier_fraction"]["value"] == pytest.approx(0.2)
    assert out["coverage_1sigma"]["value"] == pytest.approx(0.4)
    for name in SCORES:
        lo, hi = out[name]["ci95"]
        assert lo <= out[name]["value"] <= hi
    assert lens_scores([1.0, np.nan], [1.0, 2.0], [0.1, 0.1]) == {"n": 1}  # nothing to score


def test_paired_difference_of_an_arm_with_itself_is_zero_and_a_better_arm_wins():
    same = paired_differences(Y, P, S, P, S, n_boot=200)
    for name in SCORES:
        assert same[name]["value"] == pytest.approx(0.0)
        assert same[name]["ci95"] == pytest.approx([0.0, 0.0])
        assert same[name]["a_better_fraction"] == pytest.approx(0.5)  # always a tie
    # A: every lens within 2%; B: the predictions above (one -50% outlier)
    good = Y * np.array([1.02, 0.99, 1.01, 0.98, 1.0])
    d = paired_differences(Y, good, S, P, S, n_boot=500, seed=2)
    assert d["median_abs_rel_error"]["value"] == pytest.approx(0.01 - 0.1)
    assert d["outlier_fraction"]["value"] == pytest.approx(-0.2)
    assert d["median_abs_rel_error"]["ci95"][1] <= 0.0  # A never worse on any resample
    assert d["median_abs_rel_error"]["a_better_fraction"] > 0.9


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="1-D of one length"):
        median_abs_rel_error([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="one value per lens"):
        coverage([1.0, 2.0], [1.0, 2.0], [0.1])

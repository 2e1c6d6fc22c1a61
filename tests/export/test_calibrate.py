"""Conformal threshold fitting: the order statistic, its minimum sample size, the Clopper-Pearson interval,
and the coverage guarantee on fresh in-distribution samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from oodguard.calibration import CalibrationError
from oodguard.export.calibrate import clopper_pearson, fit_threshold, fit_thresholds, minimum_size


@pytest.mark.parametrize("n", [19, 20, 30, 39, 40, 99, 100, 1000, 1234])
def test_threshold_is_the_conformal_order_statistic(n):
    scores = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0))  # the k-th smallest is k
    k = math.ceil(0.95 * (n + 1))
    fitted = fit_threshold("energy", scores)
    assert fitted.threshold == float(k)
    assert fitted.accepted == k and fitted.n == n
    assert fitted.achieved_tpr == pytest.approx(k / n) and fitted.achieved_tpr >= 0.95
    np.testing.assert_array_equal(fitted.sorted_scores, np.arange(1.0, n + 1.0))


def test_threshold_by_hand():
    assert fit_threshold("s", np.arange(19.0)).threshold == 18.0  # k = ceil(0.95 * 20) = 19: the maximum
    assert fit_threshold("s", np.arange(40.0)).threshold == 38.0  # k = ceil(38.95) = 39
    assert fit_threshold("s", np.arange(10.0), target_tpr=0.8).threshold == 8.0  # k = ceil(8.8) = 9


def test_accepted_counts_ties_at_the_threshold():
    scores = np.r_[np.zeros(10), np.ones(30)]  # k = 39: threshold 1, every score accepted
    fitted = fit_threshold("s", scores)
    assert fitted.threshold == 1.0 and fitted.accepted == 40 and fitted.achieved_tpr == 1.0


@pytest.mark.parametrize("seed", range(10))
def test_achieved_tpr_on_calibration_set_reaches_target(seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_exponential(int(rng.integers(19, 500)))
    fitted = fit_threshold("s", scores)
    assert np.mean(scores <= fitted.threshold) == fitted.achieved_tpr >= 0.95


@pytest.mark.parametrize("k, n", [(1, 10), (5, 10), (19, 20), (95, 100), (961, 1000), (3, 7)])
def test_clopper_pearson_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    low, high = clopper_pearson(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)


def test_clopper_pearson_known_values():
    low, high = clopper_pearson(95, 100)  # standard table value: (0.8872, 0.9836)
    assert (round(low, 4), round(high, 4)) == (0.8872, 0.9836)


@pytest.mark.parametrize("n", [1, 19, 100])
def test_clopper_pearson_edges(n):
    assert clopper_pearson(0, n) == (0.0, pytest.approx(1 - 0.025 ** (1 / n)))
    assert clopper_pearson(n, n) == (pytest.approx(0.025 ** (1 / n)), 1.0)


def test_interval_is_reported_for_the_calibration_set():
    fitted = fit_threshold("s", np.arange(100.0))
    assert fitted.accepted == 96
    assert fitted.achieved_tpr_ci95 == pytest.approx(clopper_pearson(96, 100))


def test_minimum_size():
    assert minimum_size(0.95) == 19
    assert minimum_size(0.9) == 9
    assert minimum_size(0.99) == 99


def test_nineteen_samples_work_and_eighteen_are_too_few():
    assert fit_threshold("s", np.arange(19.0)).accepted == 19
    with pytest.raises(CalibrationError, match="18 calibration samples are too few.*at least 19"):
        fit_threshold("s", np.arange(18.0))


def test_other_targets_have_their_own_minimum():
    assert fit_threshold("s", np.arange(9.0), target_tpr=0.9).threshold == 8.0
    with pytest.raises(CalibrationError, match="too few"):
        fit_threshold("s", np.arange(8.0), target_tpr=0.9)


def test_empty_set_is_an_error():
    with pytest.raises(CalibrationError, match="'s': the calibration set is empty"):
        fit_threshold("s", np.array([]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_an_error(bad):
    scores = np.r_[np.arange(30.0), bad, bad]
    with pytest.raises(CalibrationError, match="2 calibration scores are NaN/inf"):
        fit_threshold("s", scores)


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5, -0.1])
def test_target_tpr_out_of_range(target):
    with pytest.raises(CalibrationError, match="target TPR"):
        fit_threshold("s", np.arange(100.0), target_tpr=target)


def test_fit_thresholds_picks_the_named_outputs():
    outputs = {"energy": np.arange(20.0), "msp": -np.arange(20.0), "logits": np.zeros((20, 3))}
    fitted = fit_thresholds(outputs, ["energy", "msp"])
    assert list(fitted) == ["energy", "msp"]
    assert (fitted["energy"].threshold, fitted["msp"].threshold) == (19.0, 0.0)


@pytest.mark.parametrize("n", [19, 30, 200])
def test_fresh_samples_are_accepted_at_least_at_the_target_rate(n):
    """Split-conformal guarantee: for continuous i.i.d. scores the expected acceptance of a fresh sample is
    exactly k / (n + 1) >= 0.95. Over 3000 calibrations of 100 fresh samples each, the Monte Carlo
    standard error is at most 0.001, so the tolerance is about three of them."""
    rng = np.random.default_rng(2024 + n)
    repeats, fresh_per_repeat = 3000, 100
    calibration = rng.normal(size=(repeats, n))
    fresh = rng.normal(size=(repeats, fresh_per_repeat))
    thresholds = np.array([fit_threshold("s", row).threshold for row in calibration])
    coverage = np.mean(fresh <= thresholds[:, None])

    expected = math.ceil(0.95 * (n + 1)) / (n + 1)
    assert expected >= 0.95
    assert abs(coverage - expected) < 0.003


def test_naive_quantile_would_undercover():
    """The same check discriminates: the plain ceil(0.95 n)-th order statistic at n = 30 covers 29/31 < 0.95,
    and the fitted threshold sits one order statistic above it."""
    rng = np.random.default_rng(5)
    calibration = rng.normal(size=(3000, 30))
    naive = np.sort(calibration, axis=1)[:, math.ceil(0.95 * 30) - 1]
    fitted = np.array([fit_threshold("s", row).threshold for row in calibration])
    fresh = rng.normal(size=(3000, 100))
    assert np.mean(fresh <= naive[:, None]) < 0.94
    np.testing.assert_array_equal(fitted, np.sort(calibration, axis=1)[:, 29])

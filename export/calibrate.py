"""Thresholds at a target TPR (in-distribution = positive), fitted on held-out in-distribution scores.

For ``n`` calibration scores and target TPR ``t``, the threshold is the ``k``-th smallest score with
``k = ceil(t * (n + 1))`` (the split-conformal quantile): a new exchangeable in-distribution input is
accepted (``score <= threshold``) with probability at least ``t``. This needs ``k <= n``, i.e.
``n >= t / (1 - t)`` (19 samples at 95%); a smaller (or empty) calibration set is an error. The achieved
TPR on the calibration set is reported with its exact Clopper-Pearson 95% interval.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta

from oodguard.calibration import CalibrationError, ScoreThreshold


def minimum_size(target_tpr: float) -> int:
    return math.ceil(target_tpr / (1.0 - target_tpr) - 1e-9)


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval for ``successes`` out of ``n``."""
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1.0 - tail, successes + 1, n - successes))
    return low, high


def fit_threshold(name: str, scores: np.ndarray, target_tpr: float = 0.95) -> ScoreThreshold:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not 0.0 < target_tpr < 1.0:
        raise CalibrationError(f"target TPR must be in (0, 1), got {target_tpr}")
    n = len(scores)
    if n == 0:
        raise CalibrationError(f"score {name!r}: the calibration set is empty")
    if not np.all(np.isfinite(scores)):
        raise CalibrationError(f"score {name!r}: {int((~np.isfinite(scores)).sum())} calibration scores are NaN/inf")
    k = math.ceil(target_tpr * (n + 1) - 1e-9)
    if k > n:
        raise CalibrationError(
            f"score {name!r}: {n} calibration samples are too few for a {target_tpr:.0%} TPR threshold "
            f"(need at least {minimum_size(target_tpr)})"
        )
    ordered = np.sort(scores)
    threshold = float(ordered[k - 1])
    accepted = int(np.count_nonzero(scores <= threshold))
    return ScoreThreshold(
        name=name,
        threshold=threshold,
        target_tpr=target_tpr,
        n=n,
        accepted=accepted,
        achieved_tpr=accepted / n,
        achieved_tpr_ci95=clopper_pearson(accepted, n),
        sorted_scores=ordered,
    )


def fit_thresholds(outputs: dict[str, np.ndarray], score_names: list[str], target_tpr: float = 0.95) -> dict[str, ScoreThreshold]:
    return {name: fit_threshold(name, outputs[name], target_tpr) for name in score_names}

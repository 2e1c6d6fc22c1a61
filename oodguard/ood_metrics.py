"""OOD detection metrics. Scores are *higher = more OOD*; in-distribution is the positive class for TPR.

- AUROC: probability that a random OOD input scores higher than a random ID input (ties count 1/2).
- FPR@95TPR (classic convention, OpenOOD v1.5): fraction of OOD inputs *accepted* at the threshold
  that keeps 95% of ID inputs.
- AUPR-In / AUPR-Out: average precision (scikit-learn's step-wise definition, no interpolation) with
  ID / OOD as the positive class; for AUPR-In the ranking is by ``-score``.
"""

from __future__ import annotations

import numpy as np


def _midranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    id_scores = np.asarray(id_scores, np.float64).ravel()
    ood_scores = np.asarray(ood_scores, np.float64).ravel()
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise ValueError("AUROC needs at least one ID and one OOD score")
    ranks = _midranks(np.r_[id_scores, ood_scores])
    n_id, n_ood = len(id_scores), len(ood_scores)
    return float((ranks[n_id:].sum() - n_ood * (n_ood + 1) / 2.0) / (n_id * n_ood))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD accepted (``score <= t``) at the smallest ``t`` accepting at least ``tpr`` of ID."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    id_sorted = np.sort(np.asarray(id_scores, np.float64).ravel())
    ood_scores = np.asarray(ood_scores, np.float64).ravel()
    if len(id_sorted) == 0 or len(ood_scores) == 0:
        raise ValueError("FPR@TPR needs at least one ID and one OOD score")
    threshold = id_sorted[int(np.ceil(tpr * len(id_sorted))) - 1]
    return float(np.mean(ood_scores <= threshold))


def average_precision(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Area under the precision-recall curve, positives ranked by *higher* score, ties grouped."""
    pos = np.asarray(positive_scores, np.float64).ravel()
    neg = np.asarray(negative_scores, np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("average precision needs at least one positive and one negative score")
    scores = np.r_[pos, neg]
    truth = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    order = np.argsort(-scores, kind="mergesort")
    scores, truth = scores[order], truth[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(truth)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / len(pos)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    return average_precision(-np.asarray(id_scores, np.float64), -np.asarray(ood_scores, np.float64))


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    return average_precision(ood_scores, id_scores)

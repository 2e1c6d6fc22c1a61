"""AUROC and FPR@TPR against scikit-learn and hand counts. Scores are higher = more OOD."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from oodguard.ood_metrics import auroc, fpr_at_tpr


def sklearn_auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """OOD is the positive class and the score is used as is."""
    labels = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return float(roc_auc_score(labels, np.r_[id_scores, ood_scores]))


def sklearn_fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float) -> float:
    """The same convention read off an ROC curve with ID as the positive class and ``-score`` as its score.

    ``-score >= -t`` is ``score <= t``, so the first ROC point (thresholds decrease) whose TPR reaches
    ``tpr`` is the smallest ``t`` keeping at least ``tpr`` of ID, and its FPR is the fraction of OOD accepted.
    """
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    fpr, tpr_curve, _ = roc_curve(labels, -np.r_[id_scores, ood_scores], drop_intermediate=False)
    return float(fpr[np.argmax(tpr_curve >= tpr - 1e-12)])


# --- AUROC -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_on_continuous_scores(seed):
    rng = np.random.default_rng(seed)
    id_scores, ood_scores = rng.normal(0, 1, 300), rng.normal(0.7, 1.3, 170)
    assert auroc(id_scores, ood_scores) == pytest.approx(sklearn_auroc(id_scores, ood_scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_many_ties(seed):
    rng = np.random.default_rng(100 + seed)
    id_scores, ood_scores = rng.integers(0, 5, 200), rng.integers(2, 8, 90)
    assert auroc(id_scores, ood_scores) == pytest.approx(sklearn_auroc(id_scores, ood_scores), abs=1e-12)


@pytest.mark.parametrize(
    "id_scores, ood_scores, expected",
    [
        ([1.0], [2.0], 1.0),
        ([2.0], [1.0], 0.0),
        ([3.0], [3.0], 0.5),
        ([2.0], [1.0, 2.0, 3.0], 0.5),  # (0 + 1/2 + 1) / 3
        ([1.0, 2.0, 3.0], [2.0], 0.5),
        ([0.0, 5.0, 5.0], [5.0], 2 / 3),  # (1 + 1/2 + 1/2) / 3: above 0, tied with both 5s
        ([4.0] * 6, [4.0] * 3, 0.5),
    ],
)
def test_auroc_small_sets_by_hand(id_scores, ood_scores, expected):
    id_scores, ood_scores = np.array(id_scores), np.array(ood_scores)
    assert auroc(id_scores, ood_scores) == pytest.approx(expected)
    assert auroc(id_scores, ood_scores) == pytest.approx(sklearn_auroc(id_scores, ood_scores))


def test_auroc_separated_and_reversed():
    low, high = np.arange(10.0), np.arange(20.0, 25.0)
    assert auroc(low, high) == 1.0
    assert auroc(high, low) == 0.0


def test_auroc_accepts_other_shapes_and_types():
    assert auroc([[1, 2], [3, 4]], [5, 6]) == 1.0


@pytest.mark.parametrize("id_scores, ood_scores", [([], [1.0]), ([1.0], []), ([], [])])
def test_auroc_empty_raises(id_scores, ood_scores):
    with pytest.raises(ValueError, match="at least one ID and one OOD"):
        auroc(id_scores, ood_scores)


# --- FPR@TPR -----------------------------------------------------------------------------------------


def test_fpr_at_95_by_hand():
    id_scores = np.arange(1.0, 101.0)  # the smallest threshold keeping 95 of 100 is 95
    ood_scores = np.array([50.0, 95.0, 95.5, 96.0, 200.0])  # accepted (<= 95): 50 and 95
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(2 / 5)


def test_fpr_rounds_the_id_count_up():
    id_scores = np.arange(1.0, 11.0)  # 95% of 10 is 9.5: keep 10, threshold 10
    assert fpr_at_tpr(id_scores, np.array([9.5, 10.0, 10.5])) == pytest.approx(2 / 3)
    assert fpr_at_tpr(id_scores, np.array([9.5, 10.0, 10.5]), tpr=0.9) == pytest.approx(0.0)  # threshold 9
    assert fpr_at_tpr(id_scores, np.array([9.0, 10.5]), tpr=0.9) == pytest.approx(0.5)  # ties are accepted
    assert fpr_at_tpr(id_scores, np.array([9.5, 10.0, 10.5]), tpr=1.0) == pytest.approx(2 / 3)  # threshold 10


def test_fpr_with_tied_id_scores():
    id_scores = np.array([1.0] * 5 + [2.0] * 15)  # 95% = 19 of 20 needs threshold 2
    assert fpr_at_tpr(id_scores, np.array([1.5, 2.0, 3.0, 0.0])) == pytest.approx(3 / 4)


def test_fpr_of_separated_scores():
    assert fpr_at_tpr(np.arange(100.0), np.arange(100.0, 150.0)) == 0.0
    assert fpr_at_tpr(np.arange(100.0, 150.0), np.arange(100.0)) == 1.0


@pytest.mark.parametrize("tpr", [0.95, 0.9, 0.8, 0.99])
@pytest.mark.parametrize("seed", range(4))
def test_fpr_matches_roc_curve(seed, tpr):
    rng = np.random.default_rng(seed)
    id_scores = rng.normal(0, 1, 137 + seed)
    ood_scores = np.r_[rng.normal(1.5, 1, 90), rng.choice(id_scores, 10)]  # some exact ties with ID
    assert fpr_at_tpr(id_scores, ood_scores, tpr) == pytest.approx(sklearn_fpr_at_tpr(id_scores, ood_scores, tpr))


@pytest.mark.parametrize("seed", range(4))
def test_fpr_matches_roc_curve_with_integer_scores(seed):
    rng = np.random.default_rng(50 + seed)
    id_scores, ood_scores = rng.integers(0, 20, 60), rng.integers(10, 30, 40)
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(sklearn_fpr_at_tpr(id_scores, ood_scores, 0.95))


@pytest.mark.parametrize("id_scores, ood_scores", [([], [1.0]), ([1.0, 2.0], [])])
def test_fpr_empty_raises(id_scores, ood_scores):
    with pytest.raises(ValueError, match="needs"):
        fpr_at_tpr(id_scores, ood_scores)


@pytest.mark.parametrize("tpr", [0.0, -0.5, 1.5, float("nan")])
def test_fpr_bad_tpr_raises(tpr):
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr(np.arange(10.0), np.arange(5.0), tpr)


# --- AUPR-In / AUPR-Out against scikit-learn's average_precision_score -------------------------
from sklearn.metrics import average_precision_score  # noqa: E402

from oodguard.ood_metrics import aupr_in, aupr_out, average_precision  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("integer_scores", [False, True])
def test_aupr_matches_sklearn(seed, integer_scores):
    rng = np.random.default_rng(seed)
    id_scores = rng.normal(0.0, 1.0, 300)
    ood_scores = rng.normal(1.0, 1.0, 120)
    if integer_scores:  # many ties
        id_scores, ood_scores = np.round(id_scores), np.round(ood_scores)
    truth_out = np.r_[np.zeros(300), np.ones(120)]
    both = np.r_[id_scores, ood_scores]
    assert aupr_out(id_scores, ood_scores) == pytest.approx(average_precision_score(truth_out, both), abs=1e-12)
    assert aupr_in(id_scores, ood_scores) == pytest.approx(average_precision_score(1 - truth_out, -both), abs=1e-12)


@pytest.mark.parametrize("pos, neg", [([1.0], [0.0]), ([0.0], [1.0]), ([1.0], [1.0]), ([2.0, 0.0], [1.0]),
                                      ([1.0, 1.0, 0.0], [1.0, 0.5])])
def test_average_precision_on_tiny_sets_matches_sklearn(pos, neg):
    truth = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    expected = average_precision_score(truth, np.r_[pos, neg])
    assert average_precision(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_average_precision_hand_example_and_errors():
    # ranking: pos(3), neg(2), pos(1): precision 1 at recall .5, 2/3 at recall 1 → (0.5 + 2/3) / 2... weighted
    assert average_precision([3.0, 1.0], [2.0]) == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))
    with pytest.raises(ValueError):
        average_precision([], [1.0])

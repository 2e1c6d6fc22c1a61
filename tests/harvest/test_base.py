import numpy as np
import pytest

from oodguard.harvest import Context, Pool, Selection, get_strategy
from oodguard.harvest.strategies.base import known_logits, softmax, top_k

from .conftest import ids


def test_pool_converts_and_checks_shapes():
    pool = Pool(["a", "b"], np.zeros((2, 3), np.float64), [[1, 2], [3, 4]], {"energy": [1, 2]})
    assert pool.features.dtype == np.float32 and pool.logits.dtype == np.float32
    assert pool.scores["energy"].dtype == np.float64 and len(pool) == 2
    with pytest.raises(ValueError, match="features"):
        Pool(["a", "b"], np.zeros((3, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="logits"):
        Pool(["a", "b"], np.zeros((2, 3)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="energy"):
        Pool(["a", "b"], np.zeros((2, 3)), np.zeros((2, 2)), {"energy": [1.0]})


def test_empty_pool_forms():
    assert len(Pool.empty(4, 3)) == 0
    pool = Pool([], [], [], {})
    assert pool.features.shape == (0, 0) and len(pool) == 0


class _Record:
    def __init__(self, i, scores):
        self.id, self.features, self.logits, self.scores = f"q{i}", np.full(3, i), np.arange(2) * i, scores


def test_from_records_fills_missing_scores_with_nan():
    pool = Pool.from_records([_Record(0, {"sisom": 1.0, "energy": 2.0}), _Record(1, {"sisom": 3.0})])
    assert list(pool.ids) == ["q0", "q1"]
    assert pool.features.shape == (2, 3) and pool.logits.shape == (2, 2)
    assert pool.scores["sisom"].tolist() == [1.0, 3.0]
    assert pool.scores["energy"][0] == 2.0 and np.isnan(pool.scores["energy"][1])
    assert len(Pool.from_records([])) == 0


def test_selection_checks_reasons_and_maps_ids():
    pool = Pool(ids(3), np.zeros((3, 1)), np.zeros((3, 2)))
    selection = Selection([2, 0], ["x", "y"])
    assert selection.ids(pool).tolist() == ["r2", "r0"]
    with pytest.raises(ValueError, match="reasons"):
        Selection([1, 2], ["only one"])


@pytest.mark.parametrize("budget", [0, -1, 2.5, True, "3"])
def test_invalid_budget_is_refused(budget):
    pool = Pool(ids(3), np.zeros((3, 1)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="budget"):
        get_strategy("entropy").select(pool, budget)


def test_budget_at_least_pool_size_takes_everything():
    pool = Pool(ids(4), np.zeros((4, 1)), np.zeros((4, 2)))
    selection = get_strategy("sisom").select(pool, 10)  # no sisom score: the strategy is not even run
    assert selection.indices.tolist() == [0, 1, 2, 3]
    assert all("every item taken" in reason for reason in selection.reasons)


def test_top_k_is_stable_and_puts_nan_last():
    assert top_k(np.array([1.0, np.nan, 3.0, 3.0, 0.0]), 5).tolist() == [2, 3, 0, 4, 1]


def test_softmax_rows_sum_to_one_without_overflow():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert np.allclose(p.sum(axis=1), 1) and p[0, 0] == pytest.approx(1.0) and p[1, 0] == 0.5


def test_known_logits_drops_the_unknown_output():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 5.0]])
    pool = Pool(ids(2), np.zeros((2, 1)), logits)
    known, unknown, k = known_logits(pool, Context(unknown_label=2))
    assert k == 2 and known.tolist() == [[3.0, 1.0], [0.0, 1.0]] and unknown.tolist() == [False, True]
    known, unknown, k = known_logits(pool, Context())
    assert k == 3 and not unknown.any()
    with pytest.raises(ValueError, match="known_classes"):
        known_logits(pool, Context(known_classes=3, unknown_label=2))

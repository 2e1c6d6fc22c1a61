import numpy as np
import pytest

from oodguard.harvest import Context, Pool, get_strategy

from .conftest import ids


def _pool(scores):
    n = len(next(iter(scores.values())))
    return Pool(ids(n), np.zeros((n, 2)), np.zeros((n, 3)), scores)


def test_top_b_is_the_argsort_of_sisome():
    rng = np.random.default_rng(0)
    sisome, sisom = rng.normal(size=100), rng.normal(size=100)
    selection = get_strategy("sisom").select(_pool({"sisom": sisom, "sisome": sisome}), 10)
    assert selection.indices.tolist() == np.argsort(-sisome)[:10].tolist()
    assert "sisome" in selection.reasons[0] and "rank 1" in selection.reasons[0]


def test_falls_back_to_sisom_and_takes_a_named_score():
    rng = np.random.default_rng(1)
    sisom, energy = rng.normal(size=50), rng.normal(size=50)
    pool = _pool({"sisom": sisom, "energy": energy})
    assert get_strategy("sisom").select(pool, 5).indices.tolist() == np.argsort(-sisom)[:5].tolist()
    named = get_strategy("sisom").select(pool, 5, context=Context(params={"score": "energy"}))
    assert named.indices.tolist() == np.argsort(-energy)[:5].tolist()


def test_missing_score_names_what_the_pool_has():
    with pytest.raises(ValueError, match="energy"):
        get_strategy("sisom").select(_pool({"energy": np.zeros(5)}), 2)


def test_nan_scores_rank_last():
    pool = _pool({"sisome": np.array([np.nan, 1.0, 2.0, np.nan])})
    assert get_strategy("sisom").select(pool, 3).indices.tolist() == [2, 1, 0]

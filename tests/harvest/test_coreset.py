import numpy as np

from oodguard.harvest import Context, Pool, get_strategy

from .conftest import blobs, ids

E = np.eye(4, dtype=np.float32)


def _pool():
    # 50 items around e1 (where the labeled set is), 5 around -e1 (antipodal: distance 2), 5 around e2 (√2)
    rng = np.random.default_rng(0)
    features, group = blobs(rng, [E[0], -E[0], E[1]], [50, 5, 5], spread=0.02)
    return Pool(ids(60), features, np.zeros((60, 3))), group


def test_far_cluster_first_then_the_next_farthest():
    pool, group = _pool()
    labeled = E[0] + 0.02 * np.random.default_rng(1).normal(size=(30, 4))
    selection = get_strategy("coreset").select(pool, 3, context=Context(labeled_features=labeled))
    assert group[selection.indices].tolist()[:2] == [1, 2]
    assert "distance 1.99" in selection.reasons[0] and "labeled" in selection.reasons[0]


def test_without_labeled_set_starts_farthest_from_the_mean():
    pool, group = _pool()
    selection = get_strategy("coreset").select(pool, 3)
    assert sorted(group[selection.indices].tolist()) == [0, 1, 2]  # one per cluster


def test_large_pools_are_subsampled_and_the_reason_says_so():
    pool, group = _pool()
    context = Context(params={"max_pool": 20})
    a = get_strategy("coreset").select(pool, 4, seed=5, context=context)
    b = get_strategy("coreset").select(pool, 4, seed=5, context=context)
    assert a.indices.tolist() == b.indices.tolist()
    assert all("subsampled to 20 of 60" in reason for reason in a.reasons)


def test_duplicated_points_are_never_picked_twice():
    pool = Pool(ids(6), np.ones((6, 3)), np.zeros((6, 2)))
    selection = get_strategy("coreset").select(pool, 5, context=Context(labeled_features=np.ones((2, 3))))
    assert len(set(selection.indices.tolist())) == 5

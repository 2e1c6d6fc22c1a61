import numpy as np

from oodguard.harvest.strategies._diversity import greedy_diverse, pool_spread
from oodguard.harvest.strategies.base import l2_normalise


def test_quotas_bound_each_group_and_group_minus_one_is_never_taken():
    rng = np.random.default_rng(0)
    x = l2_normalise(rng.normal(size=(40, 5)))
    groups = np.repeat([0, 1, -1, 1], 10)
    value = np.linspace(1, 0.1, 40)  # the highest values are group 0's
    picks = greedy_diverse(x, value, 0.0, 6, groups, np.array([2, 4]))
    assert np.bincount(groups[picks.indices], minlength=2).tolist() == [2, 4]
    assert picks.indices[:2].tolist() == [0, 1]  # radius 0: plain order by value inside the quotas
    assert not np.isfinite(picks.distance[0]) and np.isfinite(picks.distance[1:]).all()


def test_the_discount_prefers_a_far_item_and_the_spread_is_the_median_distance():
    x = np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)
    picks = greedy_diverse(l2_normalise(x), np.array([3.0, 2.0, 1.0]), 1.0, 2)
    assert picks.indices.tolist() == [0, 2] and picks.factor[1] == 1.0
    unit = np.eye(3, dtype=np.float32)  # all pairwise distances √2
    assert np.isclose(pool_spread(unit, np.random.default_rng(0)), np.sqrt(2))

import numpy as np

from oodguard.harvest import Pool, get_strategy

from .conftest import ids


def _pool(n):
    return Pool(ids(n), np.zeros((n, 2)), np.zeros((n, 3)))


def test_seeded_and_deterministic():
    pool = _pool(100)
    strategy = get_strategy("random")
    a, b, c = (strategy.select(pool, 10, seed=s).indices.tolist() for s in (1, 1, 2))
    assert a == b and a != c
    assert np.random.default_rng(1).choice(100, 10, replace=False).tolist() == a


def test_uniform_over_seeds():
    pool = _pool(20)
    strategy = get_strategy("random")
    counts = np.zeros(20)
    for seed in range(1000):
        counts[strategy.select(pool, 5, seed=seed).indices] += 1
    share = counts / 1000  # each item should be drawn with probability 5/20
    assert np.abs(share - 0.25).max() < 0.06

import numpy as np

from oodguard.harvest import Context, Pool, get_strategy
from oodguard.harvest.strategies.badge import embedding_parts, sq_distances_to

from .conftest import blobs, ids


def test_kernel_identity_matches_explicit_embeddings():
    rng = np.random.default_rng(0)
    logits, features = rng.normal(size=(7, 4)), rng.normal(size=(7, 5))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    onehot = np.eye(4)[p.argmax(axis=1)]
    g = np.stack([np.kron(p[i] - onehot[i], features[i]) for i in range(7)])  # [N, K·D]
    u, h, g2 = embedding_parts(logits, features)
    assert np.allclose(g2, (g * g).sum(axis=1))
    for j in range(7):
        assert np.allclose(sq_distances_to(u, h, g2, j), ((g - g[j]) ** 2).sum(axis=1), atol=1e-9)


def test_picks_spread_over_the_clusters():
    rng = np.random.default_rng(0)
    features, group = blobs(rng, 5 * np.eye(3, 6), [40, 40, 40], spread=0.1)
    logits = np.array([1.0, 0.5, 0.0]) + 0.05 * rng.normal(size=(120, 3))  # same uncertain prediction
    pool = Pool(ids(120), features, logits)
    for seed in range(10):
        selection = get_strategy("badge").select(pool, 3, seed=seed)
        assert sorted(group[selection.indices].tolist()) == [0, 1, 2], seed
    assert "largest gradient-embedding norm" in selection.reasons[0]


def test_subsampling_is_reported():
    rng = np.random.default_rng(1)
    pool = Pool(ids(50), rng.normal(size=(50, 4)), rng.normal(size=(50, 3)))
    selection = get_strategy("badge").select(pool, 5, seed=2, context=Context(params={"max_pool": 10}))
    assert all("subsampled to 10 of 50" in reason for reason in selection.reasons)


def test_confident_identical_items_still_give_distinct_picks():
    pool = Pool(ids(8), np.ones((8, 3)), np.tile([[50.0, 0.0]], (8, 1)))  # every D² is 0
    assert len(set(get_strategy("badge").select(pool, 6).indices.tolist())) == 6

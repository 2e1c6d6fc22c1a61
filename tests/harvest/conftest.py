"""Small synthetic pools for the harvest strategy tests (numpy only, built in milliseconds)."""

import numpy as np
import pytest

from oodguard.harvest import Context, Pool


def blobs(rng, centres, sizes, spread=0.05):
    """Points around the given centres; returns (features [N, D] float32, blob index [N])."""
    group = np.repeat(np.arange(len(centres)), sizes)
    features = np.asarray(centres, np.float32)[group] + spread * rng.normal(size=(len(group), len(centres[0])))
    return features.astype(np.float32), group


def ids(n):
    return np.array([f"r{i}" for i in range(n)])


@pytest.fixture
def mixed_pool():
    """60 items, D=8, 4 known classes + an "unknown" output (index 4), every score the queue holds."""
    rng = np.random.default_rng(0)
    n = 60
    features = rng.normal(size=(n, 8)).astype(np.float32)
    logits = rng.normal(size=(n, 5)).astype(np.float32) * 2
    scores = {name: rng.normal(size=n) for name in ("sisom", "sisome", "energy", "gradnorm", "msp")}
    context = Context(labeled_features=rng.normal(size=(20, 8)).astype(np.float32),
                      labeled_labels=rng.integers(0, 4, 20), known_classes=4, unknown_label=4,
                      id_scores={name: rng.normal(size=200) for name in scores})
    return Pool(ids(n), features, logits, scores), context

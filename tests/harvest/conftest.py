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
    """60 items, D=8, 4 known classes + an "unknown" output (index 4), every score the queue holds; a context with
    labeled knowns and labeled unknowns (the (K+1)-way head of lfosa, jsosal and open-quota is trained)."""
    rng = np.random.default_rng(0)
    n = 60
    features = rng.normal(size=(n, 8)).astype(np.float32)
    logits = rng.normal(size=(n, 5)).astype(np.float32) * 2
    scores = {name: rng.normal(size=n) for name in ("sisom", "sisome", "energy", "gradnorm", "msp", "knn")}
    context = Context(labeled_features=rng.normal(size=(20, 8)).astype(np.float32),
                      labeled_labels=rng.integers(0, 4, 20), unknown_features=rng.normal(size=(6, 8)).astype(np.float32),
                      known_classes=4, unknown_label=4,
                      id_scores={name: rng.normal(size=200) for name in scores})
    return Pool(ids(n), features, logits, scores), context


def high_logit_unknowns(rng, per_class=60):
    """The case MAV-only cannot handle: 3 known classes whose items have top logits ≈ 8, and as many unknowns
    the K-way model assigns to the same classes with *higher* top logits (≈ 12), as the unseen unknowns of the
    open-set benchmark did. In feature space (D = 6) the unknowns form their own cluster. Returns
    (pool, is_known [N], context with 5 labeled knowns per class and 6 labeled unknowns)."""
    rows, features, known = [], [], []
    for c in range(3):
        for is_known, mav in ((True, 8.0), (False, 12.0)):
            for value in rng.normal(mav, 0.5, per_class):
                z = rng.normal(0, 0.3, 3)
                z[c] = value
                z[(c + 1) % 3] = value - rng.uniform(1.0, 4.0)
                rows.append(z)
                centre = np.eye(6)[c] if is_known else np.eye(6)[3] + 0.3 * np.eye(6)[c]
                features.append(3.0 * centre + 0.3 * rng.normal(size=6))
                known.append(is_known)
    labeled = np.concatenate([3.0 * np.eye(6)[c] + 0.3 * rng.normal(size=(5, 6)) for c in range(3)])
    unknown = 3.0 * np.eye(6)[3] + 0.3 * rng.normal(size=(6, 6))
    context = Context(labeled_features=labeled, labeled_labels=np.repeat(np.arange(3), 5), unknown_features=unknown,
                      known_classes=3)
    return Pool(ids(len(rows)), np.array(features), np.array(rows)), np.array(known), context

import numpy as np
import pytest

from oodguard.export.bank import class_quota, probcover, reduce_bank


def _blobs(seed=0, per_class=(300, 100)):
    rng = np.random.default_rng(seed)
    parts, labels = [], []
    for cls, n in enumerate(per_class):
        centre = np.zeros(8)
        centre[cls] = 5.0
        parts.append(centre + rng.normal(0, 1, size=(n, 8)))
        labels.append(np.full(n, cls))
    return np.concatenate(parts), np.concatenate(labels)


@pytest.mark.parametrize("method", ["probcover", "random"])
def test_reduced_bank_water_fills_class_quotas(method):
    features, labels = _blobs(per_class=(300, 100, 12))
    bank = reduce_bank(features, labels, size=60, seed=0, method=method)
    assert len(bank) == 60 and len(np.unique(bank)) == 60
    # the small class is kept whole; the two large ones share the rest equally
    assert [int(np.sum(labels[bank] == c)) for c in range(3)] == [24, 24, 12]


def test_random_bank_differs_from_probcover_and_is_seeded():
    features, labels = _blobs()
    random_bank = reduce_bank(features, labels, 40, seed=3, method="random")
    np.testing.assert_array_equal(random_bank, reduce_bank(features, labels, 40, seed=3, method="random"))
    assert not np.array_equal(random_bank, reduce_bank(features, labels, 40, seed=3, method="probcover"))
    with pytest.raises(ValueError, match="bank method"):
        reduce_bank(features, labels, 40, method="kmeans")


def test_reduced_bank_is_seeded_and_full_size_returns_everything():
    features, labels = _blobs()
    np.testing.assert_array_equal(reduce_bank(features, labels, 40, seed=1), reduce_bank(features, labels, 40, seed=1))
    np.testing.assert_array_equal(reduce_bank(features, labels, 400), np.arange(400))


def test_probcover_covers_separate_clusters_before_repeating_one():
    """Three tight clusters of different sizes: three picks take one point of each cluster."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [50, 30, 20]
    points = np.concatenate([c + rng.normal(0, 0.1, size=(n, 2)) for c, n in zip(centres, sizes)])
    cluster = np.repeat([0, 1, 2], sizes)
    picks = probcover(points, 3, np.random.default_rng(0))
    assert sorted(cluster[picks].tolist()) == [0, 1, 2]


def test_quota_needs_two_per_class():
    with pytest.raises(ValueError, match="at least 2 per class"):
        class_quota(np.array([0, 0, 1, 1, 2, 2]), size=5)
    assert class_quota(np.array([0] * 98 + [1, 1]), size=10) == {0: 8, 1: 2}
    assert class_quota(np.array([0] * 50 + [1] * 40 + [2] * 3), size=20) == {0: 9, 1: 8, 2: 3}  # remainder: largest
    assert class_quota(np.array([0] * 5 + [1] * 3), size=100) == {0: 5, 1: 3}

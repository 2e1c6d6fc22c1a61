import numpy as np
import pytest
import torch

from oodguard.evaluation import VersionScorer
from oodguard.export.scores import FitData
from oodguard.export.scores.mahalanobis import RelativeMahalanobis


def _reference(features, labels, queries):
    """Ren et al.'s relative Mahalanobis distance with NumPy: min over classes of the shared-covariance distance,
    minus the distance under one Gaussian of all features."""
    features = np.asarray(features, np.float64)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    within = np.linalg.pinv(np.cov((features - means[np.searchsorted(classes, labels)]).T, bias=True))
    mu0 = features.mean(axis=0)
    background = np.linalg.pinv(np.cov(features.T, bias=True))
    d = queries[:, None, :] - means[None]
    to_classes = np.einsum("nkd,de,nke->nk", d, within, d).min(axis=1)
    d0 = queries - mu0
    return to_classes - np.einsum("nd,de,ne->n", d0, background, d0)


def _fit_data(features, labels):
    k = int(labels.max()) + 1
    return FitData(features.astype(np.float32), np.zeros((len(labels), k), np.float32), labels,
                   np.arange(len(labels)), np.zeros((k, features.shape[1]), np.float32), np.zeros(k, np.float32))


def test_rel_mahalanobis_matches_the_reference_formula_with_a_dead_unit():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    features = rng.normal(0, 1, (180, 5)) + rng.normal(0, 4, (3, 5))[labels]
    features[:, 4] = 0.0  # a dead ReLU unit: singular covariances, the pseudo-inverse ignores it
    queries = rng.normal(0, 3, (20, 5))
    queries[:, 4] = 0.0
    score = RelativeMahalanobis.fit(_fit_data(features, labels), {})
    out = score(torch.zeros(20, 3), torch.as_tensor(queries, dtype=torch.float32), {}).numpy()
    np.testing.assert_allclose(out, _reference(features, labels, queries), rtol=1e-3, atol=1e-2)


def test_rel_mahalanobis_ranks_an_unseen_class_above_the_known_ones():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 3, (4, 6))
    labels = np.repeat(np.arange(3), 100)
    features = centres[labels] + rng.normal(0, 1, (300, 6))
    known = centres[np.repeat(np.arange(3), 30)] + rng.normal(0, 1, (90, 6))
    unseen = centres[3] + rng.normal(0, 1, (90, 6))
    score = RelativeMahalanobis.fit(_fit_data(features, labels), {})
    run = lambda x: score(torch.zeros(len(x), 3), torch.as_tensor(x, dtype=torch.float32), {}).numpy()  # noqa: E731
    assert np.mean(run(unseen)[:, None] > run(known)[None, :]) > 0.95


def test_rel_mahalanobis_refuses_a_class_without_features():
    features = np.random.default_rng(2).normal(size=(20, 4))
    data = FitData(features.astype(np.float32), np.zeros((20, 3), np.float32), np.zeros(20, np.int64),
                   np.arange(20), np.zeros((3, 4), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"no training features for class\(es\) \[1, 2\]"):
        RelativeMahalanobis.fit(data, {})


def test_exported_rel_mahalanobis_matches_numpy_on_the_training_features(digits_export, scored):
    record, result, _, _ = digits_export
    outputs, _ = scored
    scorer = VersionScorer(result.version_dir)
    train = record.part(record.dataset(), "train")
    features = scorer.model.run(scorer.preprocessing.apply(train.images))["features"].astype(np.float64)
    expected = _reference(features, np.asarray(train.labels), outputs["features"].astype(np.float64))
    np.testing.assert_allclose(outputs["rel_mahalanobis"], expected, rtol=2e-3, atol=0.05 * np.std(expected))

"""Fixtures for the score tests: the exported digits model's ONNX outputs on held-out ID data and noise,
plus the fitted score modules (the stored state the graph was built from)."""

import numpy as np
import pytest

from oodguard.evaluation import VersionScorer, uniform_noise
from oodguard.export.backbones import load_classifier


def _score(export):
    """The export's ONNX outputs on its test split followed by 64 noise images, and the test split's size."""
    record, result, repository, checkpoint = export
    scorer = VersionScorer(result.version_dir)
    test_part = record.part(record.dataset(), "test")
    images = np.concatenate([
        scorer.preprocessing.apply(test_part.images),
        scorer.preprocessing.apply(uniform_noise(64, (8, 8), seed=1).images),
    ])
    return scorer.model.run(images), len(test_part)


@pytest.fixture(scope="session")
def scored(digits_export):
    return _score(digits_export)


@pytest.fixture(scope="session")
def scored_ml(digits_export_ml):
    """As ``scored``, for the export with the multi-layer scores (``--multi-layer``)."""
    return _score(digits_export_ml)


@pytest.fixture(scope="session")
def head(digits_export):
    record, result, repository, checkpoint = digits_export
    classifier = load_classifier(record.backbone, checkpoint)
    return classifier.head.weight.detach().numpy().astype(np.float64), classifier.head.bias.detach().numpy()


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def unit(x):
    """Rows scaled to unit length, float64 (the kNN scores' reference normalisation)."""
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


import numpy as np
import torch

from oodguard.export.scores.cluster import Cluster

from oodguard.evaluation import VersionScorer


def test_cluster_is_one_minus_cosine_to_nearest_class_mean(digits_export, scored):
    record, result, _, _ = digits_export
    outputs, _ = scored
    scorer = VersionScorer(result.version_dir)
    train = record.part(record.dataset(), "train")
    features = scorer.model.run(scorer.preprocessing.apply(train.images))["features"].astype(np.float64)
    means = np.stack([features[train.labels == c].mean(axis=0) for c in range(8)])
    h = outputs["features"].astype(np.float64)
    cos = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    np.testing.assert_allclose(outputs["cluster"], 1.0 - cos.max(axis=1), atol=1e-5)


def test_cluster_uses_the_nearest_centre_not_the_predicted_or_true_class():
    """Scoring against a given class would leak labels; the score is the distance to the nearest centre."""
    centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    score = Cluster(centres)
    features = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # disagree with the nearest centre
    out = score(logits, features, {}).numpy()
    np.testing.assert_allclose(out, [0.0, 1.0 - np.sqrt(0.5)], atol=1e-6)

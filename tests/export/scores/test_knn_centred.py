import numpy as np
import torch

from oodguard.evaluation import VersionScorer
from oodguard.export.scores import FitData
from oodguard.export.scores.knn import NEW_CLASS_K, Knn, KnnCentred

from .conftest import unit


def test_knn_centred_is_distance_to_kth_nearest_centred_training_feature(digits_export, scored):
    """The exported graph's output against NumPy: the bank mean subtracted from bank and query, then kNN."""
    record, result, _, _ = digits_export
    outputs, _ = scored
    scorer = VersionScorer(result.version_dir)
    train = record.part(record.dataset(), "train")
    features = scorer.model.run(scorer.preprocessing.apply(train.images))["features"].astype(np.float64)
    centre = features.mean(axis=0)
    k = result.calibration.model["score_params"]["knn_centred"]["k"]
    query = unit(outputs["features"].astype(np.float64) - centre)
    distances = np.sqrt(np.maximum(2.0 - 2.0 * query @ unit(features - centre).T, 0.0))
    np.testing.assert_allclose(outputs["knn_centred"], np.sort(distances, axis=1)[:, k - 1], atol=2e-4)


def test_centring_subtracts_the_bank_mean_and_plain_knn_does_not():
    """Features along one shared direction plus a class-specific one: centred, a query's distance is the
    angle between class-specific parts only (a shift of the whole bank changes nothing); plain, it is not."""
    rng = np.random.default_rng(0)
    bank = rng.normal(0, 1, (200, 6))
    query = rng.normal(0, 1, (30, 6))
    shift = np.array([5.0, -3.0, 8.0, 0.0, 1.0, 2.0])
    z = torch.zeros(len(query), 2)

    def run(cls, b, q):
        return cls(b, k=3)(z, torch.as_tensor(q, dtype=torch.float32), {}).numpy()

    np.testing.assert_allclose(run(KnnCentred, bank + shift, query + shift), run(KnnCentred, bank, query), atol=1e-4)
    assert not np.allclose(run(Knn, bank + shift, query + shift), run(Knn, bank, query), atol=1e-2)
    np.testing.assert_allclose(KnnCentred(bank, k=3).centre.numpy(), bank.mean(axis=0), atol=1e-6)
    assert not Knn(bank, k=3).centre.numpy().any()
    assert KnnCentred(bank, k=3).metadata()["centred"]


def test_knn_centred_takes_the_nearest_neighbour_unless_k_is_given():
    """The validation search is not run: on class holdouts k = 1 separates unseen classes best."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 40)
    features = (rng.normal(0, 3, (3, 5))[labels] + rng.normal(0, 1, (120, 5))).astype(np.float32)
    ood = rng.normal(0, 3, (40, 5)).astype(np.float32)
    weight = np.eye(3, 5, dtype=np.float32)
    data = FitData(features, features @ weight.T, labels, np.arange(120), weight, np.zeros(3, np.float32), ood,
                   ood @ weight.T, 0, np.array(["near"] * 20 + ["far"] * 20, dtype=object))
    default = KnnCentred.fit(data, {})
    assert default.k == NEW_CLASS_K == 1 and default.search["procedure"] == "new-class default"
    assert Knn.fit(data, {}).search["procedure"] == "validation-auroc"  # plain kNN still searches
    assert KnnCentred.fit(data, {}, k=5).k == 5

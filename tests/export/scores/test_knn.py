import numpy as np
import onnx
from onnx import numpy_helper

from oodguard.evaluation import VersionScorer
from oodguard.export.scores import FitData
from oodguard.export.scores.knn import K_GRID, Knn
from oodguard.export.validation import objective

from .conftest import unit


def test_knn_is_distance_to_kth_nearest_normalised_training_feature(digits_export, scored):
    record, result, _, _ = digits_export
    outputs, _ = scored
    scorer = VersionScorer(result.version_dir)
    train = record.part(record.dataset(), "train")
    bank = unit(scorer.model.run(scorer.preprocessing.apply(train.images))["features"])
    params = result.calibration.model["score_params"]["knn"]
    k = params["k"]
    assert k in K_GRID and params["bank_size"] == len(train) and params["k_search"]["procedure"] == "validation-auroc"

    distances = np.sqrt(np.maximum(2.0 - 2.0 * unit(outputs["features"]) @ bank.T, 0.0))
    expected = np.sort(distances, axis=1)[:, k - 1]
    np.testing.assert_allclose(outputs["knn"], expected, atol=2e-4)


def test_stored_knn_bank_is_the_normalised_training_features(digits_export):
    record, result, _, _ = digits_export
    scorer = VersionScorer(result.version_dir)
    train = record.part(record.dataset(), "train")
    features = scorer.model.run(scorer.preprocessing.apply(train.images))["features"]
    graph = onnx.load(str(result.version_dir / "model.onnx")).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}["scores.knn.bank_t"]
    np.testing.assert_allclose(stored.T, unit(features), atol=1e-5)


def _fit_data(per_class=(40, 40, 6), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(per_class)), per_class)
    centres = rng.normal(0, 3, size=(len(per_class), 5))
    features = (centres[labels] + rng.normal(0, 1, size=(len(labels), 5))).astype(np.float32)
    ood = rng.normal(0, 3, size=(40, 5)).astype(np.float32)
    groups = np.array(["near"] * 20 + ["far"] * 20, dtype=object)
    weight = np.eye(len(per_class), 5, dtype=np.float32)
    return FitData(features, features @ weight.T, labels, np.arange(len(labels)), weight,
                   np.zeros(len(per_class), np.float32), ood, ood @ weight.T, 0, groups)


def test_k_search_picks_the_k_with_the_best_worst_group_auroc():
    data = _fit_data(per_class=(40, 40, 40))
    score = Knn.fit(data, {})
    search = score.metadata()["k_search"]
    assert search["grid"] == [1, 2, 5, 10, 20] and search["k_max"] == 20  # half the smallest class
    bank = unit(data.features)
    distances = np.sqrt(np.maximum(2.0 - 2.0 * bank @ bank.T, 0.0))
    ood = np.sqrt(np.maximum(2.0 - 2.0 * unit(data.validation_ood_features) @ bank.T, 0.0))
    worst = []
    for k in search["grid"]:  # leave-one-out: the k-th neighbour after the sample itself
        result = objective(np.sort(distances, axis=1)[:, k], np.sort(ood, axis=1)[:, k - 1], data.groups)
        worst.append(result["worst"])
    np.testing.assert_allclose(search["objective"], worst, atol=1e-9)
    assert score.k == search["grid"][int(np.argmax(worst))]


def test_k_is_at_most_half_the_smallest_class():
    data = _fit_data(per_class=(40, 40, 6))
    assert Knn.fit(data, {}).k <= 3 and Knn.fit(data, {}, k=50).k == 3
    assert Knn.fit(data, {}, k=2).k == 2
    no_validation = FitData(data.features, data.logits, data.labels, data.bank, data.head_weight, data.head_bias)
    assert Knn.fit(no_validation, {}).metadata()["k_search"]["procedure"] == "default"

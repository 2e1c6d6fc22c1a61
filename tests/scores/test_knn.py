import numpy as np
import onnx
from onnx import numpy_helper

from oodguard.evaluation import VersionScorer


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_is_distance_to_kth_nearest_normalised_training_feature(digits_export, scored):
    record, result, _, _ = digits_export
    outputs, _ = scored
    scorer = VersionScorer(result.version_dir)
    train = record.part(record.dataset(), "train")
    bank = _unit(scorer.model.run(scorer.preprocessing.apply(train.images))["features"])
    k = result.calibration.model["score_params"]["knn"]["k"]
    assert k == 50 and result.calibration.model["score_params"]["knn"]["bank_size"] == len(train)

    distances = np.sqrt(np.maximum(2.0 - 2.0 * _unit(outputs["features"]) @ bank.T, 0.0))
    expected = np.sort(distances, axis=1)[:, k - 1]
    np.testing.assert_allclose(outputs["knn"], expected, atol=2e-4)


def test_stored_knn_bank_is_the_normalised_training_features(digits_export):
    record, result, _, _ = digits_export
    scorer = VersionScorer(result.version_dir)
    train = record.part(record.dataset(), "train")
    features = scorer.model.run(scorer.preprocessing.apply(train.images))["features"]
    graph = onnx.load(str(result.version_dir / "model.onnx")).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}["scores.knn.bank_t"]
    np.testing.assert_allclose(stored.T, _unit(features), atol=1e-5)

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from oodguard.evaluation import VersionScorer
from oodguard.export.scores import FitData
from oodguard.export.scores.sisom import ALPHA_GRID, Sisom, bank_geometry, choose_alpha, ratios

from .conftest import softmax


def _enriched(h, z, weight, alpha):
    """Independent restatement of the note: sigmoid(alpha * h * W^T(softmax(z) - 1/K)) - 0.5."""
    g = (softmax(z) - 1.0 / z.shape[1]) @ weight
    return 1.0 / (1.0 + np.exp(-alpha * np.asarray(h, np.float64) * g)) - 0.5


def _pairwise(a, b):
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2), 0.0))


def test_sisom_matches_an_independent_numpy_computation(digits_export, scored):
    record, result, _, _ = digits_export
    outputs, _ = scored
    scorer = VersionScorer(result.version_dir)
    train = record.part(record.dataset(), "train")
    bank_out = scorer.model.run(scorer.preprocessing.apply(train.images))
    graph = onnx.load(str(result.version_dir / "model.onnx")).graph
    weight = {i.name: numpy_helper.to_array(i) for i in graph.initializer}["classifier.head.weight"].astype(np.float64)
    alpha = result.calibration.model["score_params"]["sisom"]["alpha"]

    bank = _enriched(bank_out["features"], bank_out["logits"], weight, alpha)
    bank_dist = _pairwise(bank, bank)
    d_out = np.where(train.labels[None, :] != train.labels[:, None], bank_dist, np.inf).min(axis=1)
    query = _enriched(outputs["features"], outputs["logits"], weight, alpha)
    predicted = outputs["logits"].argmax(axis=1)
    dist = np.where(train.labels[None, :] == predicted[:, None], _pairwise(query, bank), np.inf)
    anchor = dist.argmin(axis=1)
    expected = dist[np.arange(len(anchor)), anchor] / d_out[anchor]
    np.testing.assert_allclose(outputs["sisom"], expected, rtol=1e-4, atol=1e-6)

    # r_avg in calibration.json: leave-one-out ratios of the bank, with each sample's predicted class.
    bank_pred = bank_out["logits"].argmax(axis=1)
    loo = np.where(train.labels[None, :] == bank_pred[:, None], bank_dist, np.inf)
    np.fill_diagonal(loo, np.inf)
    loo_anchor = loo.argmin(axis=1)
    loo_r = loo[np.arange(len(loo)), loo_anchor] / d_out[loo_anchor]
    assert result.calibration.model["score_params"]["sisom"]["r_avg"] == pytest.approx(loo_r.mean(), rel=1e-4)


def test_d_out_is_measured_from_the_anchor_not_from_the_input():
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    labels = np.array([0, 0, 1])
    d_out, loo_r = bank_geometry(bank, labels, predicted=labels)
    np.testing.assert_allclose(d_out, [3.0, np.sqrt(10.0), 3.0])
    np.testing.assert_allclose(loo_r[:2], [1.0 / np.sqrt(10.0), 1.0 / 3.0])  # anchors swap: d_out of the other
    r = ratios(np.array([[2.0, 0.0]]), np.array([0]), bank, labels, d_out)
    np.testing.assert_allclose(r, [1.0 / np.sqrt(10.0)])  # from x it would be 1 / sqrt(13)


def _synthetic_fit_data(alpha_ood=True, seed=0):
    rng = np.random.default_rng(seed)
    k, d, n = 3, 6, 90
    labels = np.repeat(np.arange(k), n // k)
    centres = rng.normal(0, 3, size=(k, d))
    features = np.abs(centres[labels] + rng.normal(0, 0.5, size=(n, d))).astype(np.float32)
    weight = rng.normal(0, 1, size=(k, d)).astype(np.float32)
    bias = np.zeros(k, np.float32)
    logits = features @ weight.T
    ood = np.abs(rng.normal(0, 3, size=(30, d))).astype(np.float32) if alpha_ood else np.zeros((0, d), np.float32)
    return FitData(features, logits, labels, np.arange(n), weight, bias, ood, ood @ weight.T, seed)


def test_head_is_exact_at_the_smallest_alpha():
    """At alpha = 1e-3 every sigmoid is ~0.5; distances must not cancel to 0 (r would vanish)."""
    data = _synthetic_fit_data()
    score = Sisom.fit(data, {}, alpha=ALPHA_GRID[0])
    query_h = data.validation_ood_features
    query_z = data.validation_ood_logits
    out = score(torch.as_tensor(query_z), torch.as_tensor(query_h), {}).numpy()
    bank = _enriched(data.features, data.logits, data.head_weight.astype(np.float64), ALPHA_GRID[0])
    d_out = np.where(data.labels[None, :] != data.labels[:, None], _pairwise(bank, bank), np.inf).min(axis=1)
    query = _enriched(query_h, query_z, data.head_weight.astype(np.float64), ALPHA_GRID[0])
    dist = np.where(data.labels[None, :] == query_z.argmax(axis=1)[:, None], _pairwise(query, bank), np.inf)
    anchor = dist.argmin(axis=1)
    np.testing.assert_allclose(out, dist[np.arange(len(anchor)), anchor] / d_out[anchor], rtol=1e-4)
    assert out.std() > 0 and out.min() > 0


def test_alpha_search_maximises_validation_auroc_and_records_it():
    data = _synthetic_fit_data()
    alpha, record = choose_alpha(data, search_size=5000)
    assert record["procedure"] == "validation-auroc"
    assert len(record["objective"]) == len(ALPHA_GRID)
    assert alpha == ALPHA_GRID[int(np.argmax(record["objective"]))]
    assert record["objective"][ALPHA_GRID.index(alpha)] == max(record["objective"])


def test_alpha_search_without_validation_ood_minimises_r_avg():
    data = _synthetic_fit_data(alpha_ood=False)
    alpha, record = choose_alpha(data, search_size=5000)
    assert record["procedure"] == "min-r_avg"
    r_avgs = []
    for a in ALPHA_GRID:
        fitted = Sisom.fit(data, {}, alpha=a)
        r_avgs.append(fitted.metadata()["r_avg"])
    assert alpha == ALPHA_GRID[int(np.argmin(r_avgs))]


def test_bank_needs_two_samples_per_class():
    data = _synthetic_fit_data()
    lonely = FitData(data.features, data.logits, data.labels, np.r_[np.arange(60), 60], data.head_weight, data.head_bias)
    with pytest.raises(ValueError, match="at least 2 samples of every class"):
        Sisom.fit(lonely, {}, alpha=1.0)

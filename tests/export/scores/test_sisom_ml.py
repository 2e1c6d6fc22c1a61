import logging

import numpy as np
import pytest
import torch

from oodguard.evaluation import VersionScorer, uniform_noise
from oodguard.export.backbones import load_classifier
from oodguard.export.scores import FitData
from oodguard.export.scores.sisom import Sisom, bank_geometry, ratios
from oodguard.export.scores.sisom_ml import RELATIVE_GRID, SisomMl, choose_alphas
from oodguard.export import validation
from layer_reference import autograd_reference

from .conftest import softmax


def _sigmoid_enriched(layer_data, alphas):
    """Independent restatement: concatenated sigmoid(alpha_j * a_j * g_j) - 0.5, in float64."""
    return np.concatenate([1.0 / (1.0 + np.exp(-alphas[name] * np.asarray(a, np.float64) * np.asarray(g, np.float64))) - 0.5
                           for name, (a, g) in layer_data.items()], axis=1)


def _pairwise(a, b):
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2), 0.0))


def _reference_ratios(query, predicted, bank, labels):
    bank_dist = _pairwise(bank, bank)
    d_out = np.where(labels[None, :] != labels[:, None], bank_dist, np.inf).min(axis=1)
    dist = np.where(labels[None, :] == predicted[:, None], _pairwise(query, bank), np.inf)
    anchor = dist.argmin(axis=1)
    return dist[np.arange(len(anchor)), anchor] / d_out[anchor]


def _autograd_layers(classifier, images):
    parts = [autograd_reference(classifier, torch.as_tensor(images[i:i + 128])) for i in range(0, len(images), 128)]
    return {name: tuple(np.concatenate([p[name][k].numpy() for p in parts]) for k in range(2)) for name in parts[0]}


def test_sisom_ml_matches_an_independent_computation_with_autograd_gradients(digits_export_ml, scored_ml):
    record, result, _, checkpoint = digits_export_ml
    outputs, _ = scored_ml
    meta = result.calibration.model["score_params"]["sisom_ml"]
    assert meta["layers"] == ["conv1", "conv2", "fc1", "penultimate"]
    assert meta["dims"] == {"conv1": 6, "conv2": 16, "fc1": 120, "penultimate": 84}
    search = meta["alpha_search"]
    assert search["procedure"] == "validation-auroc"
    for name in meta["layers"]:
        assert search["relative_alpha"][name] in RELATIVE_GRID
        assert meta["alpha"][name] == pytest.approx(search["relative_alpha"][name] / search["scale"][name])

    classifier = load_classifier(record.backbone, checkpoint)
    scorer = VersionScorer(result.version_dir)
    train = record.part(record.dataset(), "train")
    bank = _sigmoid_enriched(_autograd_layers(classifier, scorer.preprocessing.apply(train.images)), meta["alpha"])
    test_part = record.part(record.dataset(), "test")
    images = np.concatenate([scorer.preprocessing.apply(test_part.images),
                             scorer.preprocessing.apply(uniform_noise(64, (8, 8), seed=1).images)])
    query = _sigmoid_enriched(_autograd_layers(classifier, images), meta["alpha"])
    expected = _reference_ratios(query, outputs["logits"].argmax(axis=1), bank, train.labels)
    np.testing.assert_allclose(outputs["sisom_ml"], expected, rtol=1e-3, atol=1e-5)
    assert np.median(np.abs(outputs["sisom_ml"] - expected) / expected) < 1e-4


def _layered_fit_data(with_ood=True, seed=0):
    """Two layers of very different scales: an early one (a*g ~ 1e-8) that separates the classes and the
    penultimate; validation OOD sits between the class clusters."""
    rng = np.random.default_rng(seed)
    k, n = 3, 90
    labels = np.repeat(np.arange(k), n // k)
    centres = rng.normal(0, 3, size=(k, 4))
    early_a = np.abs(centres[labels] + rng.normal(0, 0.3, size=(n, 4)))
    early_g = np.full((n, 4), 1e-8) * (1 + 0.1 * rng.normal(size=(n, 4)))
    features = np.abs(rng.normal(0, 1, size=(n, 6)) + labels[:, None]).astype(np.float32)
    weight = rng.normal(0, 1, size=(k, 6)).astype(np.float32)
    logits = features @ weight.T
    pen_g = (softmax(logits) - 1.0 / k) @ weight
    layers = {"early": (early_a.astype(np.float32), early_g.astype(np.float32)),
              "penultimate": (features, pen_g.astype(np.float32))}
    m = 30 if with_ood else 0
    ood_a = np.abs(rng.normal(0, 3, size=(m, 4)))
    ood_features = np.abs(rng.normal(0, 1.5, size=(m, 6))).astype(np.float32)
    ood_logits = ood_features @ weight.T
    ood_layers = {"early": (ood_a.astype(np.float32), np.full((m, 4), 1e-8, np.float32)),
                  "penultimate": (ood_features, ((softmax(ood_logits) - 1.0 / k) @ weight).astype(np.float32))}
    groups = np.array(["near", "far"] * (m // 2), dtype=object)
    return FitData(features, logits, labels, np.arange(n), weight, np.zeros(k, np.float32), ood_features, ood_logits,
                   seed, groups, layers=layers, validation_ood_layers=ood_layers)


def _forward(score, data, rows_layers, logits):
    tensors = {name: (torch.as_tensor(a), torch.as_tensor(g)) for name, (a, g) in rows_layers.items()}
    return score(torch.as_tensor(logits), None, {}, tensors).numpy()


def test_head_is_exact_at_the_smallest_steepness():
    """At the smallest relative steepness (c = 0.01) every sigmoid is within ~0.01 of 0.5: distances on
    ``s - 0.5`` in the tanh form lose nothing (measured: 1.2e-7 relative), where a float32 ``sigmoid - 0.5``
    cancels to 7e-6 relative, which the tolerance refuses."""
    data = _layered_fit_data()
    score = SisomMl.fit(data, {}, relative_alpha=RELATIVE_GRID[0])
    assert score.metadata()["alpha_search"]["procedure"] == "fixed"
    alphas = score.metadata()["alpha"]
    assert alphas["early"] > 1e5  # relative to the early layer's tiny scale (a * g ~ 2e-8)
    out = _forward(score, data, data.validation_ood_layers, data.validation_ood_logits)
    bank = _sigmoid_enriched(data.layers, alphas)
    query = _sigmoid_enriched(data.validation_ood_layers, alphas)
    expected = _reference_ratios(query, data.validation_ood_logits.argmax(axis=1), bank, data.labels)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.std() > 0 and out.min() > 0


def test_steepness_search_records_its_candidates_and_its_objective_is_what_it_claims():
    data = _layered_fit_data()
    alphas, record = choose_alphas(data, data.layers, search_size=5000, sweeps=3)
    assert record["procedure"] == "validation-auroc" and list(alphas) == ["early", "penultimate"]
    assert set(record["alone"]) == {"early", "penultimate"}
    assert all(len(v) == len(RELATIVE_GRID) for v in record["alone"].values())
    assert record["objective"] >= record["start"]
    assert record["sweeps"] and all(len(s["objective"]) == len(RELATIVE_GRID) for s in record["sweeps"])
    assert record["objective"] == pytest.approx(max(max(s["objective"]) for s in record["sweeps"]))
    # the recorded objective is the worst-group AUROC of the chosen steepness, recomputed with SISOM's code
    bank = _sigmoid_enriched(data.layers, alphas)
    labels, predicted = data.labels.astype(np.int64), data.logits.argmax(axis=1)
    d_out, loo_r = bank_geometry(bank, labels, predicted)
    ood_r = ratios(_sigmoid_enriched(data.validation_ood_layers, alphas), data.validation_ood_logits.argmax(axis=1),
                   bank, labels, d_out)
    assert validation.objective(loo_r, ood_r, data.groups)["worst"] == pytest.approx(record["objective"], abs=1e-9)


def test_steepness_search_without_validation_ood_minimises_r_avg():
    data = _layered_fit_data(with_ood=False)
    score = SisomMl.fit(data, {})
    search = score.metadata()["alpha_search"]
    assert search["procedure"] == "min-r_avg"
    assert score.metadata()["r_avg"] == pytest.approx(-search["objective"])
    for c in RELATIVE_GRID:  # no uniform steepness has a smaller r_avg than the search's result
        assert SisomMl.fit(data, {}, relative_alpha=c).metadata()["r_avg"] >= score.metadata()["r_avg"] - 1e-12


def test_without_layers_it_is_penultimate_sisom_and_the_log_says_so(caplog):
    layered = _layered_fit_data()
    data = FitData(layered.features, layered.logits, layered.labels, layered.bank, layered.head_weight,
                   layered.head_bias, layered.validation_ood_features, layered.validation_ood_logits, 0,
                   layered.validation_ood_groups)
    with caplog.at_level(logging.INFO, logger="oodguard.export.scores.sisom_ml"):
        score = SisomMl.fit(data, {}, relative_alpha=1.0)
    assert "penultimate layer only" in caplog.text
    assert score.layer_names == ("penultimate",) and score.metadata()["layers"] == ["penultimate"]
    alpha = score.metadata()["alpha"]["penultimate"]
    sisom = Sisom.fit(data, {}, alpha=alpha)
    features, logits = torch.as_tensor(data.validation_ood_features), torch.as_tensor(data.validation_ood_logits)
    grad = (torch.softmax(logits, 1) - 1 / 3) @ torch.as_tensor(data.head_weight)
    out = score(logits, features, {}, {"penultimate": (features, grad)}).numpy()
    np.testing.assert_allclose(out, sisom(logits, features, {}).numpy(), rtol=1e-5)


def test_bank_needs_two_samples_per_class():
    data = _layered_fit_data()
    lonely = FitData(data.features, data.logits, data.labels, np.r_[np.arange(60), 60], data.head_weight,
                     data.head_bias, layers=data.layers)
    with pytest.raises(ValueError, match="at least 2 samples of every class"):
        SisomMl.fit(lonely, {}, relative_alpha=1.0)


def test_blocked_bank_ratio_equals_the_float64_reference_with_unequal_classes_and_near_ties():
    """The class-blocked float32 search with float64 re-measurement (BlockedBankRatio) gives SISOM's float64
    ratios: classes of 2, 9 and 30 samples (padded blocks), duplicated bank rows (exact ties) and queries at
    a bank row (distance 0) or a hair away from one."""
    from oodguard.export.scores.sisom_ml import BlockedBankRatio

    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2], [2, 9, 30])
    bank = np.tanh(rng.normal(size=(41, 12)) + labels[:, None]) / 2.0
    bank[5] = bank[6]  # an exact tie inside class 1
    d_out, _ = bank_geometry(bank, labels, labels)
    score = BlockedBankRatio()
    score.register_bank(bank, labels, d_out)
    query = np.concatenate([np.tanh(rng.normal(size=(20, 12)) + rng.integers(0, 3, size=(20, 1))) / 2.0,
                            bank[[0, 6, 40]], bank[[3, 20]] + 1e-6])
    predicted = np.concatenate([rng.integers(0, 3, size=20), labels[[0, 6, 40]], labels[[3, 20]]])
    logits = np.eye(3)[predicted] * 5.0
    with torch.no_grad():
        out = score.ratio(torch.as_tensor(query, dtype=torch.float32), torch.as_tensor(logits, dtype=torch.float32)).numpy()
    expected = ratios(query.astype(np.float32).astype(np.float64), predicted, bank, labels, d_out)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert score.candidates == 2 and score.bank.shape == (3 * 30, 12)  # at most the smallest class's count

import hashlib
import re

import numpy as np
import pytest
from scipy.stats import betabinom

from oodguard.calibration import Calibration, CalibrationError
from oodguard.evaluation import VersionScorer
from oodguard.export.backbones import CheckpointError
from oodguard.export.fitting import split_calibration
from oodguard.export.pipeline import export_model
from oodguard.export.spec import spec_from_training
from oodguard.export.scores import MULTI_LAYER, SCORES, registry
from oodguard.export.scores.pvalue_fusion import NEW_CLASS_RULE
from oodguard.repository import versions
from oodguard.validate_repo import validate_repository


def quiet(line):
    pass


def test_calibration_file_records_thresholds_and_model_metadata(digits_export):
    record, result, _, checkpoint = digits_export
    model = result.calibration.model
    assert model["class_names"] == [str(c) for c in range(8)]
    assert model["input"] == {"name": "input", "shape": [1, 28, 28], "dtype": "float32"}
    assert model["preprocessing"]["height"] == 28 and len(model["preprocessing"]["mean"]) == 1
    # the default export: every score but the opt-in multi-layer ones
    assert model["scores"] == [*registry(), "fused"] and not set(MULTI_LAYER) & set(model["scores"])
    assert model["multi_layer"] is False and "multi_layer_bank" not in model
    assert model["outputs"] == ["logits", "features", *model["scores"]]
    assert model["bank_size"] == len(record.splits["train"]) and model["bank_method"] == "full"
    assert model["score_params"]["sisom"]["alpha"] > 0 and model["score_params"]["sisom"]["r_avg"] > 0
    assert {"mu_r", "sd_r", "mu_E", "sd_E", "r_avg"} <= set(model["score_params"]["sisome"])
    assert model["score_params"]["sisom"]["layers"] == ["penultimate"]
    assert model["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert model["exported_at"] and model["oodguard_version"] and model["version"] == 1
    assert model["test_accuracy"] == record.test_accuracy and model["test_accuracy"]["overall"] > 0.9
    n_cal = len(record.splits["calibration"])
    split = result.calibration.data["fused_split"]
    assert split["references"] + split["threshold"] == n_cal and abs(split["references"] - split["threshold"]) <= 8
    for name, threshold in result.calibration.thresholds.items():
        assert threshold.n == (split["threshold"] if name == "fused" else n_cal) and threshold.target_tpr == 0.95
        assert threshold.achieved_tpr >= 0.95
        low, high = threshold.achieved_tpr_ci95
        assert low < threshold.achieved_tpr < high


def test_multi_layer_export_adds_the_multi_layer_scores_and_records_it(digits_export_ml):
    record, result, repository, _ = digits_export_ml
    model = result.calibration.model
    assert model["scores"] == [*SCORES, "fused"] and model["multi_layer"] is True
    assert model["outputs"] == ["logits", "features", *model["scores"]]
    multi = model["score_params"]["sisom_ml"]
    assert multi["layers"] == ["conv1", "conv2", "fc1", "penultimate"] and set(multi["alpha"]) == set(multi["layers"])
    assert multi["alpha_search"]["validation_ood_size"] > 0 and multi["r_avg"] > 0
    # the training split is under the default limit: the multi-layer scores use the export's bank
    assert model["multi_layer_bank"] == {"size": len(record.splits["train"]), "limit": 5000, "method": "export bank"}
    assert multi["bank_size"] == model["bank_size"]
    assert set(result.calibration.thresholds) == set(model["scores"])
    assert validate_repository(repository) == []


def test_the_multi_layer_scores_get_a_bank_of_their_own_within_the_limit(digits_export, tmp_path):
    record, _, _, checkpoint = digits_export
    result = export_model(spec_from_training(checkpoint, tmp_path, "digits", multi_layer=True, multi_layer_bank_size=120,
                                             bank_size=300), progress=quiet)
    model = result.calibration.model
    assert model["bank_size"] == 300 and model["score_params"]["sisom"]["bank_size"] == 300
    assert model["score_params"]["sisom_ml"]["bank_size"] == 120
    assert model["multi_layer_bank"] == {"size": 120, "limit": 120,
                                         "method": "class-stratified random draw from the export bank"}
    assert set(model["bank_comparison"]["random"]) == {"sisom", "sisome", "sisom_ml", "sisome_ml", "knn", "knn_centred"}
    labels = result.model.scores["sisom_ml"].bank_labels.numpy()
    assert np.bincount(labels).tolist() == [15] * 8  # water-filled class quotas


def test_multi_layer_parameters_without_multi_layer_are_refused(digits_export, tmp_path):
    _, _, _, checkpoint = digits_export
    spec = spec_from_training(checkpoint, tmp_path, "digits", score_params={"sisom_ml": {"relative_alpha": 1.0}})
    with pytest.raises(ValueError, match="only an export with multi_layer"):
        export_model(spec, progress=quiet)


def test_thresholds_come_from_the_onnx_model_on_the_calibration_split(digits_export):
    record, result, _, _ = digits_export
    scorer = VersionScorer(result.version_dir)
    calibration = record.part(record.dataset(), "calibration")
    scored = scorer.score("calibration", calibration)
    _, held = split_calibration(len(calibration), calibration.labels, 0.95, record.seed)
    for name, threshold in scorer.calibration.thresholds.items():
        values = np.sort(scored.scores[name][held] if name == "fused" else scored.scores[name])
        np.testing.assert_allclose(threshold.sorted_scores, values, rtol=1e-6)
        k = int(np.ceil(0.95 * (threshold.n + 1)))
        assert threshold.threshold == pytest.approx(values[k - 1], rel=1e-6)


def test_fused_references_are_one_half_of_the_calibration_split_and_its_choice_is_recorded(digits_export):
    """The fused score's p-values are referenced to one half (per class) of the calibration split, its
    threshold comes from the other half; the decision and its validation figures are recorded."""
    record, result, _, _ = digits_export
    calibration = record.part(record.dataset(), "calibration")
    references, held = split_calibration(len(calibration), calibration.labels, 0.95, record.seed)
    assert not set(references) & set(held) and len(references) + len(held) == len(calibration)
    for c in np.unique(calibration.labels):  # both halves hold every class
        assert abs(np.sum(calibration.labels[references] == c) - np.sum(calibration.labels[held] == c)) <= 1
    fused = result.model.scores["fused"]
    scorer = VersionScorer(result.version_dir)
    scored = scorer.score("calibration", calibration)
    for j, name in enumerate(fused.components):
        # the references are the PyTorch module's scores (ONNX Runtime parity: 1e-4)
        np.testing.assert_allclose(getattr(fused, f"references_{j}").numpy(), np.sort(scored.scores[name][references]),
                                   rtol=1e-4, atol=1e-5)
    meta = result.calibration.model["score_params"]["fused"]
    selection = meta["selection"]
    assert meta["components"] == selection["chosen"]["components"] and meta["references_n"] == len(references)
    assert selection["validation_groups"] == {"far": 289, "near": 577}
    # the default decision is the new-class rule; its validation figures stand beside every single score's
    assert set(meta["components"]) == set(NEW_CLASS_RULE[0]) and meta["combination"] == NEW_CLASS_RULE[1]
    assert "new-class rule" in selection["procedure"] and selection["chosen"]["error_ratio"] > 0
    assert set(selection["single_scores"]) == set(result.model.scores) - {"fused"}
    assert result.calibration.model["validation_ood"] == {"groups": {"far": 289, "near": 577}, "specs": []}


def test_a_calibration_split_too_small_to_halve_gives_a_version_without_fused(digits_export, tmp_path):
    _, _, _, checkpoint = digits_export
    spec = spec_from_training(checkpoint, tmp_path, "digits")
    spec.calibration_data = spec.calibration_data.take(np.arange(30))  # >= 19 for a threshold, < 2 x 19
    lines: list[str] = []
    result = export_model(spec, progress=lines.append)
    assert "fused" not in result.calibration.model["scores"] and "fused_split" not in result.calibration.data
    assert any("too few to split for the fused score" in line for line in lines)
    assert all(t.n == 30 for t in result.calibration.thresholds.values())


def test_validation_ood_sets_are_a_group_of_their_own_and_fixed_fusions_are_kept(digits_export, tmp_path):
    _, _, _, checkpoint = digits_export
    spec = spec_from_training(checkpoint, tmp_path, "digits", validation_ood_specs=["synthetic:blobs:50"],
                              score_params={"fused": {"components": ("energy", "knn"), "combination": "min-p"}})
    result = export_model(spec, progress=quiet)
    model = result.calibration.model
    assert model["validation_ood"]["groups"] == {"far": 289, "near": 577, "user:synthetic:blobs:50": 50}
    assert model["score_params"]["fused"]["components"] == ["energy", "knn"]
    assert model["score_params"]["fused"]["combination"] == "min-p"
    assert set(model["score_params"]["knn"]["k_search"]["group_auroc"][0]) == {"far", "near", "user:synthetic:blobs:50"}


def test_realised_acceptance_on_a_further_disjoint_split_is_inside_the_binomial_interval(digits_export):
    """The acceptance count on a fresh split of size m is Binomial(m, q), where q, the threshold's true
    TPR, is itself random: for the conformal threshold (k-th of n calibration scores) q ~ Beta(k, n+1-k).
    The count is therefore beta-binomial; its central 95% interval is the plain binomial interval around
    95% widened by the calibration set's own sampling (with n = m = 289 the plain one is [266, 280], this
    one [263, 283]). Checking the plain interval would fail for a correct threshold about one time in six."""
    record, result, _, _ = digits_export
    assert not set(record.splits["test"]) & (set(record.splits["train"]) | set(record.splits["calibration"]))
    scorer = VersionScorer(result.version_dir)
    test = scorer.score("test", record.part(record.dataset(), "test"))
    n = len(record.splits["test"])
    for name, threshold in scorer.calibration.thresholds.items():
        k = int(np.ceil(0.95 * (threshold.n + 1)))
        low, high = betabinom.interval(0.95, n, k, threshold.n + 1 - k)
        accepted = int(np.sum(~threshold.is_ood(test.scores[name])))
        assert low <= accepted <= high, f"{name}: {accepted}/{n} accepted, interval [{low}, {high}]"


def test_next_export_adds_a_version_and_the_repository_validates(digits_export, tmp_path, capfd, monkeypatch):
    """Also (the same two exports, to spare two more): the second shows its phases as bars on stderr
    (OODGUARD_PROGRESS=1) and prints the same lines on stdout as the first, whose stderr has no bar."""
    record, result, repository, checkpoint = digits_export
    spec = spec_from_training(checkpoint, tmp_path, "digits", bank_size=200)
    monkeypatch.delenv("OODGUARD_PROGRESS", raising=False)  # not a terminal: no bar
    first = export_model(spec)
    plain = capfd.readouterr()
    monkeypatch.setenv("OODGUARD_PROGRESS", "1")
    second = export_model(spec)
    shown = capfd.readouterr()
    assert (first.version, second.version) == (1, 2)
    bars = ("extract training features (866 images)", "validation OOD: build it and extract its features",
            "ProbCover bank of 200", "fit scores (probcover bank): sisom", "fit scores (random bank): knn",
            "score the references (random bank)", "score the validation OOD (probcover bank)",
            "choose the fused score", "export ONNX", "calibrate: ONNX Runtime")
    assert all(bar in shown.err for bar in bars) and not any(bar in plain.err for bar in bars)
    assert "0/866" in shown.err and "0/289" in shown.err  # batch loops count images (a bar starts at 0/total)

    def timeless(out: str, version: int) -> str:
        return re.sub(r"\d+\.\ds$", "Ts", out.replace(f"digits/{version} ", "digits/V "), flags=re.M)

    assert "  export ONNX: " in plain.out and timeless(shown.out, 2) == timeless(plain.out, 1)
    assert versions(tmp_path, "digits") == [1, 2]
    assert second.calibration.model["bank_size"] == 200
    # ProbCover and a stratified random bank are compared on every bank-based score; the better is kept
    comparison = second.calibration.model["bank_comparison"]
    assert set(comparison) == {"probcover", "random"} and set(comparison["random"]) == {"sisom", "sisome", "knn", "knn_centred"}
    probcover_wins = all((comparison["probcover"][s]["worst"], comparison["probcover"][s]["mean"])
                         >= (comparison["random"][s]["worst"], comparison["random"][s]["mean"]) for s in comparison["random"])
    assert second.calibration.model["bank_method"] == ("probcover" if probcover_wins else "random")
    assert (tmp_path / "digits" / "config.pbtxt").exists() and (tmp_path / "digits" / "configs" / "cpu.pbtxt").exists()
    assert validate_repository(tmp_path) == []
    assert not [p for p in (tmp_path / "digits").iterdir() if p.name.startswith(".staging")]


def test_garbage_checkpoint_is_a_clear_error(digits_export, tmp_path):
    _, _, _, checkpoint = digits_export
    bad = tmp_path / "work" / "checkpoint.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    (bad.parent / "training.json").write_text(checkpoint.with_name("training.json").read_text())
    with pytest.raises(CheckpointError, match="checkpoint"):
        export_model(spec_from_training(bad, tmp_path / "repo", "digits"), progress=quiet)
    assert versions(tmp_path / "repo", "digits") == []


def test_class_count_mismatch_is_a_clear_error(digits_export, tmp_path):
    _, _, _, checkpoint = digits_export
    spec = spec_from_training(checkpoint, tmp_path, "digits")
    spec.class_names = spec.class_names + ["extra"]
    with pytest.raises(CheckpointError, match="8 classes but 9 class names"):
        export_model(spec, progress=quiet)


@pytest.mark.parametrize("size, message", [(0, "empty"), (10, "too few")])
def test_too_small_calibration_set_is_an_error_and_leaves_nothing(digits_export, tmp_path, size, message):
    _, _, _, checkpoint = digits_export
    spec = spec_from_training(checkpoint, tmp_path, "digits")
    spec.calibration_data = spec.calibration_data.take(np.arange(size))
    with pytest.raises(CalibrationError, match=message):
        export_model(spec, progress=quiet)
    assert not (tmp_path / "digits").exists()


def test_a_class_with_few_calibration_samples_is_reported_not_refused(digits_export, tmp_path):
    _, _, _, checkpoint = digits_export
    spec = spec_from_training(checkpoint, tmp_path, "digits", bank_size=200)
    labels = spec.calibration_data.labels
    keep = np.flatnonzero((labels != 7) | (np.cumsum(labels == 7) <= 3))  # class 7 down to 3 samples
    spec.calibration_data = spec.calibration_data.take(keep)
    lines: list[str] = []
    result = export_model(spec, progress=lines.append)
    data = result.calibration.data
    assert data["per_class"]["7"] == 3 and sum(data["per_class"].values()) == data["n"] == len(keep)
    assert data["few_samples"] == ["7"]
    assert any("few calibration samples for class(es) {'7': 3}" in line for line in lines)
    assert Calibration.load(result.version_dir / "calibration.json").data["few_samples"] == ["7"]


def test_unknown_score_parameters_are_refused(digits_export, tmp_path):
    _, _, _, checkpoint = digits_export
    spec = spec_from_training(checkpoint, tmp_path, "digits", score_params={"mahalanobis": {}})
    with pytest.raises(ValueError, match="unknown score"):
        export_model(spec, progress=quiet)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.npz", "missing.npz"),
    (lambda d: (np.savez(d / "flat.npz", images=np.zeros((5, 7), np.uint8)), d / "flat.npz")[1], r"\[N,H,W\]"),
    (lambda d: (np.savez(d / "empty.npz", images=np.zeros((0, 8, 8), np.uint8)), d / "empty.npz")[1], "no image"),
])
def test_bad_validation_ood_sets_are_clear_errors_before_any_work(digits_export, tmp_path, make, message):
    _, _, _, checkpoint = digits_export
    path = make(tmp_path)
    spec = spec_from_training(checkpoint, tmp_path / "repo", "digits", validation_ood_specs=[str(path)])
    with pytest.raises(ValueError, match=rf"--validation-ood {path}: .*{message}"):
        export_model(spec, progress=quiet)
    assert not (tmp_path / "repo" / "digits").exists()


def test_a_backbone_without_layer_stages_is_noted_and_gets_no_layer_data():
    from torch import nn

    from oodguard.export.backbones import Classifier
    from oodguard.export.extraction import extract_layers

    class Plain(nn.Module):
        feature_dim = 4

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return self.body(x)

    lines = []
    images = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(np.float32)
    assert extract_layers(Classifier(Plain(), 3).eval(), images, lines.append) is None
    assert lines == ["  note: backbone Plain has no sisom_stages(): sisom_ml and sisome_ml use the penultimate layer only"]

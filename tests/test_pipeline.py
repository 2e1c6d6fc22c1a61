import hashlib

import numpy as np
import pytest
from scipy.stats import betabinom

from oodguard.calibration import Calibration, CalibrationError
from oodguard.evaluation import VersionScorer
from oodguard.export.backbones import CheckpointError
from oodguard.export.pipeline import export_model, spec_from_training
from oodguard.export.scores import SCORES
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
    assert model["scores"] == list(SCORES)
    assert model["bank_size"] == len(record.splits["train"])
    assert model["score_params"]["sisom"]["alpha"] > 0 and model["score_params"]["sisom"]["r_avg"] > 0
    assert {"mu_r", "sd_r", "mu_E", "sd_E", "r_avg"} <= set(model["score_params"]["sisome"])
    assert model["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert model["exported_at"] and model["oodguard_version"] and model["version"] == 1
    assert model["test_accuracy"] == record.test_accuracy and model["test_accuracy"]["overall"] > 0.9
    n_cal = len(record.splits["calibration"])
    for name, threshold in result.calibration.thresholds.items():
        assert threshold.n == n_cal and threshold.target_tpr == 0.95
        assert threshold.achieved_tpr >= 0.95
        low, high = threshold.achieved_tpr_ci95
        assert low < threshold.achieved_tpr < high


def test_thresholds_come_from_the_onnx_model_on_the_calibration_split(digits_export):
    record, result, _, _ = digits_export
    scorer = VersionScorer(result.version_dir)
    scored = scorer.score("calibration", record.part(record.dataset(), "calibration"))
    for name, threshold in scorer.calibration.thresholds.items():
        np.testing.assert_allclose(threshold.sorted_scores, np.sort(scored.scores[name]), rtol=1e-6)
        k = int(np.ceil(0.95 * (threshold.n + 1)))
        assert threshold.threshold == pytest.approx(np.sort(scored.scores[name])[k - 1], rel=1e-6)


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


def test_next_export_adds_a_version_and_the_repository_validates(digits_export, tmp_path):
    record, result, repository, checkpoint = digits_export
    spec = spec_from_training(checkpoint, tmp_path, "digits", bank_size=200)
    first = export_model(spec, progress=quiet)
    second = export_model(spec, progress=quiet)
    assert (first.version, second.version) == (1, 2)
    assert versions(tmp_path, "digits") == [1, 2]
    assert second.calibration.model["bank_size"] == pytest.approx(200, abs=8)
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

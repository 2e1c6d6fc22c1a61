import json

import numpy as np
import pytest

from oodguard.export.training_job import RECORD_FILE, TrainingRecord, preprocessing_for
from oodguard.datasets import Dataset, load_dataset


def test_record_has_disjoint_stratified_splits_and_preprocessing(digits_export):
    record, _, _, checkpoint = digits_export
    train, cal, test = (set(record.splits[s]) for s in ("train", "calibration", "test"))
    assert not (train & cal or train & test or cal & test)
    data = record.dataset()
    assert len(train | cal | test) == len(data) == int(np.isin(load_dataset("digits").labels, range(8)).sum())
    assert record.class_names == [str(c) for c in range(8)]
    assert record.preprocessing["height"] == 28 and record.preprocessing["channels"] == 1
    assert record.history[-1]["accuracy"] > 0.95
    assert record.history[-1]["validation_accuracy"] > 0.9  # on the calibration split, reported only
    acc = record.test_accuracy
    assert acc["n"] == len(test) and set(acc["per_class"]) == set(record.class_names) and acc["overall"] > 0.9
    # the overall accuracy is the per-class ones weighted by the test split's class counts
    counts = np.bincount(data.labels[record.splits["test"]], minlength=8)
    assert acc["overall"] == pytest.approx(sum(counts[c] * acc["per_class"][str(c)] for c in range(8)) / counts.sum())
    loaded = TrainingRecord.load(checkpoint.with_name(RECORD_FILE))
    assert loaded.splits == record.splits and loaded.checkpoint_sha256 == record.checkpoint_sha256
    assert loaded.test_accuracy == record.test_accuracy
    labels = data.labels
    for cls in range(8):  # calibration holds ~20% of every class
        share = np.mean(labels[record.splits["calibration"]] == cls) / np.mean(labels == cls)
        assert share == pytest.approx(1.0, abs=0.1)


def test_preprocessing_normalises_by_training_statistics():
    images = np.full((4, 8, 8), 128, np.uint8)
    images[:2] = 0
    prep = preprocessing_for((1, 16, 16), Dataset(images, None, None, "test"))
    assert prep.mean[0] == pytest.approx(64 / 255, abs=1e-3)
    assert prep.std[0] == pytest.approx(64 / 255, abs=1e-3)
    x = prep.apply(images)
    assert x.shape == (4, 1, 16, 16) and abs(float(x.mean())) < 1e-5


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / RECORD_FILE
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a training record"):
        TrainingRecord.load(path)
    with pytest.raises(ValueError, match="no training record"):
        TrainingRecord.load(tmp_path / "missing.json")

import json

import numpy as np
import pytest

from oodguard.cli import main
from oodguard.export.training_job import RECORD_FILE, TrainingRecord, describe_accuracy, preprocessing_for
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
    # and the number of test images behind each class's accuracy is the test split's class count
    assert acc["per_class_n"] == {str(c): int(counts[c]) for c in range(8)} and sum(acc["per_class_n"].values()) == acc["n"]
    loaded = TrainingRecord.load(checkpoint.with_name(RECORD_FILE))
    assert loaded.splits == record.splits and loaded.checkpoint_sha256 == record.checkpoint_sha256
    assert loaded.test_accuracy == record.test_accuracy
    assert json.loads(checkpoint.with_name(RECORD_FILE).read_text())["test_accuracy"]["per_class_n"]["0"] == counts[0]
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


def test_accuracy_lines_show_each_class_count_and_warn_about_thin_ones():
    """Each class's accuracy is printed with its test images; one line warns about the classes with fewer than
    30 (and a class with none), whose accuracy is uncertain: 1.000 from 5 images is no 1.000 from 500."""
    acc = {"overall": 0.99, "n": 225, "per_class": {"0": 0.99, "8": 1.0, "9": 0.8},
           "per_class_n": {"0": 200, "8": 5, "9": 20}}
    assert describe_accuracy(acc, ["0", "8", "9", "10"]) == [
        "test accuracy 0.9900 on 225 images; per class: 0 0.990 (n=200), 8 1.000 (n=5), 9 0.800 (n=20)",
        "warning: class(es) 8 (n=5), 9 (n=20), 10 (n=0) have fewer than 30 test images: their accuracy is uncertain "
        "(label more images of them to measure it)"]
    assert len(describe_accuracy({**acc, "per_class_n": {"0": 200, "8": 30, "9": 31}})) == 1  # 30 is enough
    # a record written before the counts were kept: the accuracies alone, no warning (nothing to judge it by)
    old = {"overall": 0.99, "n": 225, "per_class": {"0": 0.99, "8": 1.0}}
    assert describe_accuracy(old, ["0", "8"]) == ["test accuracy 0.9900 on 225 images; per class: 0 0.990, 8 1.000"]


def test_an_older_record_without_counts_still_loads(digits_export, tmp_path):
    record, _, _, checkpoint = digits_export
    raw = json.loads(checkpoint.with_name(RECORD_FILE).read_text())
    del raw["test_accuracy"]["per_class_n"]
    (tmp_path / RECORD_FILE).write_text(json.dumps(raw))
    loaded = TrainingRecord.load(tmp_path / RECORD_FILE)
    assert loaded.test_accuracy["per_class"] == record.test_accuracy["per_class"]
    assert "per_class_n" not in loaded.test_accuracy


def test_train_reads_an_npz_whose_labels_are_class_name_strings(tmp_path, capsys):
    """An .npz whose 'labels' are names ("zero", "one", "two"; no class_names array) trains: the classes are the
    names in sorted order. Digits 0-2 give ~18 test images per class (10%), so the output shows them and warns that
    those accuracies are uncertain."""
    digits = load_dataset("digits")
    keep = digits.labels < 3
    names = np.array(["zero", "one", "two"])[digits.labels[keep]]
    np.savez(tmp_path / "named.npz", images=digits.images[keep], labels=names)
    assert main(["train", "--data", str(tmp_path / "named.npz"), "--epochs", "2", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    record = TrainingRecord.load(tmp_path / "run" / RECORD_FILE)
    assert record.class_names == ["one", "two", "zero"]
    data = record.dataset()
    assert np.bincount(data.labels).tolist() == [int(np.sum(names == n)) for n in ("one", "two", "zero")]
    counts = record.test_accuracy["per_class_n"]
    assert set(counts) == {"one", "two", "zero"} and all(15 <= n < 30 for n in counts.values())
    assert sum(counts.values()) == record.test_accuracy["n"] == len(record.splits["test"])
    assert f"one {record.test_accuracy['per_class']['one']:.3f} (n={counts['one']})" in out
    assert (f"warning: class(es) one (n={counts['one']}), two (n={counts['two']}), zero (n={counts['zero']}) have "
            "fewer than 30 test images: their accuracy is uncertain") in out


def test_an_interrupted_save_leaves_the_run_folder_as_it_was(digits_export, tmp_path):
    """Ctrl-C while a retrain writes over an older run: the older checkpoint and training.json stay, matching,
    with no temporary file beside them; a run folder the save created is removed again."""
    import shutil

    from oodguard.export.backbones import load_classifier
    from oodguard.export.training_job import CHECKPOINT_FILE, save_run

    record, _, _, checkpoint = digits_export
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / CHECKPOINT_FILE)
    shutil.copy(checkpoint.with_name(RECORD_FILE), run / RECORD_FILE)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    model = load_classifier(record.backbone, checkpoint)

    def interrupted(sha256):
        raise KeyboardInterrupt  # after the new checkpoint is written, before training.json

    with pytest.raises(KeyboardInterrupt):
        save_run(run, model, interrupted)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    with pytest.raises(KeyboardInterrupt):
        save_run(tmp_path / "new-run", model, interrupted)
    assert not (tmp_path / "new-run").exists()

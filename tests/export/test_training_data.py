"""Training on a base run plus new labeled data: split and class indices kept, classes appended by name, the
head grown, classes balanced; and the errors a user meets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodguard.datasets import load_dataset
from oodguard.export.pipeline import export_model
from oodguard.export.spec import spec_from_training
from oodguard.export.training_data import balancing_weights, describe_appended, merge_class_names
from oodguard.export.training_job import CHECKPOINT_FILE, TrainingRecord, init_weights, run_training
from oodguard.preprocess import Preprocessing

quiet = lambda line: None  # noqa: E731


def relabeled_npz(path, record, digits, per_class: dict[int, int]):
    """What `labels import` writes: images at the model's size, labels 0..n-1, class names."""
    prep = Preprocessing.from_dict(record.preprocessing)
    images, labels, names = [], [], []
    for j, (digit, n) in enumerate(per_class.items()):
        images.append(prep.to_size(digits.images[digits.labels == digit][-n:]))
        labels += [j] * n
        names.append(str(digit))
    np.savez(path, images=np.concatenate(images), labels=np.asarray(labels), class_names=np.asarray(names))
    return str(path)


def test_merge_class_names_appends_new_names_sorted_and_refuses_case_collisions():
    assert merge_class_names(["0", "1"], ["1", "8", "0", "9"]) == ["0", "1", "8", "9"]
    # appended in natural sort order, whichever came first: '9' before '10', not '10' before '8'
    assert merge_class_names(["0", "1"], ["10", "9", "1", "8", "cat"]) == ["0", "1", "8", "9", "10", "cat"]
    # the first list (a run's first source) keeps its own order: its labels' numbering
    assert merge_class_names([], ["3", "1", "2"]) == ["3", "1", "2"]
    assert describe_appended(["0", "1", "8", "9"], 2) == "new classes, appended in sorted order: 8 → index 2, 9 → index 3"
    assert describe_appended(["0", "1"], 2) == ""
    with pytest.raises(ValueError, match="class 'Cat' differs from the existing class 'cat' only in letter case"):
        merge_class_names(["cat", "dog"], ["Cat"])


def test_balancing_weights():
    labels = np.array([0] * 500 + [1] * 40 + [2] * 10)
    w = balancing_weights(labels, "auto")  # 500 vs 10: more than 10x
    assert np.allclose([w[labels == c].sum() for c in range(3)], 1.0)
    assert balancing_weights(np.array([0] * 50 + [1] * 10), "auto") is None  # 5x: left alone
    assert balancing_weights(np.array([0] * 50 + [1] * 10), "on") is not None
    assert balancing_weights(labels, "off") is None
    with pytest.raises(ValueError, match="auto, on or off"):
        balancing_weights(labels, "maybe")


def test_a_run_on_a_base_keeps_its_split_and_classes_and_appends_new_ones(digits_export, tmp_path):
    base_record, _, _, checkpoint = digits_export
    base = checkpoint.parent
    digits = load_dataset("digits")
    npz = relabeled_npz(tmp_path / "relabeled.npz", base_record, digits, {3: 5, 8: 12})
    lines: list[str] = []
    record = run_training(base=base, data=npz, out_dir=tmp_path / "v2", epochs=3, seed=4,
                          init_from=checkpoint, progress=lines.append)
    assert record.class_names == [str(c) for c in range(8)] + ["8"]  # old indices kept, '8' appended
    assert record.preprocessing == base_record.preprocessing and record.base == str(base)
    old, new = record.sources
    assert old == {"data": base_record.data, "classes": base_record.classes, "splits": base_record.splits}
    assert sorted(sum(new["splits"].values(), [])) == list(range(17))
    # the base run's calibration and test images stay out of training (indices of the joined dataset)
    n_old = len(base_record.dataset())
    assert set(record.splits["train"]) & set(base_record.splits["calibration"] + base_record.splits["test"]) == set()
    assert record.splits["calibration"][:len(base_record.splits["calibration"])] == base_record.splits["calibration"]
    data = record.dataset()
    assert len(data) == n_old + 17 and data.images.shape[1:] == (28, 28)  # 8x8 digits and 28x28 labels, joined
    assert np.bincount(data.labels[n_old:]).tolist() == [0, 0, 0, 5, 0, 0, 0, 0, 12]  # '3' -> 3, '8' -> 8
    assert record.balanced and any(  # ~140 training images per old class, ~10 of '8'
        "class-balanced sampling" in line for line in lines)
    assert any("head grown by 1 class(es)" in line for line in lines)
    assert set(record.test_accuracy["per_class"]) == set(record.class_names)
    # a third run on this one keeps all of it again
    third_lines: list[str] = []
    third = run_training(base=tmp_path / "v2", data=relabeled_npz(tmp_path / "more.npz", base_record, digits, {9: 20}),
                         out_dir=tmp_path / "v3", epochs=1, shift=2, progress=third_lines.append)
    assert third.class_names == record.class_names + ["9"] and third.sources[:2] == record.sources
    assert (record.shift, third.shift) == (0, 2) and TrainingRecord.load(tmp_path / "v3" / "training.json").shift == 2
    assert any("random shifts up to 2 px" in line for line in third_lines)
    # and it exports: the thin new classes are reported, not refused
    out: list[str] = []
    result = export_model(spec_from_training(tmp_path / "v3" / CHECKPOINT_FILE, tmp_path / "repo", "digits",
                                             bank_size=200), progress=out.append)
    assert result.calibration.class_names == third.class_names
    assert "8" in result.calibration.data["few_samples"] and any("few calibration samples" in line for line in out)
    # the test images behind each class's accuracy travel into calibration.json with it (what ModelInfo shows)
    carried = result.calibration.model["test_accuracy"]
    assert carried["per_class_n"] == third.test_accuracy["per_class_n"] and carried["per_class_n"]["8"] < 30


def test_new_classes_of_a_base_run_are_appended_in_sorted_order(digits_export, tmp_path):
    """A labels file that lists '9' before '8' (first-seen order) still gives '8' index 8 and '9' index 9; the
    train output says so, and warns that the new classes' handful of test images makes their accuracy
    uncertain."""
    base_record, _, _, checkpoint = digits_export
    npz = relabeled_npz(tmp_path / "new.npz", base_record, load_dataset("digits"), {9: 12, 8: 10})
    assert list(np.load(npz)["class_names"]) == ["9", "8"]
    lines: list[str] = []
    record = run_training(base=checkpoint.parent, data=npz, out_dir=tmp_path / "v2", epochs=1, progress=lines.append)
    assert record.class_names == [str(c) for c in range(10)]
    assert "new classes, appended in sorted order: 8 → index 8, 9 → index 9" in lines
    data = record.dataset()
    n_old = len(base_record.dataset())
    assert np.bincount(data.labels[n_old:]).tolist() == [0] * 8 + [10, 12]  # by name, not by the file's indices
    assert record.test_accuracy["per_class_n"]["8"] == 1 and record.test_accuracy["per_class_n"]["9"] == 1
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert "8 (n=1), 9 (n=1)" in warning and "accuracy is uncertain" in warning
    # nothing new: no such line
    again: list[str] = []
    run_training(base=tmp_path / "v2", data=[], out_dir=tmp_path / "v3", epochs=1, progress=again.append)
    assert not any("new classes" in line for line in again)


def test_init_from_grows_the_head_and_keeps_the_old_rows(digits_export):
    from oodguard.export.backbones import Classifier, lenet5

    _, _, _, checkpoint = digits_export
    state = torch.load(checkpoint, weights_only=True)
    model = Classifier(lenet5(), 10)
    assert init_weights(model, checkpoint) == 2
    assert torch.equal(model.head.weight[:8], state["head.weight"]) and torch.equal(model.head.bias[:8], state["head.bias"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items() if not k.startswith("head."))
    with pytest.raises(ValueError, match="head of 8 classes x .* does not fit this run's 5"):
        init_weights(Classifier(lenet5(), 5), checkpoint)


def test_bad_input(digits_export, tmp_path):
    base_record, _, _, checkpoint = digits_export
    digits = load_dataset("digits")
    # a base run whose data is gone: the error names the missing spec
    npz = relabeled_npz(tmp_path / "gone.npz", base_record, digits, {8: 10})
    run_training(base=checkpoint.parent, data=npz, out_dir=tmp_path / "v2", epochs=1, progress=quiet)
    (tmp_path / "gone.npz").unlink()
    with pytest.raises(ValueError, match=r"training data '.*gone.npz' of the base run cannot be read"):
        run_training(base=tmp_path / "v2", data=[], out_dir=tmp_path / "v3", epochs=1, progress=quiet)
    # class names colliding with existing ones in another case
    np.savez(tmp_path / "case.npz", images=digits.images[:4], labels=np.zeros(4, int), class_names=np.asarray(["Zero"]))
    TrainingRecord.load(checkpoint.parent / "training.json")
    collide = tmp_path / "collide"
    collide.mkdir()
    record = TrainingRecord.load(checkpoint.parent / "training.json")
    record.class_names = ["zero"] + record.class_names[1:]
    record.save(collide / "training.json")
    with pytest.raises(ValueError, match="'Zero' differs from the existing class 'zero' only in letter case"):
        run_training(base=collide, data=str(tmp_path / "case.npz"), out_dir=tmp_path / "v4", epochs=1, progress=quiet)
    # an empty labels set
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, int),
             class_names=np.asarray(["8"]))
    with pytest.raises(ValueError, match="holds no labeled image"):
        run_training(base=checkpoint.parent, data=str(tmp_path / "empty.npz"), out_dir=tmp_path / "v5", epochs=1,
                     progress=quiet)
    with pytest.raises(ValueError, match="give --data"):
        run_training(out_dir=tmp_path / "v6", progress=quiet)


def test_a_new_class_with_a_single_label_is_refused_before_training(digits_export, tmp_path):
    """One labeled image of a new class cannot give the export's feature bank the 2 samples per class SISOM's
    leave-one-out needs: train says so at once, naming the class, instead of the export failing later."""
    base_record, _, _, checkpoint = digits_export
    npz = relabeled_npz(tmp_path / "one.npz", base_record, load_dataset("digits"), {8: 1, 9: 5})
    with pytest.raises(ValueError, match=r"class\(es\) \{'8': 1\} have fewer than 2 training images"):
        run_training(base=checkpoint.parent, data=npz, out_dir=tmp_path / "v2", epochs=1, progress=quiet)
    assert not (tmp_path / "v2" / "checkpoint.pt").exists()


def test_missing_new_data_is_named_plainly_not_as_the_base_runs(tmp_path):
    with pytest.raises(ValueError) as info:
        run_training(data=str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz"), out_dir=tmp_path / "run",
                     epochs=1, progress=quiet)
    message = str(info.value)
    assert "not found" in message and "base run" not in message and "mnist/{train,t10k}" in message


def test_outlier_data_is_trained_as_an_extra_class_that_the_saved_head_drops(tmp_path):
    """``--outlier-data``: digits 8 and 9 (unlabeled) trained as an extra class next to digits 0-7. The saved
    checkpoint has the 8 classes only, and held-out 8s and 9s are ranked below the test digits by the top logit
    with fewer errors than without them (the features learned where they lie); a run built on it keeps them; a bad spec is a clear
    error."""
    digits = load_dataset("digits")
    outliers = np.flatnonzero(digits.labels >= 8)
    np.savez(tmp_path / "outliers.npz", images=digits.images[outliers[:200]])  # no labels, 8x8 like the data
    held_out = digits.images[outliers[200:]]
    lines: list[str] = []
    kwargs = dict(backbone="lenet5", data="digits", classes=list(range(8)), epochs=15, seed=0, holdout=0.4)
    with_outliers = run_training(out_dir=tmp_path / "with", outliers=[str(tmp_path / "outliers.npz")],
                                 progress=lines.append, **kwargs)
    plain = run_training(out_dir=tmp_path / "plain", progress=quiet, **kwargs)
    assert with_outliers.outliers == [str(tmp_path / "outliers.npz")] and with_outliers.outlier_images == 200
    assert plain.outliers == [] and plain.outlier_images == 0
    assert any("200 outlier images" in line and "extra class" in line for line in lines)
    state = torch.load(tmp_path / "with" / CHECKPOINT_FILE, weights_only=True)
    assert state["head.weight"].shape[0] == 8 and with_outliers.class_names == [str(c) for c in range(8)]
    assert with_outliers.test_accuracy["overall"] > 0.85

    def separation(run, record):  # AUROC: test digits 0-7 (ID) against held-out 8s and 9s, by the top logit
        from sklearn.metrics import roc_auc_score

        from oodguard.export.backbones import load_classifier

        model = load_classifier(record.backbone, tmp_path / run / CHECKPOINT_FILE, len(record.class_names)).eval()
        prep = Preprocessing.from_dict(record.preprocessing)
        test = record.part(record.dataset(), "test").images
        with torch.no_grad():
            top = [model(torch.from_numpy(prep.apply(x))).max(dim=1).values.numpy() for x in (test, held_out)]
        return roc_auc_score(np.r_[np.zeros(len(top[0])), np.ones(len(top[1]))], -np.r_[top[0], top[1]])

    # digits are easy: the ranking errors (1 - AUROC) fall from 2.1% to 1.1% with the outliers
    assert 1 - separation("with", with_outliers) < 0.75 * (1 - separation("plain", plain))
    # a run built on it keeps its outliers (given again, they are not doubled)
    again = run_training(base=tmp_path / "with", data=[], outliers=[str(tmp_path / "outliers.npz")],
                         out_dir=tmp_path / "v2", epochs=1, progress=quiet)
    assert again.outliers == with_outliers.outliers and again.outlier_images == 200
    # an empty outlier set (no record was 'not relevant') trains no extra class, and says so
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8), np.uint8))
    lines.clear()
    empty = run_training(out_dir=tmp_path / "empty", outliers=[str(tmp_path / "empty.npz")], progress=lines.append,
                         **{**kwargs, "epochs": 1})
    assert empty.outlier_images == 0 and any("no images, no extra class" in line for line in lines)
    with pytest.raises(ValueError, match=r"--outlier-data '.*missing.npz'"):
        run_training(out_dir=tmp_path / "bad", outliers=[str(tmp_path / "missing.npz")], progress=quiet, **kwargs)

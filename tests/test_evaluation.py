import numpy as np

from oodguard.evaluation import VersionScorer, compare, uniform_noise
from oodguard.ood_metrics import auroc


def test_compare_reports_metrics_from_the_onnx_scores(digits_export):
    record, result, _, _ = digits_export
    scorer = VersionScorer(result.version_dir)
    in_dist = scorer.score("id", record.part(record.dataset(), "test"))
    noise = scorer.score("noise", uniform_noise(100, (8, 8)))
    assert noise.conversion == ["resize 8x8 -> 28x28 (bilinear)"]
    rows = compare(scorer, in_dist, noise)
    assert set(rows) == set(scorer.score_names)
    for name, row in rows.items():
        assert row["auroc"] == auroc(in_dist.scores[name], noise.scores[name])
        threshold = scorer.calibration.thresholds[name].threshold
        assert row["calibrated_tpr"] == np.mean(in_dist.scores[name] <= threshold)
        assert row["calibrated_fpr"] == np.mean(noise.scores[name] <= threshold)


def test_uniform_noise_is_seeded_uint8():
    a, b = uniform_noise(5, (8, 8), seed=2), uniform_noise(5, (8, 8), seed=2)
    assert a.images.dtype == np.uint8 and a.images.shape == (5, 8, 8)
    np.testing.assert_array_equal(a.images, b.images)


# --- evaluate: the report behind `oodguard evaluate` -------------------------------------------
import json  # noqa: E402

import pytest  # noqa: E402

from oodguard.cli import main  # noqa: E402
from oodguard.datasets import load_dataset  # noqa: E402
from oodguard.evaluation import evaluate, gaussian_blobs, parse_ood, resolve_version  # noqa: E402
from oodguard.repository import RepositoryError  # noqa: E402


def test_parse_ood_groups():
    assert (parse_ood("fm=a/b.gz:near").spec, parse_ood("fm=a/b.gz:near").group) == ("a/b.gz", "near")
    assert parse_ood("n=synthetic:uniform:500:far").spec == "synthetic:uniform:500"
    assert parse_ood("x=c:/data/set.npz").group == ""
    assert (parse_ood("eights=d/t10k.gz:new").group, parse_ood("eights=d/t10k.gz:new").classes) == ("new", None)
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_ood("no-equals-sign")


def test_resolve_version_latest_and_errors(digits_export):
    _, result, repository, _ = digits_export
    assert resolve_version(repository, "digits", None) == result.version_dir
    with pytest.raises(RepositoryError, match="no version 7"):
        resolve_version(repository, "digits", 7)
    with pytest.raises(RepositoryError, match="no versions"):
        resolve_version(repository, "nope", None)


def test_gaussian_blobs_are_bright_spots_on_black():
    blobs = gaussian_blobs(20, (28, 28), seed=0)
    assert blobs.images.shape == (20, 28, 28) and blobs.images.dtype == np.uint8
    assert all(img.max() > 90 for img in blobs.images)
    assert np.median(blobs.images) < 60
    assert gaussian_blobs(2, (32, 32, 3)).images.shape == (2, 32, 32, 3)


def test_evaluate_report_groups_and_numbers(digits_export, tmp_path):
    record, result, repository, _ = digits_export
    test_npz = tmp_path / "test.npz"
    test_part = record.part(record.dataset(), "test")
    np.savez(test_npz, images=test_part.images, labels=test_part.labels)
    unknown = tmp_path / "unknown.npz"
    from oodguard.datasets import load_dataset

    np.savez(unknown, images=load_dataset("digits").select_classes([8, 9]).images)
    scorer = VersionScorer(result.version_dir)
    oods = [parse_ood(f"unknown={unknown}:near"), parse_ood("noise=synthetic:uniform:300:far"),
            parse_ood("blobs=synthetic:blobs:300:far")]
    report = evaluate(scorer, str(test_npz), oods)
    assert report["id"]["n"] == len(test_part) and report["id"]["conversion"] == ["resize 8x8 -> 28x28 (bilinear)"]
    near = report["sets"]["unknown"]["metrics"]
    assert near["sisome"]["auroc"] > 0.85 and 0.9 <= near["sisome"]["calibrated_tpr"] <= 1.0
    far = report["groups"]["far"]
    for score in scorer.score_names:
        expected = np.mean([report["sets"][s]["metrics"][score]["auroc"] for s in ("noise", "blobs")])
        assert far[score]["auroc"] == pytest.approx(expected)
        assert report["groups"]["near"][score] == near[score]
        for metric in ("auroc", "aupr_in", "aupr_out", "fpr_at_95tpr"):
            assert 0.0 <= near[score][metric] <= 1.0


def test_evaluate_command_json_and_errors(digits_export, capsys):
    _, _, repository, _ = digits_export
    code = main(["evaluate", "--repository", str(repository), "--model", "digits", "--id", "digits",
                 "--ood", "noise=synthetic:uniform:200:far", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["sets"]["noise"]["metrics"]) == set(report["groups"]["far"])
    assert main(["evaluate", "--repository", str(repository), "--model", "digits", "--id", "digits",
                 "--ood", "x=synthetic:stripes"]) == 2
    assert "unknown synthetic set 'stripes'" in capsys.readouterr().err


def test_evaluate_reports_accuracy_and_the_labels_the_model_does_not_know(digits_export, capsys):
    record, result, repository, _ = digits_export
    scorer = VersionScorer(result.version_dir)
    # 'digits' holds 0-9; the model knows 0-7: without --classes, 8 and 9 are counted as ID but reported
    everything = evaluate(scorer, "digits", [parse_ood("noise=synthetic:uniform:100:far")])
    from oodguard.datasets import load_dataset

    labels = load_dataset("digits").labels
    assert everything["id"]["n"] == len(labels)
    assert everything["id"]["unknown_labels"] == {"n": int(np.isin(labels, [8, 9]).sum()), "labels": ["8", "9"]}
    known = evaluate(scorer, "digits", [parse_ood("noise=synthetic:uniform:100:far")], classes=list(range(8)))
    assert known["id"]["n"] == int(np.isin(labels, range(8)).sum()) and "unknown_labels" not in known["id"]
    assert known["id"]["left_out"] == {"n": int(np.isin(labels, [8, 9]).sum()), "labels": ["8", "9"]}
    acc = known["id"]["accuracy"]
    assert acc["n"] == known["id"]["n"] and set(acc["per_class"]) == {str(c) for c in range(8)}
    assert acc["overall"] > 0.9  # includes the training images of 'digits': well above chance (1/8)
    # the accuracy is the model's argmax against the labels, on the known items only
    x = scorer.preprocessing.apply(load_dataset("digits").select_classes(list(range(8))).images)
    predicted = scorer.model.run(x)["logits"].argmax(axis=1)
    assert acc["overall"] == pytest.approx(float(np.mean(predicted == labels[labels < 8])))
    assert main(["evaluate", "--repository", str(repository), "--model", "digits", "--id", "digits",
                 "--classes", "0-7", "--ood", "noise=synthetic:uniform:100:far"]) == 0
    out = capsys.readouterr().out
    assert "classification accuracy" in out and "left out of the ID set (outside --classes): " in out


def test_evaluate_shows_a_bar_per_scored_set_on_stderr_only_when_bars_are_on(digits_export, capsys, monkeypatch):
    _, _, repository, _ = digits_export
    command = ["evaluate", "--repository", str(repository), "--model", "digits", "--id", "digits", "--classes", "0-7",
               "--ood", "noise=synthetic:uniform:300:far", "--ood", "blobs=synthetic:blobs:300:far"]
    monkeypatch.delenv("OODGUARD_PROGRESS", raising=False)  # not a terminal: no bar
    assert main(command) == 0
    plain = capsys.readouterr()
    assert plain.err == ""
    monkeypatch.setenv("OODGUARD_PROGRESS", "1")
    assert main(command) == 0
    shown = capsys.readouterr()
    assert shown.out == plain.out  # the report is the same, byte for byte
    for name in ("score ID set", "score OOD set noise (1/2)", "score OOD set blobs (2/2)"):
        assert name in shown.err
    assert "0/300" in shown.err and "img" in shown.err  # a bar counts the images of its set (from 0/total)


def test_a_class_holdout_reports_its_unseen_classes_as_the_new_group(digits_export, capsys):
    """--classes 0-7 --new-classes 8-9 on the digits: the ID set keeps 0-7, digits 8 and 9 are an OOD set of
    the 'new' group with its own group mean; the same numbers as scoring those images by hand."""
    _, _, repository, _ = digits_export
    assert main(["evaluate", "--repository", str(repository), "--model", "digits", "--id", "digits",
                 "--classes", "0-7", "--new-classes", "8-9", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    digits = load_dataset("digits")
    unseen = report["sets"]["classes 8,9"]
    assert unseen["group"] == "new" and unseen["n"] == int(np.isin(digits.labels, [8, 9]).sum())
    assert report["id"]["n"] == int(np.isin(digits.labels, range(8)).sum())
    assert report["groups"]["new"] == unseen["metrics"] and set(report["groups"]) == {"new"}
    assert all(0.5 < unseen["metrics"][s]["auroc"] <= 1.0 for s in ("energy", "maxlogit", "fused"))
    assert main(["evaluate", "--repository", str(repository), "--model", "digits", "--id", "digits",
                 "--classes", "0-8", "--new-classes", "8-9"]) == 2
    assert "--new-classes [8, 9] overlap --classes" in capsys.readouterr().err

"""oodguard.export.new_classes: the held-out-class worlds of the fused choice's ``new`` validation group."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from oodguard.export import new_classes
from oodguard.export.fitting import fit_scores


def test_held_out_classes_need_enough_images_and_are_a_seeded_draw():
    labels = np.repeat(np.arange(6), [10, 10, 2, 10, 10, 10])
    assert new_classes.held_out_classes(labels, 6, seed=0, limit=10) == [0, 1, 3, 4, 5]  # class 2 has 2 images
    drawn = new_classes.held_out_classes(labels, 6, seed=0, limit=3)
    assert len(drawn) == 3 and drawn == sorted(drawn) and 2 not in drawn
    assert drawn == new_classes.held_out_classes(labels, 6, seed=0, limit=3)
    assert new_classes.held_out_classes(np.repeat(np.arange(2), 10), 2, seed=0) == []  # 2 classes: none to spare


def test_a_retrained_world_sees_its_held_out_class_as_new(digits_export):
    """Class 3 held out of a LeNet-5 trained with the run's recipe on the other digits: its reference images are new
    to that world's scores (they rank above the other classes' images), every score of the export is there, and
    the export's parameters are reused."""
    record, result, _, checkpoint = digits_export
    from oodguard.export.spec import spec_from_training

    spec = spec_from_training(checkpoint, result.version_dir.parent.parent, "digits")
    prep = spec.preprocessing
    bank_images = prep.apply(spec.bank_data.images)
    references = prep.apply(spec.calibration_data.images)
    labels = np.asarray(spec.calibration_data.labels)
    scores = {name: score for name, score in result.model.scores.items() if name != "fused"}
    world = new_classes.retrained_world(3, spec.backbone, 84, bank_images, np.asarray(spec.bank_data.labels),
                                        references, labels, scores, lambda data, params: fit_scores(data, params),
                                        epochs=len(record.history), seed=0)
    assert world.held_out == 3 and set(world.references) == set(scores) == set(world.new)
    assert len(world.new["energy"]) == int((labels == 3).sum()) and len(world.references["energy"]) == int((labels != 3).sum())
    for name in ("maxlogit", "energy", "sisome"):
        auroc = roc_auc_score(np.r_[np.zeros(len(world.references[name])), np.ones(len(world.new[name]))],
                              np.r_[world.references[name], world.new[name]])
        assert auroc > 0.8, (name, auroc)
    assert new_classes.fixed_params(scores) == {"sisom": {"alpha": scores["sisom"].alpha}, "knn": {"k": scores["knn"].k}}


def test_export_with_new_class_holdouts_records_the_new_group(digits_export, tmp_path):
    """`oodguard export --new-class-holdouts 2`: the fused choice had a `new` group of two held-out classes, and
    calibration.json says so; without the flag (the default) there is none."""
    import json

    from oodguard.cli import main

    _, result, _, checkpoint = digits_export
    default = json.loads((result.version_dir / "calibration.json").read_text())["model"]["score_params"]["fused"]
    assert "new" not in default["selection"]["validation_groups"] and "new_classes" not in default["selection"]
    assert main(["export", "--checkpoint", str(checkpoint), "--repository", str(tmp_path), "--model", "digits",
                 "--new-class-holdouts", "2"]) == 0
    selection = json.loads((tmp_path / "digits" / "1" / "calibration.json").read_text())["model"]["score_params"][
        "fused"]["selection"]
    assert len(selection["new_classes"]["held_out"]) == 2
    assert selection["validation_groups"]["new"] == selection["new_classes"]["new_n"] > 0
    assert set(selection["chosen"]["auroc"]) == {"far", "near", "new"}
    assert main(["export", "--checkpoint", str(checkpoint), "--repository", str(tmp_path), "--model", "digits",
                 "--new-class-holdouts", "-1"]) == 2

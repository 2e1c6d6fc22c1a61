"""How well the held-out-class signal (oodguard.export.new_classes) predicts which fused decision flags real new
classes: for one trained run, every fused candidate's AUROC on the export-time ``new`` group (classes held out
in turn, each by a classifier trained without it) against its AUROC on a real set of unseen classes.

    python bench/new_class_signal.py --run RUN_DIR --unknown SPEC --classes 8,9 [--holdouts 4] [--epochs N]

RUN_DIR: an ``oodguard train`` output (checkpoint.pt + training.json; its test split is the ID set). SPEC: any
dataset spec holding the unseen classes (e.g. MNIST's test IDX file), ``--classes`` picks them. Prints the
candidates ranked by the held-out signal with their true AUROC, the single scores, the Spearman correlation of
the two rankings and the best true candidate. (Candidates are every subset of one to three penultimate scores
with each combination, as the export's choice evaluates them; p-values against the run's reference calibration
images, split as the export splits them.)
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from oodguard.datasets import load_dataset
from oodguard.export import new_classes
from oodguard.export.backbones import load_classifier
from oodguard.export.fitting import fit_scores, split_calibration
from oodguard.export.spec import spec_from_training
from oodguard.export.scores import FitData
from oodguard.export.scores.pvalue_fusion import COMBINATIONS, combine, leave_one_out_p_values, log_p_values
from oodguard.export.train import extract
from oodguard.export.training_job import RECORD_FILE, TrainingRecord


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--run", type=Path, required=True, help="an oodguard train output folder")
    parser.add_argument("--unknown", required=True, help="dataset spec holding the unseen classes")
    parser.add_argument("--classes", required=True, help="the unseen classes' labels in it, e.g. 8,9")
    parser.add_argument("--holdouts", type=int, default=4, help="classes held out in turn (default %(default)s)")
    parser.add_argument("--epochs", type=int, help="epochs of each held-out training (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw and trainings (default 0)")
    args = parser.parse_args(argv)

    record = TrainingRecord.load(args.run / RECORD_FILE)
    spec = spec_from_training(args.run / "checkpoint.pt", Path("unused"), "unused")
    classifier = load_classifier(spec.backbone, spec.checkpoint, num_classes=len(spec.class_names))
    prep = spec.preprocessing
    bank_images, bank_labels = prep.apply(spec.bank_data.images), np.asarray(spec.bank_data.labels, np.int64)
    calibration = prep.apply(spec.calibration_data.images)
    cal_labels = np.asarray(spec.calibration_data.labels, np.int64)
    references, _ = split_calibration(len(calibration), cal_labels, spec.target_tpr, spec.seed)
    features, logits = extract(classifier, bank_images)
    data = FitData(features=features, logits=logits, labels=bank_labels, bank=np.arange(len(bank_labels)),
                   head_weight=classifier.head.weight.detach().numpy(),
                   head_bias=classifier.head.bias.detach().numpy(), seed=spec.seed)
    scores = fit_scores(data, {})

    def scored(images: np.ndarray) -> dict[str, np.ndarray]:
        f, z = extract(classifier, images)
        return new_classes.score_rows(scores, z, f)

    ref = scored(calibration[references])
    test = record.part(record.dataset(), "test")
    id_scores = scored(prep.apply(test.images))
    unknown = load_dataset(args.unknown).select_classes([int(c) for c in args.classes.split(",")])
    unknown_scores = scored(prep.apply(unknown.images))

    started = time.perf_counter()
    held = new_classes.held_out_classes(cal_labels[references], len(spec.class_names), args.seed, args.holdouts)
    worlds = [new_classes.retrained_world(c, spec.backbone, classifier.feature_dim, bank_images, bank_labels,
                                          calibration[references], cal_labels[references], scores,
                                          lambda d, p: fit_scores(d, p), args.epochs or len(record.history), args.seed)
              for c in held]
    print(f"held out {held} in {time.perf_counter() - started:.0f} s; true unknown: {args.unknown} classes "
          f"{args.classes} ({len(unknown)} images) against {len(test)} ID test images")

    rows = []
    for size in (1, 2, 3):
        for subset in itertools.combinations(scores, size):
            for comb in COMBINATIONS if size > 1 else COMBINATIONS[:1]:
                def fused(side: dict, refs: dict) -> np.ndarray:
                    return combine(np.stack([log_p_values(refs[n], side[n]) for n in subset], 1), comb)
                true = auroc(fused(id_scores, ref), fused(unknown_scores, ref))
                ids = np.concatenate([combine(np.stack([np.log(leave_one_out_p_values(w.references[n]))
                                                        for n in subset], 1), comb) for w in worlds])
                new = np.concatenate([fused(w.new, w.references) for w in worlds])
                rows.append((auroc(ids, new), true, comb, "+".join(subset)))
    rows.sort(reverse=True)
    print(f"{'held-out AUROC':>15}{'true AUROC':>12}  candidate")
    for held_auroc, true, comb, names in rows[:15]:
        print(f"{100 * held_auroc:>15.2f}{100 * true:>12.2f}  {comb}({names})")
    print("single scores:")
    for held_auroc, true, _, names in (r for r in rows if "+" not in r[3]):
        print(f"{100 * held_auroc:>15.2f}{100 * true:>12.2f}  {names}")
    rho = spearmanr([r[0] for r in rows], [r[1] for r in rows]).correlation
    best = max(rows, key=lambda r: r[1])
    print(f"Spearman correlation of the two rankings: {rho:.2f}; best true: {best[2]}({best[3]}) {100 * best[1]:.2f}, "
          f"chosen by the held-out signal alone: {rows[0][2]}({rows[0][3]}) {100 * rows[0][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Closed-loop open-set active-learning benchmark on MNIST / Fashion-MNIST, through the real harvest.

Protocol (the method note ``../shared/methods/open_set_al.md``, "reference run"):

- known classes: MNIST digits 0-5 (K = 6); seed set: 10 labeled images per known class (60 labels);
- pool of 20,000: 8,000 known-class MNIST train images + 6,000 MNIST train digits 6-9 + 6,000 Fashion-MNIST
  train images (14 unknown classes: digits 6-9 and the 10 Fashion-MNIST classes);
- each round LeNet-5 is retrained from scratch on the labeled images: the known classes, and (from the round
  after the first unknown was labeled) a (K+1)-th "unknown" class made of every image labeled unknown so far,
  as LfOSA's detector is trained; the served model keeps the K known outputs (the unknown output's row of the
  head is dropped), so the gateway, the scores and every strategy see a K-class model whose features have
  learned what the labeled unknowns look like (what ``oodguard train --outlier-data`` does with the records
  labeled "not relevant"). ``--no-train-unknown`` trains on the known images only (the
  protocol before: the harvested "unknown" labels then reach only the harvest's own (K+1)-way head). Its
  fused head (every registered OOD score) is fitted on the labeled known-class images; the unlabeled pool goes into a fresh SQLite query queue with the
  model's logits, features and scores; a model-repository version holds the round's calibration.json;
  ``oodguard.harvest.job.run_harvest`` picks B = 100 (claims, exports PNG/manifest/tasks.json, marks sent);
- an oracle labels the picks from ground truth: known-class picks join the labeled (training) set, unknown
  picks are labeled "unknown"; the round's queue also holds every labeled record (seed set included) as
  ``sent``, and a plain CSV ``record_id,label`` of their labels goes to the harvest (``labels=``), as label
  exports of earlier rounds do in production: the (K+1)-way detector of lfosa, jsosal and open-quota trains
  on the labeled knowns and unknowns (:mod:`oodguard.harvest.labeled`);
- 6 rounds (660 labels spent), 3 seeds. Per round: known-class test accuracy (MNIST test digits 0-5), query
  precision (known share of the batch), recall (known picks so far / 8,000 known pool images; the seed set is
  not in the pool), unknown classes discovered (of 14), and the first round by which all were discovered.

Options closer to production (defaults: the protocol above):

- ``--unknown-data SPEC``: the unknown part of the pool from any dataset spec ``load_dataset`` reads (IDX,
  ``.npz`` with ``images``/``labels``/``class_names``, a folder) instead of MNIST 6-9 + Fashion-MNIST; its
  labels are the unknown classes (``bench/unknown_pools.py`` writes a synthetic one);
- ``--queue flagged --sample-fraction F``: queue only what the gateway would — the items its SISOMe threshold
  flags, plus a seeded fraction F of the others (``unflagged_sample_fraction``) — instead of the whole pool;
  what is not queued stays unlabeled and may be queued in a later round;
- ``--calibration-in-budget``: the held-out calibration images count as labels spent in every "labels" figure;
- ``--min-epochs E``: training steps grow with the labeled set, ``max(--steps, ceil(E · n / batch))``;
- ``--final-trainings R`` (default 5): the accuracy after the last round is the mean over R trainings from
  scratch of the final labeled set (seeds (seed, round) then R−1 others). One training's accuracy varies by about
  ±0.5 points with its initialisation and batch order alone, as large as the differences between strategies
  the per-seed targets ask about; the labeled set is what a strategy chose, so its accuracy is estimated over
  trainings. The first training's figure is kept as ``accuracy_first`` (``--final-trainings 1``: as before);
- a strategy entry may carry parameters: ``aloe:score=energy``, ``jsosal:k=3+head=mav`` (``+`` between pairs);
  the entry is the run's name in the report.

Simplifications, to run in < 20 minutes on 2 CPU cores (all recorded in report.json under "protocol"):

- calibration.json is built directly (``Calibration`` + ``export.calibrate.fit_thresholds``) from the torch
  fused module's scores on a fixed held-out labeled split of known-class MNIST train images (50 per class,
  disjoint from pool and seed set, not counted as labels spent unless ``--calibration-in-budget``); no ONNX
  export, no model.onnx;
- the pool's logits/features/scores come from the same torch module, in batches;
- training is a fixed number of Adam steps (``--steps`` mini-batches of ``--batch-size``) whatever the labeled
  set size (unless ``--min-epochs``), seeded by (seed, round), so a round's model is the same for every
  strategy given the same labels;
- round 0 (seed-set model, its calibration and its filled queue) is built once per seed and copied for each
  strategy (same data, same model, so the same queue).

Writes report.md, report.json and open_set.png to --out (plotting in ``open_set_report.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oodguard.datasets import data_root
from oodguard.harvest.strategies.base import param_value

sys.path.insert(0, str(Path(__file__).resolve().parent))

KNOWN_CLASSES = (0, 1, 2, 3, 4, 5)
UNKNOWN_DIGITS = (6, 7, 8, 9)
FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
UNKNOWN_NAMES = tuple(f"digit-{d}" for d in UNKNOWN_DIGITS) + tuple(f"fashion-{n}" for n in FASHION_NAMES)
DEFAULT_STRATEGIES = ("random", "entropy", "sisom", "sisom-diverse", "aloe", "lfosa", "jsosal", "open-quota")
MODEL_NAME = "openset"

#: the note's reference run (LeNet-5, same protocol): (accuracy mean, std, mean query precision)
REFERENCE = {
    "random": (95.2, 0.6, 0.41), "entropy": (94.0, 1.6, 0.07), "sisom": (94.4, 1.0, 0.08),
    "aloe": (93.3, 0.3, 0.08), "jsosal": (90.7, 1.4, 0.90), "lfosa": (89.0, 0.1, 0.95),
}
REFERENCE_NOTES = {"aloe": "energy flags in the reference; gradnorm (the strategy's default) here",
                   "jsosal": "a = 4B in both"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def quiet(_line: str) -> None:
    pass


def parse_seeds(text: str) -> list[int]:
    """``"3"`` → seeds 0, 1, 2; ``"0,4"`` → seeds 0 and 4."""
    text = str(text).strip()
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(int(text)))


def parse_args(argv=None):
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--data", type=Path, default=data_root(), help="folder with mnist/ and fashion_mnist/ (default: $OODGUARD_DATA, else ../shared/data)")
    p.add_argument("--out", type=Path, default=root / "runs" / "bench" / "open-set-report", help="results folder")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma-separated harvest strategies")
    p.add_argument("--seeds", default="3", help="N (seeds 0..N-1) or a comma-separated list")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--budget", type=int, default=100, help="B, labels per round")
    p.add_argument("--seed-per-class", type=int, default=10)
    p.add_argument("--pool-known", type=int, default=8000)
    p.add_argument("--pool-mnist-unknown", type=int, default=6000)
    p.add_argument("--pool-fashion", type=int, default=6000)
    p.add_argument("--unknown-data", metavar="SPEC",
                   help="unknown part of the pool from this dataset (IDX, .npz, folder; its labels = unknown classes), "
                        "--pool-mnist-unknown + --pool-fashion images drawn; default MNIST 6-9 + Fashion-MNIST")
    p.add_argument("--queue", choices=["all", "flagged"], default="all",
                   help="queue every unlabeled pool item (default) or, as the gateway does, the flagged ones plus "
                        "--sample-fraction of the others")
    p.add_argument("--sample-fraction", type=float, default=0.1, help="with --queue flagged: unflagged share queued")
    p.add_argument("--calibration-in-budget", action="store_true",
                   help="count the held-out calibration images as labels spent")
    p.add_argument("--min-epochs", type=float, default=0.0,
                   help="training steps = max(--steps, ceil(E x labeled / batch)) (0: fixed --steps)")
    p.add_argument("--final-trainings", type=int, default=5,
                   help="trainings from scratch of the final labeled set whose mean accuracy is reported (default 5; "
                        "1: one training, as the other rounds)")
    p.add_argument("--train-unknown", action=argparse.BooleanOptionalAction, default=True,
                   help="train the CNN with a (K+1)-th 'unknown' class on the images labeled unknown so far, then "
                        "serve its K known outputs (default on; --no-train-unknown: known images only)")
    p.add_argument("--calibration-per-class", type=int, default=50, help="held-out labeled known images per class (thresholds)")
    p.add_argument("--test-size", type=int, default=0, help="known-class test images used (0 = all MNIST test digits 0-5)")
    p.add_argument("--steps", type=int, default=300, help="Adam steps per training (any labeled-set size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--score-batch", type=int, default=4096, help="batch size of the fused module over the pool")
    p.add_argument("--workers", type=int, default=2, help="processes; (seed, strategy) runs are independent")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: LeNet-5 at these batch sizes gains nothing from more, and "
                        "loses a lot on a loaded machine)")
    p.add_argument("--keep-queues", action="store_true", help="keep each round's SQLite queue under --out/work")
    args = p.parse_args(argv)
    if args.final_trainings < 1:
        p.error(f"--final-trainings must be at least 1, got {args.final_trainings}")
    return args


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    mnist_train: tuple[np.ndarray, np.ndarray]
    mnist_test: tuple[np.ndarray, np.ndarray]
    fashion_train: tuple[np.ndarray, np.ndarray]
    unknown: tuple[np.ndarray, np.ndarray, tuple[str, ...]] | None = None  # --unknown-data: images, labels, names


def load_unknown(spec: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """--unknown-data: 28x28 grayscale images, labels 0..U-1 (none: one class) and the class names."""
    from oodguard.datasets import load_dataset

    ds = load_dataset(spec)
    images = ds.images[..., 0] if ds.images.ndim == 4 else ds.images
    if images.shape[1:] != (28, 28) or (ds.images.ndim == 4 and ds.images.shape[-1] != 1):
        raise SystemExit(f"--unknown-data {spec}: images must be 28x28 grayscale, got {ds.images.shape[1:]}")
    raw = np.zeros(len(images), np.int64) if ds.labels is None else ds.labels
    values, labels = np.unique(raw, return_inverse=True)
    names = tuple(ds.class_names[v] if ds.class_names and v < len(ds.class_names) else f"unknown-{v}" for v in values)
    return images, labels.astype(np.int64), names


def load_data(root: Path, unknown: str | None = None) -> Data:
    from oodguard.datasets import load_dataset

    def pair(path: Path):
        ds = load_dataset(path)
        return ds.images, ds.labels

    return Data(pair(root / "mnist" / "train-images-idx3-ubyte.gz"), pair(root / "mnist" / "t10k-images-idx3-ubyte.gz"),
                pair(root / "fashion_mnist" / "train-images-idx3-ubyte.gz"), load_unknown(unknown) if unknown else None)


@dataclass
class Split:
    """One seed's draw. ``pool_class``: known class 0..5, or −1; ``pool_unknown``: index into ``unknown_names``
    (UNKNOWN_NAMES, or --unknown-data's classes), or −1."""

    pool_images: np.ndarray
    pool_class: np.ndarray
    pool_unknown: np.ndarray
    seed_images: np.ndarray
    seed_labels: np.ndarray
    calib_images: np.ndarray
    calib_labels: np.ndarray
    unknown_names: tuple[str, ...] = UNKNOWN_NAMES


def make_split(data: Data, seed: int, args) -> Split:
    rng = np.random.default_rng(10_000 + seed)
    images, labels = data.mnist_train
    known_idx = rng.permutation(np.flatnonzero(np.isin(labels, KNOWN_CLASSES)))
    seed_idx, calib_idx, taken = [], [], np.zeros(len(labels), bool)
    for c in KNOWN_CLASSES:
        members = known_idx[labels[known_idx] == c]
        seed_idx.extend(members[:args.seed_per_class])
        calib_idx.extend(members[args.seed_per_class:args.seed_per_class + args.calibration_per_class])
    taken[seed_idx] = taken[calib_idx] = True
    rest = known_idx[~taken[known_idx]]
    pool_known = np.sort(rest[:args.pool_known])
    if data.unknown is None:
        unknown_idx = np.sort(rng.choice(np.flatnonzero(np.isin(labels, UNKNOWN_DIGITS)), args.pool_mnist_unknown, replace=False))
        f_images, f_labels = data.fashion_train
        fashion_idx = np.sort(rng.choice(len(f_labels), args.pool_fashion, replace=False))
        unknown_images = np.concatenate([images[unknown_idx], f_images[fashion_idx]])
        unknown_class = np.concatenate([labels[unknown_idx] - UNKNOWN_DIGITS[0], len(UNKNOWN_DIGITS) + f_labels[fashion_idx]])
        names = UNKNOWN_NAMES
    else:
        u_images, u_labels, names = data.unknown
        size = args.pool_mnist_unknown + args.pool_fashion
        if size > len(u_images):
            raise SystemExit(f"--unknown-data has {len(u_images)} images, the pool wants {size}")
        chosen = np.sort(rng.choice(len(u_images), size, replace=False))
        unknown_images, unknown_class = u_images[chosen], u_labels[chosen]
    pool_images = np.concatenate([images[pool_known], unknown_images])
    pool_class = np.concatenate([labels[pool_known], np.full(len(unknown_images), -1)]).astype(np.int64)
    pool_unknown = np.concatenate([np.full(len(pool_known), -1), unknown_class]).astype(np.int64)
    seed_idx, calib_idx = np.array(seed_idx), np.array(calib_idx)
    return Split(pool_images, pool_class, pool_unknown, images[seed_idx], labels[seed_idx].astype(np.int64),
                 images[calib_idx], labels[calib_idx].astype(np.int64), names)


# ----------------------------------------------------------------------------------------- the model


@dataclass
class Preproc:
    mean: float
    std: float

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,28,28] → float32 [N,1,28,28]; identical to ``Preprocessing.apply`` for 28x28 grayscale."""
        x = images.astype(np.float32) / 255.0
        x = (x - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(x[:, None], dtype=np.float32)

    def preprocessing(self):
        from oodguard.preprocess import Preprocessing

        return Preprocessing(1, 28, 28, (self.mean,), (self.std,))


def train_model(images: np.ndarray, labels: np.ndarray, prep: Preproc, seed: int, args, unknown_x=None):
    import torch

    from oodguard.export.backbones import Classifier, LeNet5
    from oodguard.export.train import train_classifier
    from oodguard.export.training_job import without_outlier_output

    torch.manual_seed(seed)
    k = len(KNOWN_CLASSES)
    with_unknown = bool(args.train_unknown and unknown_x is not None and len(unknown_x))
    model = Classifier(LeNet5(), k + 1 if with_unknown else k)  # round 0 (nothing labeled unknown): as before
    if with_unknown:
        images = np.concatenate([images, unknown_x])
        labels = np.concatenate([labels, np.full(len(unknown_x), k, dtype=labels.dtype)])
    n = len(labels)
    steps = max(args.steps, math.ceil(args.min_epochs * n / args.batch_size))
    epochs = max(1, math.ceil(steps * args.batch_size / n))
    train_classifier(model, prep(images), labels, epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                     progress=None)
    # serve the K known outputs (as `oodguard train --outlier-data`): the backbone learned from the unknowns too
    return without_outlier_output(model, k) if with_unknown else model


def fused_module(model, images: np.ndarray, labels: np.ndarray, prep: Preproc, seed: int):
    """Fit every registered score on the labeled set (bank = all of it), as export does, → FusedModel."""
    from oodguard.export import fused
    from oodguard.export.fitting import fit_scores
    from oodguard.export.scores import FitData
    from oodguard.export.synthetic import validation_ood
    from oodguard.export.train import extract

    x = prep(images)
    features, logits = extract(model, x)
    ood = validation_ood(x, labels, 1000, seed)
    ood_features, ood_logits = extract(model, ood.images)
    data = FitData(features=features, logits=logits, labels=labels, bank=np.arange(len(labels)),
                   head_weight=model.head.weight.detach().numpy(), head_bias=model.head.bias.detach().numpy(),
                   validation_ood_features=ood_features, validation_ood_logits=ood_logits, seed=seed,
                   validation_ood_groups=ood.groups)
    return fused.FusedModel(model, fit_scores(data, {})).eval()


def run_fused(module, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    from oodguard.export.fused import run_torch

    parts = [run_torch(module, x[i:i + batch]) for i in range(0, len(x), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def accuracy(model, x_test: np.ndarray, y_test: np.ndarray) -> float:
    from oodguard.export.train import predict_logits

    return float((predict_logits(model, x_test, batch_size=2048).argmax(axis=1) == y_test).mean())


def write_calibration(module, calib_x: np.ndarray, prep: Preproc, repository: Path, version: int, n_bank: int) -> Path:
    """calibration.json of version ``version``: thresholds at 95% TPR from the torch module's scores on the
    held-out labeled split (no ONNX export in this benchmark)."""
    from oodguard.calibration import Calibration
    from oodguard.export import fused
    from oodguard.export.calibrate import fit_thresholds
    from oodguard.repository import CALIBRATION_FILE, INPUT_NAME, version_dir

    outputs = fused.run_torch(module, calib_x)
    calibration = Calibration(
        model={
            "name": MODEL_NAME, "version": version, "class_names": [str(c) for c in KNOWN_CLASSES],
            "input": {"name": INPUT_NAME, "shape": [1, 28, 28], "dtype": "float32"},
            "preprocessing": prep.preprocessing().to_dict(), "outputs": fused.output_names(module.score_names),
            "scores": module.score_names,
            "score_params": {name: score.metadata() for name, score in module.scores.items()},
            "bank_size": n_bank, "backbone": "lenet5",
            "note": "open-set benchmark: thresholds from the torch fused module, no model.onnx exported",
        },
        thresholds=fit_thresholds(outputs, module.score_names, 0.95),
        data={"source": "held-out labeled MNIST train digits 0-5", "n": len(calib_x), "target_tpr": 0.95},
    )
    folder = version_dir(repository, MODEL_NAME, version)
    folder.mkdir(parents=True, exist_ok=True)
    calibration.save(folder / CALIBRATION_FILE)
    return folder / CALIBRATION_FILE


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class RoundZero:
    """What every strategy shares for one seed: the seed-set model's accuracy and its filled queue."""

    accuracy: float
    queue_path: Path
    calibration_path: Path
    id_to_index: dict[str, int]
    seconds: float
    test_images: int


@dataclass
class Run:
    strategy: str
    seed: int
    rounds: list[dict] = field(default_factory=list)
    known_per_class: list[int] = field(default_factory=list)
    discovered: list[str] = field(default_factory=list)
    unknown_classes: int = 0
    seconds: float = 0.0


def model_round(split: Split, labeled_x: np.ndarray, labeled_y: np.ndarray, unknown_x: np.ndarray, unlabeled: np.ndarray,
                seed: int, round_no: int, work: Path, repository: Path, prep: Preproc, test, args, fill: bool = True):
    """Train round ``round_no``'s model on the labeled knowns; its test accuracies (one; on the last round, where
    ``fill`` is off, one per --final-trainings training of the same set); then (``fill``) calibration version and
    the filled queue (with the labeled records, knowns and ``unknown_x``, as sent, and their labels file)."""
    t0 = time.perf_counter()
    model = train_model(labeled_x, labeled_y, prep, seed * 1000 + round_no, args, unknown_x)
    t_train = time.perf_counter() - t0
    accuracies = [accuracy(model, *test)]
    if not fill:  # the last round: its labeled set's accuracy over --final-trainings trainings
        accuracies += [accuracy(train_model(labeled_x, labeled_y, prep, seed * 1000 + round_no + 100_000 * j, args,
                                            unknown_x), *test) for j in range(1, args.final_trainings)]
        return accuracies, None, None, {"train": t_train}
    t1 = time.perf_counter()
    module = fused_module(model, labeled_x, labeled_y, prep, seed * 1000 + round_no)
    version = round_no + 1
    cal_path = write_calibration(module, prep(split.calib_images), prep, repository, version, len(labeled_y))
    pool_x = prep(split.pool_images[unlabeled])
    outputs = run_fused(module, pool_x, args.score_batch)
    done_x = prep(np.concatenate([labeled_x, unknown_x]))
    done = Labeled(done_x, run_fused(module, done_x, args.score_batch),
                   [str(c) for c in labeled_y] + [UNKNOWN_LABEL] * len(unknown_x))
    t2 = time.perf_counter()
    queue_path = work / f"queue-round{round_no}.sqlite"
    rng = np.random.default_rng(20_000 + seed * 1000 + round_no)
    mapping = fill_queue(queue_path, version, pool_x, unlabeled, outputs, module.score_names, cal_path, done,
                         args.queue, args.sample_fraction, rng)
    t3 = time.perf_counter()
    return accuracies, queue_path, mapping, {"train": t_train, "scores": t2 - t1, "queue": t3 - t2}


UNKNOWN_LABEL = "unknown"


@dataclass
class Labeled:
    """The labeled records of a round: model inputs, the fused module's outputs, labels (class name or unknown)."""

    x: np.ndarray
    outputs: dict
    labels: list[str]


def labels_path(queue_path: Path) -> Path:
    """The plain CSV ``record_id,label`` of the labeled records in the queue at ``queue_path``."""
    return queue_path.with_suffix(".labels.csv")


def _records(x: np.ndarray, outputs: dict, score_names, version: int, threshold: float, tags: list[str], sampled=None):
    from oodguard.queues.base import NewRecord

    score_rows = np.stack([outputs[s] for s in score_names], axis=1).astype(np.float64).tolist()
    records = []
    for j, tag in enumerate(tags):
        flagged = bool(outputs["sisome"][j] > threshold)
        records.append(NewRecord(model=MODEL_NAME, version=version, input=x[j], logits=outputs["logits"][j],
                                 features=outputs["features"][j], scores=dict(zip(score_names, score_rows[j])),
                                 decision={"ood": flagged, "deciding": ["sisome"]}, flagged=flagged,
                                 request_id=tag, metadata={"pool_index": tag}))
    return records


def fill_queue(queue_path: Path, version: int, pool_x: np.ndarray, unlabeled: np.ndarray, outputs: dict, score_names,
               cal_path: Path, labeled: Labeled, mode: str = "all", sample_fraction: float = 0.0,
               rng: np.random.Generator | None = None) -> dict[str, int]:
    """A fresh SQLite queue with one pending record per queued unlabeled pool item (``pool_x`` rows ↔
    ``unlabeled`` pool indices), as the gateway queues them — every item (``mode="all"``) or the flagged ones
    and a ``sample_fraction`` of the others drawn with ``rng`` (``"flagged"``) — plus the labeled records as
    ``sent`` and their labels file (:func:`labels_path`); returns pending record id → pool index."""
    from oodguard.calibration import Calibration
    from oodguard.queues.sqlite import SQLiteQueue

    threshold = Calibration.load(cal_path).thresholds["sisome"].threshold
    keep = np.ones(len(unlabeled), bool)
    if mode == "flagged":
        keep = (outputs["sisome"] > threshold) | (rng.random(len(unlabeled)) < sample_fraction)
    rows = np.flatnonzero(keep)
    queue = SQLiteQueue(queue_path, max_size=len(rows) + len(labeled.labels) + 1)
    try:
        sub = {name: values[rows] for name, values in outputs.items()}
        ids = queue.put(_records(pool_x[rows], sub, score_names, version, threshold, [str(i) for i in unlabeled[rows]]))
        done = queue.put(_records(labeled.x, labeled.outputs, score_names, version, threshold,
                                  [f"labeled-{j}" for j in range(len(labeled.labels))]))
        if any(i is None for i in ids + done) or len(queue.claim_ids(done)) != len(done):
            raise RuntimeError("the queue refused records")
        queue.mark_sent(done)
    finally:
        queue.close()
    labels_path(queue_path).write_text("record_id,label\n" + "".join(f"{i},{y}\n" for i, y in zip(done, labeled.labels)))
    return dict(zip(ids, unlabeled[rows].tolist()))


def test_set(data: Data, prep: Preproc, size: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = data.mnist_test
    keep = np.flatnonzero(np.isin(labels, KNOWN_CLASSES))
    if size and size < len(keep):
        keep = np.sort(np.random.default_rng(0).choice(keep, size, replace=False))
    return prep(images[keep]), labels[keep].astype(np.int64)


def no_images() -> np.ndarray:
    return np.zeros((0, 28, 28), np.uint8)


def parse_entry(entry: str) -> tuple[str, dict]:
    """``"aloe:score=energy+tpr=0.9"`` → ("aloe", {"score": "energy", "tpr": 0.9}) (numbers parsed)."""
    name, _, rest = entry.partition(":")
    params = {}
    for pair in filter(None, rest.split("+")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"strategy entry {entry!r}: expected NAME:KEY=VALUE+KEY=VALUE")
        params[key] = param_value(value)
    return name, params


def round_zero(split: Split, seed: int, work: Path, prep: Preproc, test, args) -> RoundZero:
    start = time.perf_counter()
    folder = work / f"seed{seed}" / "round0"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    unlabeled = np.arange(len(split.pool_class))
    [acc], queue_path, mapping, t = model_round(split, split.seed_images, split.seed_labels, no_images(), unlabeled,
                                                seed, 0, folder, folder / "repo", prep, test, args)
    seconds = time.perf_counter() - start
    log(f"seed {seed} round 0: {len(split.seed_labels)} labels, accuracy {acc:.4f}; queue of {len(mapping)} "
        f"(train {t['train']:.1f}s, scores {t['scores']:.1f}s, queue {t['queue']:.1f}s)")
    cal = folder / "repo" / MODEL_NAME / "1" / "calibration.json"
    return RoundZero(acc, queue_path, cal, mapping, seconds, len(test[1]))


def run_strategy(strategy: str, seed: int, split: Split, zero: RoundZero, work: Path, prep: Preproc, test, args) -> Run:
    from oodguard.harvest.job import run_harvest
    from oodguard.repository import CALIBRATION_FILE, version_dir
    from oodguard.queues.sqlite import SQLiteQueue

    start = time.perf_counter()
    folder = work / f"seed{seed}" / strategy
    if folder.exists():
        shutil.rmtree(folder)
    repository = folder / "repo"
    version_dir(repository, MODEL_NAME, 1).mkdir(parents=True)
    shutil.copyfile(zero.calibration_path, version_dir(repository, MODEL_NAME, 1) / CALIBRATION_FILE)
    queue_path = folder / "queue-round0.sqlite"
    shutil.copyfile(zero.queue_path, queue_path)
    shutil.copyfile(labels_path(zero.queue_path), labels_path(queue_path))
    mapping = zero.id_to_index
    name, params = parse_entry(strategy)
    spent_before = len(split.calib_labels) if args.calibration_in_budget else 0
    n_unknown_classes = len(split.unknown_names)

    n_known_pool = int((split.pool_class >= 0).sum())
    unlabeled = np.ones(len(split.pool_class), bool)
    labeled_x, labeled_y, unknown_x = split.seed_images, split.seed_labels, no_images()
    discovered: set[int] = set()
    known_picked = 0
    run = Run(strategy, seed)
    run.rounds.append({"round": 0, "labels": spent_before + len(labeled_y), "accuracy": zero.accuracy, "precision": None,
                       "recall": 0.0, "discovered": 0, "known_picked": 0, "unknown_picked": 0, "queued": len(mapping)})
    for r in range(args.rounds):
        t0 = time.perf_counter()
        queue = SQLiteQueue(queue_path, max_size=len(mapping) + 1)
        try:
            before = queue.stats().sent
            result = run_harvest(queue, name, args.budget, folder / f"harvest-round{r}", repository,
                                 seed=seed * 1000 + r, progress=quiet, params=params, labels=[labels_path(queue_path)])
            sent = queue.stats().sent - before
        finally:
            queue.close()
        if not args.keep_queues:
            queue_path.unlink()
            labels_path(queue_path).unlink()
        t_harvest = time.perf_counter() - t0
        manifest = [json.loads(line) for line in (folder / f"harvest-round{r}" / "manifest.jsonl").read_text().splitlines()]
        repeats = sum(len(m.get("duplicate_ids", [])) for m in manifest)  # byte-identical inputs, sent with their pick
        if [m["record_id"] for m in manifest] != result.ids or sent != len(result.ids) + repeats:
            raise RuntimeError(f"{strategy} seed {seed} round {r}: manifest / sent records disagree with the harvest")
        # the oracle: ground truth of the picked pool items
        picks = np.array([mapping[i] for i in result.ids], dtype=np.int64)
        if not unlabeled[picks].all():
            raise RuntimeError(f"{strategy} seed {seed} round {r}: a pool item was harvested twice")
        unlabeled[picks] = False
        is_known = split.pool_class[picks] >= 0
        known_picked += int(is_known.sum())
        discovered |= set(split.pool_unknown[picks[~is_known]].tolist())
        labeled_x = np.concatenate([labeled_x, split.pool_images[picks[is_known]]])
        labeled_y = np.concatenate([labeled_y, split.pool_class[picks[is_known]]])
        unknown_x = np.concatenate([unknown_x, split.pool_images[picks[~is_known]]])

        fill = r + 1 < args.rounds
        accuracies, queue_path, new_mapping, t = model_round(split, labeled_x, labeled_y, unknown_x,
                                                             np.flatnonzero(unlabeled), seed, r + 1, folder, repository,
                                                             prep, test, args, fill=fill)
        acc = float(np.mean(accuracies))
        row = {"round": r + 1, "labels": spent_before + len(labeled_y) + len(unknown_x), "accuracy": acc,
               **({"accuracy_first": accuracies[0], "accuracies": accuracies} if not fill else {}),
               "precision": float(is_known.mean()), "recall": known_picked / n_known_pool, "discovered": len(discovered),
               "known_picked": int(is_known.sum()), "unknown_picked": int((~is_known).sum()),
               "queued": len(new_mapping) if fill else None, "seconds": {"harvest": t_harvest, **t}}
        if fill:
            mapping = new_mapping
        run.rounds.append(row)
        log(f"{strategy:14s} seed {seed} round {r + 1}/{args.rounds}: {row['labels']} labels, acc {acc:.4f}, "
            f"precision {row['precision']:.2f}, recall {row['recall']:.4f}, discovered {len(discovered)}/{n_unknown_classes}  "
            f"(harvest {t_harvest:.1f}s, train {t['train']:.1f}s" + (f", scores {t['scores']:.1f}s, queue {t['queue']:.1f}s"
                                                                       if fill else "") + ")")
    run.known_per_class = np.bincount(labeled_y, minlength=len(KNOWN_CLASSES)).tolist()
    run.discovered = [split.unknown_names[i] for i in sorted(discovered)]
    run.unknown_classes = n_unknown_classes
    run.seconds = time.perf_counter() - start
    return run


# ---------------------------------------------------------------------------------------- aggregation


def discovery_round(run: Run) -> int | None:
    """The first round after which every unknown class had been picked at least once (None: never)."""
    return next((x["round"] for x in run.rounds if x["discovered"] == run.unknown_classes), None)


def summarise(runs: list[Run], strategies: list[str]) -> list[dict]:
    """One row per strategy entry; per-seed figures in seed order, and (with ``random`` in the run) each seed's
    accuracy gain over random on the same seed."""
    rows = []
    random_acc = {r.seed: r.rounds[-1]["accuracy"] * 100 for r in runs if r.strategy == "random"}
    random_first = {r.seed: r.rounds[-1].get("accuracy_first", r.rounds[-1]["accuracy"]) * 100
                    for r in runs if r.strategy == "random"}
    for s in strategies:
        mine = [r for r in runs if r.strategy == s]
        if not mine:
            continue
        final = [r.rounds[-1] for r in mine]
        acc = np.array([f["accuracy"] for f in final]) * 100
        precision = [np.mean([x["precision"] for x in r.rounds[1:]]) for r in mine]
        per_class_min = [min(r.known_per_class) for r in mine]
        first = np.array([f.get("accuracy_first", f["accuracy"]) for f in final]) * 100
        with_random = all(r.seed in random_acc for r in mine)
        gain = [a - random_acc[r.seed] for a, r in zip(acc, mine)] if with_random else None
        gain_first = [a - random_first[r.seed] for a, r in zip(first, mine)] if with_random else None
        rows.append({
            "seeds_list": [r.seed for r in mine], "accuracy_per_seed": acc.tolist(),
            "precision_per_seed": [float(x) for x in precision], "min_known_per_seed": per_class_min,
            "gain_over_random_per_seed": gain, "accuracy_first_per_seed": first.tolist(),
            "gain_first_over_random_per_seed": gain_first, "discovery_round_per_seed": [discovery_round(r) for r in mine],
            "unknown_classes": mine[0].unknown_classes,
            "strategy": s, "seeds": len(mine), "labels": final[0]["labels"],
            "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "precision_mean": float(np.mean(precision)), "recall_mean": float(np.mean([f["recall"] for f in final])),
            "discovered_mean": float(np.mean([f["discovered"] for f in final])),
            "discovered_min": int(min(f["discovered"] for f in final)), "discovered_max": int(max(f["discovered"] for f in final)),
            "min_known_per_class": int(min(per_class_min)),
            "reference": REFERENCE.get(s),
        })
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Open-set active learning on MNIST / Fashion-MNIST, through the real harvest",
        "",
        f"Known digits 0-5; pool {meta['pool_size']} ({meta['pool']}; queue: {meta['queue']}); seed set {meta['seed_labels']} labels; "
        f"B = {meta['budget']}, {meta['rounds']} rounds, seeds {meta['seeds']}; LeNet-5 retrained from scratch each round "
        f"({meta['steps']} Adam steps of batch {meta['batch_size']}"
        + ("; the images labeled unknown so far trained as a 7th class, K known outputs served" if meta.get("train_unknown") else "")
        + f"). Total run time {meta['total_seconds'] / 60:.1f} min.",
        "",
        "| strategy | known-class accuracy after {} labels (%) | per seed (gain over random) | mean query precision "
        "(per seed) | recall (known labeled / known in pool) | unknown classes discovered (of {}) | round all were "
        "discovered, per seed | fewest labeled images of a known class (per seed) | reference accuracy / precision | "
        "first training only: per seed (gain) |".format(
            rows[0]["labels"] if rows else "?", rows[0]["unknown_classes"] if rows else "?"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = r["reference"]
        ref_text = f"{ref[0]:.1f} ± {ref[1]:.1f} / {ref[2]:.0%}" if ref else "—"
        gains = r["gain_over_random_per_seed"] or [None] * len(r["accuracy_per_seed"])
        per_seed = ", ".join(f"{a:.1f}" + (f" ({g:+.1f})" if g is not None else "") for a, g in zip(r["accuracy_per_seed"], gains))
        gains_first = r.get("gain_first_over_random_per_seed") or [None] * len(r["accuracy_per_seed"])
        first = ", ".join(f"{a:.1f}" + (f" ({g:+.1f})" if g is not None else "")
                          for a, g in zip(r.get("accuracy_first_per_seed", r["accuracy_per_seed"]), gains_first))
        lines.append(f"| {r['strategy']} | {r['accuracy_mean']:.1f} ± {r['accuracy_std']:.1f} | {per_seed} | "
                     f"{r['precision_mean']:.0%} ({', '.join(f'{p:.2f}' for p in r['precision_per_seed'])}) | "
                     f"{r['recall_mean']:.3f} | {r['discovered_mean']:.1f} ({r['discovered_min']}–{r['discovered_max']}) | "
                     f"{', '.join('—' if d is None else str(d) for d in r['discovery_round_per_seed'])} | "
                     f"{r['min_known_per_class']} ({', '.join(map(str, r['min_known_per_seed']))}) | {ref_text} | {first} |")
    lines += [
        "",
        "Accuracy: mean ± sample std over seeds, on MNIST test digits 0-5; each seed's figure is the mean over "
        f"{meta.get('final_trainings', 1)} trainings from scratch of its final labeled set (the first training alone: "
        "the last column). Precision: known share of each batch, averaged "
        "over rounds and seeds. Recall and discovery: after the last round, mean over seeds (discovery range in brackets). "
        "Fewest labeled images of a known class: minimum over classes and seeds of the final labeled set (seed set included). "
        "Reference: the note's reference run (" + "; ".join(f"{k}: {v}" for k, v in REFERENCE_NOTES.items()) + ").",
        "",
        "Protocol choices: " + " ".join(meta["choices"]),
        "",
        "![accuracy, precision and discovery vs labels spent](open_set.png)",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main

_STATE: dict = {}


def _state(args) -> dict:
    """Per process: the data, the preprocessing, the test set (and torch's thread count), loaded once."""
    if not _STATE:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        data = load_data(args.data, args.unknown_data)
        train_images = data.mnist_train[0][np.isin(data.mnist_train[1], KNOWN_CLASSES)].astype(np.float32) / 255.0
        prep = Preproc(float(train_images.mean()), float(train_images.std()))
        del train_images
        _STATE.update(data=data, prep=prep, test=test_set(data, prep, args.test_size), splits={})
    return _STATE


def _split(args, seed: int) -> Split:
    state = _state(args)
    if seed not in state["splits"]:
        state["splits"][seed] = make_split(state["data"], seed, args)
    return state["splits"][seed]


def job_round_zero(args, seed: int) -> RoundZero:
    state = _state(args)
    return round_zero(_split(args, seed), seed, args.out / "work", state["prep"], state["test"], args)


def job_strategy(args, strategy: str, seed: int, zero: RoundZero) -> Run:
    state = _state(args)
    run = run_strategy(strategy, seed, _split(args, seed), zero, args.out / "work", state["prep"], state["test"], args)
    log(f"{strategy} seed {seed} done in {run.seconds:.0f}s")
    return run


def run_all(args, strategies: list[str], seeds: list[int]) -> tuple[list[Run], int]:
    """Every (strategy, seed) run, and the number of test images."""
    if args.workers <= 1:
        runs = []
        for seed in seeds:
            zero = job_round_zero(args, seed)
            runs.extend(job_strategy(args, strategy, seed, zero) for strategy in strategies)
        return runs, zero.test_images
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        zeros = {pool.submit(job_round_zero, args, seed): seed for seed in seeds}
        futures = []
        for done in as_completed(zeros):  # a seed's strategies start as soon as its round 0 is ready
            zero = done.result()
            # ALOE (k-means on the pool) first: the longest jobs start early, so no worker idles at the end
            futures += [pool.submit(job_strategy, args, strategy, zeros[done], zero)
                         for strategy in sorted(strategies, key=lambda s: not s.startswith("aloe"))]
        return [f.result() for f in futures], zero.test_images


def main(argv=None) -> dict:
    args = parse_args(argv)
    _STATE.clear()  # loaded for this run's arguments: a second run in one process (tests, a notebook) reloads
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = parse_seeds(args.seeds)
    from oodguard.harvest import STRATEGIES

    unknown = [s for s in strategies if parse_entry(s)[0] not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    for entry in strategies:  # a misspelt parameter fails now, not after round 0
        name, params = parse_entry(entry)
        STRATEGIES[name].check_params(params)
    start = time.perf_counter()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out
    log(f"strategies {strategies}, seeds {seeds}, {args.rounds} rounds of B={args.budget}; "
        f"{args.workers} process(es) x {args.threads} torch thread(s); data {args.data}")
    runs, test_images = run_all(args, strategies, seeds)
    runs.sort(key=lambda r: (strategies.index(r.strategy), seeds.index(r.seed)))
    if not args.keep_queues:
        for seed in seeds:
            (out / "work" / f"seed{seed}" / "round0" / "queue-round0.sqlite").unlink(missing_ok=True)
            (out / "work" / f"seed{seed}" / "round0" / "queue-round0.labels.csv").unlink(missing_ok=True)
    total = time.perf_counter() - start
    if args.unknown_data:
        pool = f"{args.pool_known} known MNIST + {args.pool_mnist_unknown + args.pool_fashion} unknowns from {args.unknown_data}"
    else:
        pool = f"{args.pool_known} known MNIST + {args.pool_mnist_unknown} MNIST 6-9 + {args.pool_fashion} Fashion-MNIST"
    queue = ("every unlabeled pool item" if args.queue == "all" else
             f"flagged by SISOMe + {args.sample_fraction:.0%} of the unflagged, as the gateway queues")
    unknown_names = list(_split(args, seeds[0]).unknown_names)
    choices = [
        "calibration.json per round built directly with Calibration + fit_thresholds from the torch fused module's scores "
        f"on a fixed held-out labeled split ({args.calibration_per_class} MNIST train images per known class, disjoint from "
        "pool and seed set, " + ("counted as labels spent" if args.calibration_in_budget else "not counted as labels spent")
        + "); no ONNX export.",
        "Pool logits, features and the 8 fused-head scores from the torch module in batches; every score fitted on the "
        "current labeled set (bank = all of it), synthetic validation OOD for SISOM's alpha as in export.",
        f"Training: {args.steps} Adam steps (batch {args.batch_size}, lr {args.lr})"
        + (f", at least {args.min_epochs:g} epochs of the labeled set" if args.min_epochs else "")
        + " from scratch each round, seeded by (seed, round); round 0 (seed-set model and its filled queue) shared by "
        "all strategies of a seed.",
        "Queue: " + queue + "; re-filled (re-scored by the round's model) every round; the labeled records (seed set "
        "included) are in it as sent, and their labels (known class or 'unknown') go to the harvest as a CSV label "
        "export: LfOSA/JSOSAL/open-quota train their (K+1)-way head on them from round 2 (round 1: MAV-only, no "
        "labeled unknown yet); " + ("the CNN trains on the known labels plus a (K+1)-th class of the images labeled "
        "unknown so far, and serves its K known outputs" if args.train_unknown else "the CNN trains on the known "
        "labels only (--no-train-unknown)") + ". JSOSAL a = 4B; ALOE's λ from the calibration "
        "file's held-out scores (score gradnorm unless the entry says score=energy).",
        "Recall = known images picked / known images in the pool (seed set excluded).",
    ]
    meta = {"pool_size": args.pool_known + args.pool_mnist_unknown + args.pool_fashion, "pool": pool,
            "seed_labels": args.seed_per_class * len(KNOWN_CLASSES), "budget": args.budget, "rounds": args.rounds,
            "seeds": seeds, "steps": args.steps, "batch_size": args.batch_size, "total_seconds": total, "choices": choices,
            "queue": queue, "unknown_data": args.unknown_data, "calibration_in_budget": args.calibration_in_budget,
            "min_epochs": args.min_epochs, "final_trainings": args.final_trainings, "train_unknown": args.train_unknown}
    rows = summarise(runs, strategies)
    report = {
        "protocol": {**meta, "known_classes": list(KNOWN_CLASSES), "unknown_classes": unknown_names,
                     "strategies": strategies, "calibration_per_class": args.calibration_per_class,
                     "test_images": test_images, "lr": args.lr, "data": str(args.data), "workers": args.workers,
                     "threads": args.threads},
        "summary": rows,
        "runs": [{"strategy": r.strategy, "seed": r.seed, "rounds": r.rounds, "known_per_class": r.known_per_class,
                  "discovered": r.discovered, "unknown_classes": r.unknown_classes, "seconds": r.seconds} for r in runs],
        "total_seconds": total,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(rows, meta))
    from open_set_report import plot

    plot(report, out / "open_set.png")
    log(f"wrote {out / 'report.md'}, report.json and open_set.png; total {total / 60:.1f} min")
    print(markdown(rows, meta))
    return report


if __name__ == "__main__":
    main()

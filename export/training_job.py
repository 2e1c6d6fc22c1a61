"""`oodguard train`: train a backbone + linear head on a dataset and record everything export needs.

Writes ``<out>/checkpoint.pt`` (the classifier's state dict) and ``<out>/training.json``: backbone
factory, class names, the preprocessing (recorded explicitly), the dataset spec and class selection,
the seed, the disjoint split (train / calibration / test indices into the class-selected dataset), the
history (loss, training and validation accuracy per epoch; validation = the calibration split, reported
only) and the test split's accuracy, overall and per class (export carries it into calibration.json).
Export draws the feature bank from ``train`` and calibrates on ``calibration``; ``test`` stays unseen
for evaluation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from oodguard.datasets import Dataset, load_dataset, stratified_split
from oodguard.preprocess import Preprocessing

from .backbones import BUILTIN_BACKBONES, Classifier, resolve_factory, save_checkpoint
from .train import accuracy, train_classifier

CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "training.json"
SPLITS = ("train", "calibration", "test")


@dataclass
class TrainingRecord:
    backbone: str
    class_names: list[str]
    preprocessing: dict
    data: str
    classes: list[int] | None
    seed: int
    splits: dict[str, list[int]]
    checkpoint_sha256: str = ""
    history: list[dict] = field(default_factory=list)
    #: top-1 accuracy of the trained classifier on the test split: {"overall", "n", "per_class": {name: acc}}
    test_accuracy: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainingRecord":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: no training record (written by `oodguard train`)") from exc
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a training record ({exc})") from exc

    def dataset(self) -> Dataset:
        """The class-selected dataset the split indices refer to."""
        data = load_dataset(self.data)
        return data.select_classes(self.classes) if self.classes is not None else data

    def part(self, data: Dataset, split: str) -> Dataset:
        return data.take(np.asarray(self.splits[split], dtype=np.int64))


def preprocessing_for(input_shape: tuple[int, int, int], images: Dataset) -> Preprocessing:
    """Input spec of the backbone, normalised by the per-channel mean/std of the training images."""
    channels, height, width = input_shape
    unit = Preprocessing(channels, height, width, (0.0,) * channels, (1.0,) * channels).apply(images.images)
    mean = tuple(float(m) for m in unit.mean(axis=(0, 2, 3)))
    std = tuple(max(float(s), 1e-3) for s in unit.std(axis=(0, 2, 3)))
    return Preprocessing(channels, height, width, mean, std)


def run_training(
    *,
    backbone: str,
    data: str,
    out_dir: Path,
    classes: list[int] | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    holdout: float = 0.2,
    input_shape: tuple[int, int, int] | None = None,
    progress: Callable[[str], None] = print,
) -> TrainingRecord:
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    factory_ref = BUILTIN_BACKBONES.get(backbone, backbone)
    torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
    net = resolve_factory(factory_ref)()
    shape = input_shape or getattr(net, "input_shape", None)
    if shape is None:
        raise ValueError(f"backbone {backbone!r} has no input_shape attribute: pass --input-shape C,H,W")
    dataset = load_dataset(data)
    if dataset.labels is None:
        raise ValueError(f"{dataset.source}: training needs labels")
    if classes is not None:
        dataset = dataset.select_classes(classes)
    class_names = dataset.class_names or [str(c) for c in range(int(dataset.labels.max()) + 1)]
    train_idx, cal_idx, test_idx = stratified_split(dataset.labels, [1 - holdout, holdout / 2, holdout / 2], seed)
    train_part = dataset.take(train_idx)
    prep = preprocessing_for(tuple(shape), train_part)
    steps = prep.conversion_steps(dataset.images.shape[1:])
    progress(
        f"training {backbone} on {dataset.source}: {len(class_names)} classes, {len(train_idx)} train / "
        f"{len(cal_idx)} calibration / {len(test_idx)} test; input {prep.input_shape}"
        + (f"; conversion: {', '.join(steps)}" if steps else "")
    )
    torch.manual_seed(seed)
    model = Classifier(net, len(class_names), feature_dim=getattr(net, "feature_dim", None))
    # the calibration split doubles as the validation set: its accuracy per epoch is reported, never used
    calibration_part = dataset.take(cal_idx)
    history = train_classifier(
        model, prep.apply(train_part.images), train_part.labels,
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
        validation=(prep.apply(calibration_part.images), calibration_part.labels),
    )
    test_part = dataset.take(test_idx)
    test_accuracy = accuracy(model, prep.apply(test_part.images), test_part.labels, list(class_names))
    progress(f"test accuracy {test_accuracy['overall']:.4f} on {test_accuracy['n']} images; per class: "
             + ", ".join(f"{name} {acc:.3f}" for name, acc in test_accuracy["per_class"].items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    record = TrainingRecord(
        backbone=factory_ref,
        class_names=list(class_names),
        preprocessing=prep.to_dict(),
        data=str(data),
        classes=list(classes) if classes is not None else None,
        seed=seed,
        splits={"train": train_idx.tolist(), "calibration": cal_idx.tolist(), "test": test_idx.tolist()},
        checkpoint_sha256=save_checkpoint(model, out_dir / CHECKPOINT_FILE),
        history=history,
        test_accuracy=test_accuracy,
    )
    record.save(out_dir / RECORD_FILE)
    progress(f"saved {out_dir / CHECKPOINT_FILE} and {out_dir / RECORD_FILE}")
    return record

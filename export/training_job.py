"""`oodguard train`: train a backbone + linear head on a dataset and record everything export needs.

Writes ``<out>/checkpoint.pt`` (the classifier's state dict) and ``<out>/training.json``: backbone
factory, class names, the preprocessing (recorded explicitly), the dataset spec and class selection,
the seed, the disjoint split (train / calibration / test indices into the class-selected dataset), the
history (loss, training and validation accuracy per epoch; validation = the calibration split, reported
only) and the test split's accuracy, overall and per class with the number of test images behind each (export
carries it into calibration.json; a class with fewer than 30 test images is warned about: its accuracy is uncertain).
New classes (from ``--base`` plus new data, or a second ``--data``) are appended in sorted order, and said so.
Export draws the feature bank from ``train`` and calibrates on ``calibration``; ``test`` stays unseen
for evaluation.

**Outliers** (``--outlier-data SPEC``, repeatable): images that belong to none of the classes, e.g. the harvest's
records labeled "not relevant" (``oodguard labels import --not-relevant-out``). They are trained as one extra
class, whose row of the head is then dropped: the saved checkpoint has the run's classes only, so export,
serving and the harvest see the usual K-class model, but its features have learned where such inputs lie
(open-quota then gains more over random: docs/benchmarks.md#open_quota-open-set-benchmark). Their labels, if
any, are ignored; all of them are training images (the calibration and
test splits stay in-distribution). A run built on a base run (``--base``) keeps the base run's outlier specs and
adds its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from oodguard.datasets import Dataset, DatasetError, load_dataset
from oodguard.files import replace_together, staged_file
from oodguard.preprocess import Preprocessing

from .backbones import BUILTIN_BACKBONES, Classifier, file_sha256, resolve_factory, save_checkpoint
from .train import accuracy, train_classifier
from .training_data import (Source, balancing_weights, combine, describe_appended, label_names, merge_class_names,
                            new_source)

CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "training.json"
#: the exported bank-based scores (SISOM's leave-one-out) need this many training images of every class
MIN_TRAIN_PER_CLASS = 2
#: a class with fewer test images than this gets a warning: its accuracy is uncertain (5 of 5 right is 1.000,
#: yet its 95% Clopper-Pearson interval reaches down to 0.48; at 30 of 30 it still reaches 0.88)
FEW_TEST_PER_CLASS = 30


@dataclass
class TrainingRecord:
    backbone: str
    class_names: list[str]
    preprocessing: dict
    data: str  # the first source's spec (a summary; ``sources`` holds them all)
    classes: list[int] | None
    seed: int
    splits: dict[str, list[int]]  # indices into :meth:`dataset` (every source joined)
    checkpoint_sha256: str = ""
    history: list[dict] = field(default_factory=list)
    #: top-1 accuracy of the trained classifier on the test split: {"overall", "n", "per_class": {name: acc},
    #: "per_class_n": {name: test images}} (records written before the counts were kept lack "per_class_n")
    test_accuracy: dict = field(default_factory=dict)
    #: every dataset the run trained on, by reference, with its own split (see export/training_data.py);
    #: empty in records written before runs could have several: then ``data`` / ``classes`` / ``splits``
    sources: list[dict] = field(default_factory=list)
    #: the run this one was built on (``--base``) and the checkpoint it started from (``--init-from``)
    base: str | None = None
    init_from: str | None = None
    balanced: bool = False
    #: augmentation: the largest random shift in pixels (0: none; see oodguard.export.train.random_shift)
    shift: int = 0
    #: --outlier-data specs trained as an extra class that the saved head does not keep, and their image count
    outliers: list[str] = field(default_factory=list)
    outlier_images: int = 0

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

    def all_sources(self) -> list[Source]:
        if self.sources:
            return [Source.from_dict(raw) for raw in self.sources]
        return [Source(self.data, self.classes, self.splits)]

    def dataset(self) -> Dataset:
        """Every source joined (labels by this run's class names, images at its input size): what the split
        indices refer to."""
        data, _ = combine(self.all_sources(), self.class_names, Preprocessing.from_dict(self.preprocessing))
        return data

    def part(self, data: Dataset, split: str) -> Dataset:
        return data.take(np.asarray(self.splits[split], dtype=np.int64))


def preprocessing_for(input_shape: tuple[int, int, int], images: Dataset) -> Preprocessing:
    """Input spec of the backbone, normalised by the per-channel mean/std of the training images."""
    channels, height, width = input_shape
    unit = Preprocessing(channels, height, width, (0.0,) * channels, (1.0,) * channels).apply(images.images)
    mean = tuple(float(m) for m in unit.mean(axis=(0, 2, 3)))
    std = tuple(max(float(s), 1e-3) for s in unit.std(axis=(0, 2, 3)))
    return Preprocessing(channels, height, width, mean, std)


def load_outliers(specs: list[str], prep: Preprocessing) -> np.ndarray | None:
    """The model inputs of every outlier spec's images (any size: ``prep`` converts them; labels ignored), or
    None when there are none (no specs, or only empty ones)."""
    parts = []
    for spec in specs:
        try:
            data = load_dataset(spec)
        except DatasetError as exc:
            raise DatasetError(f"--outlier-data {spec!r}: {exc}") from None
        if len(data):  # an empty one (no record was labeled "not relevant") adds nothing; the progress line says so
            parts.append(prep.apply(data.images))
    return np.concatenate(parts) if parts else None


def without_outlier_output(model: Classifier, classes: int) -> Classifier:
    """``model`` with the head's first ``classes`` rows only (the same backbone module)."""
    kept = Classifier(model.backbone, classes, feature_dim=model.head.in_features)
    with torch.no_grad():
        kept.head.weight.copy_(model.head.weight[:classes])
        kept.head.bias.copy_(model.head.bias[:classes])
    return kept.eval()


@dataclass(frozen=True)
class _DataOptions:
    """What to train on: the backbone, the dataset specs and their split, the base run, the outlier sets."""

    backbone: str | None
    data: str | list[str] | None
    classes: list[int] | None
    holdout: float
    input_shape: tuple[int, int, int] | None
    base: Path | None
    outliers: list[str] | None

    def __post_init__(self):
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")

    @property
    def specs(self) -> list[str]:
        """``data`` as a list of dataset specs."""
        return [self.data] if isinstance(self.data, str) else list(self.data or [])

    @property
    def fractions(self) -> list[float]:
        """Each new source's train / calibration / test fractions."""
        return [1 - self.holdout, self.holdout / 2, self.holdout / 2]


@dataclass(frozen=True)
class _FitOptions:
    """How to train: the optimisation settings, the seed, the sampling and augmentation, the starting weights."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    balance: str
    shift: int
    init_from: Path | None

    def __post_init__(self):
        if self.shift < 0:
            raise ValueError(f"--shift must be >= 0 pixels, got {self.shift}")


def run_training(
    *,
    backbone: str | None = None,
    data: str | list[str] | None = None,
    out_dir: Path,
    classes: list[int] | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    holdout: float = 0.2,
    input_shape: tuple[int, int, int] | None = None,
    base: Path | None = None,
    init_from: Path | None = None,
    balance: str = "auto",
    shift: int = 0,
    outliers: list[str] | None = None,
    progress: Callable[[str], None] = print,
) -> TrainingRecord:
    """Train on ``data`` (one spec or several; ``classes`` selects labels of each), or on the ``base`` run's data
    plus ``data`` (its split, class order and preprocessing kept; new classes appended by name). ``init_from``
    starts from a checkpoint (its head grows for new classes) instead of fresh weights; ``balance`` (auto / on /
    off) draws classes equally often; ``shift`` > 0 moves each training image by up to that many pixels;
    ``outliers``: dataset specs trained as an extra class that the saved head drops (see the module docstring)."""
    return _run_training(_DataOptions(backbone, data, classes, holdout, input_shape, base, outliers),
                         _FitOptions(epochs, batch_size, lr, seed, balance, shift, init_from), out_dir, progress)


def _run_training(opts: _DataOptions, fit: _FitOptions, out_dir: Path, progress: Callable[[str], None]) -> TrainingRecord:
    """:func:`run_training` with its arguments grouped: data, model, training, test, save."""
    base_record, factory_ref, net, shape = _resolve_backbone(opts, fit.seed)
    sources, loaded, class_names, first_new = _load_sources(opts, base_record, fit.seed)
    prep, joined, splits = _join_sources(sources, class_names, loaded, base_record, shape)
    train_part = joined.take(splits["train"])
    _check_class_sizes(joined, train_part, class_names, opts.fractions[0])
    outlier_specs = list(dict.fromkeys((base_record.outliers if base_record is not None else []) + list(opts.outliers or [])))
    outlier_x = load_outliers(outlier_specs, prep)
    k = len(class_names)
    train_x, train_y = _training_arrays(prep, train_part, outlier_x, k)
    weights = balancing_weights(train_y, fit.balance)
    progress(_describe_run(factory_ref, joined.source, class_names, splits, prep, opts.base, weights, fit.shift,
                           outlier_x, outlier_specs))
    if appended := describe_appended(class_names, first_new):
        progress(appended)
    model = _initial_model(net, k, outlier_x is not None, fit, progress)
    history = _train(model, train_x, train_y, joined.take(splits["calibration"]), prep, weights, fit, progress)
    if outlier_x is not None:
        model = without_outlier_output(model, k)
    test_accuracy = _test(model, joined.take(splits["test"]), prep, class_names, progress)
    record = _record(opts, fit, factory_ref, class_names, prep, sources, splits, history, test_accuracy, weights,
                     outlier_specs, outlier_x)
    return _save(out_dir, model, record, progress)


def _resolve_backbone(opts: _DataOptions, seed: int):
    """The base run's record (if any), the backbone factory reference, a fresh (seeded) backbone and its input shape;
    refuses a run with no data, a backbone other than the base run's, or no known input shape."""
    specs = opts.specs
    base_record = TrainingRecord.load(Path(opts.base) / RECORD_FILE) if opts.base is not None else None
    if base_record is None and not specs:
        raise ValueError("give --data (or --base RUN with the run to build on)")
    backbone = opts.backbone
    if base_record is not None and backbone is not None and BUILTIN_BACKBONES.get(backbone, backbone) != base_record.backbone:
        raise ValueError(f"--backbone {backbone!r} differs from the base run's {base_record.backbone!r}")
    factory_ref = base_record.backbone if base_record is not None else BUILTIN_BACKBONES.get(backbone or "lenet5",
                                                                                              backbone or "lenet5")
    torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
    net = resolve_factory(factory_ref)()
    shape = opts.input_shape or getattr(net, "input_shape", None)
    if shape is None and base_record is None:
        raise ValueError(f"backbone {factory_ref!r} has no input_shape attribute: pass --input-shape C,H,W")
    return base_record, factory_ref, net, shape


def _load_sources(opts: _DataOptions, base_record: TrainingRecord | None, seed: int):
    """Every source (the base run's, then each new spec split afresh), the new ones' datasets by source index, and
    the class names: the base run's (else the first source's) keep their indices, the rest are appended."""
    sources = base_record.all_sources() if base_record is not None else []
    loaded, new_names = {}, []
    for spec in opts.specs:
        source, dataset = new_source(spec, opts.classes, opts.fractions, seed)
        new_names.append(label_names(dataset))
        loaded[len(sources)] = dataset
        sources.append(source)
    # the base run's classes (else the first source's, in its order) keep their indices; the rest are appended,
    # all of them together in sorted order, whichever source or label brought them first
    class_names = (list(base_record.class_names) if base_record is not None
                   else merge_class_names([], new_names.pop(0) if new_names else []))
    first_new = len(class_names)
    class_names = merge_class_names(class_names, [name for names in new_names for name in names])
    return sources, loaded, class_names, first_new


def _join_sources(sources: list[Source], class_names: list[str], loaded: dict, base_record: TrainingRecord | None,
                  shape):
    """The preprocessing (the base run's, else fitted on the joined train part) and every source joined with it."""
    prep = Preprocessing.from_dict(base_record.preprocessing) if base_record is not None else None
    if prep is None:
        # the first source's size decides until the preprocessing exists; it is fitted on the joined train part
        joined, splits = combine(sources, class_names, None, loaded)
        prep = preprocessing_for(tuple(shape), joined.take(splits["train"]))
    joined, splits = combine(sources, class_names, prep, loaded)
    return prep, joined, splits


def _check_class_sizes(joined: Dataset, train_part: Dataset, class_names: list[str], train_fraction: float) -> None:
    """Refuse, before training, a class with too few training images for the export's bank-based scores."""
    counts = np.bincount(train_part.labels, minlength=len(class_names))
    thin = {name: int(n) for name, n in zip(class_names, counts) if n < MIN_TRAIN_PER_CLASS}
    if thin:  # fail before training: the export could not fit its bank-based scores
        raise ValueError(
            f"class(es) {thin} have fewer than {MIN_TRAIN_PER_CLASS} training images (of "
            f"{dict(zip(class_names, np.bincount(joined.labels, minlength=len(class_names)).tolist()))} labeled in "
            f"all; the train split keeps {train_fraction:.0%}); the exported OOD scores need {MIN_TRAIN_PER_CLASS} per "
            "class in the feature bank: label more images of them, leave them out of the labels file, or train on the "
            "previous run's data as well (--base RUN)")


def _training_arrays(prep: Preprocessing, train_part: Dataset, outlier_x: np.ndarray | None, k: int):
    """The training inputs and labels, the outlier images appended as class ``k`` (the extra class the head drops)."""
    train_x, train_y = prep.apply(train_part.images), train_part.labels
    if outlier_x is not None:
        train_x = np.concatenate([train_x, outlier_x])
        train_y = np.concatenate([train_y, np.full(len(outlier_x), k, dtype=train_y.dtype)])
    return train_x, train_y


def _describe_run(factory_ref: str, source: str, class_names: list[str], splits: dict, prep: Preprocessing,
                  base: Path | None, weights, shift: int, outlier_x: np.ndarray | None, outlier_specs: list[str]) -> str:
    """The run's opening progress line: backbone, data, split sizes, input, and each option in effect."""
    return (
        f"training {factory_ref} on {source}: {len(class_names)} classes, {len(splits['train'])} train / "
        f"{len(splits['calibration'])} calibration / {len(splits['test'])} test; input {prep.input_shape}"
        + (f"; built on {base}" if base is not None else "")
        + ("; class-balanced sampling" if weights is not None else "")
        + (f"; random shifts up to {shift} px" if shift else "")
        + (f"; {len(outlier_x)} outlier images ({', '.join(outlier_specs)}) trained as an extra class that the saved "
           "head drops" if outlier_x is not None else "")
        + (f"; --outlier-data {', '.join(outlier_specs)}: no images, no extra class" if outlier_specs and outlier_x is None
           else "")
    )


def _initial_model(net, k: int, with_outliers: bool, fit: _FitOptions, progress: Callable[[str], None]) -> Classifier:
    """The classifier to train (seeded head, one extra row for the outliers), from ``fit.init_from`` if given."""
    torch.manual_seed(fit.seed)
    model = Classifier(net, k + with_outliers, feature_dim=getattr(net, "feature_dim", None))
    if fit.init_from is not None:
        grown = init_weights(model, Path(fit.init_from)) - with_outliers  # the outlier row is no class
        progress(f"initialised from {fit.init_from}" + (f" (head grown by {grown} class(es))" if grown else ""))
    return model


def _train(model: Classifier, train_x: np.ndarray, train_y: np.ndarray, calibration_part: Dataset, prep: Preprocessing,
           weights, fit: _FitOptions, progress: Callable[[str], None]) -> list[dict]:
    """Train ``model`` in place; the per-epoch history (validation accuracy on the calibration split, reported only)."""
    # the calibration split doubles as the validation set: its accuracy per epoch is reported, never used
    return train_classifier(
        model, train_x, train_y,
        epochs=fit.epochs, batch_size=fit.batch_size, lr=fit.lr, seed=fit.seed, progress=progress,
        validation=(prep.apply(calibration_part.images), calibration_part.labels), sample_weights=weights,
        shift=fit.shift,
    )


def _test(model: Classifier, test_part: Dataset, prep: Preprocessing, class_names: list[str],
          progress: Callable[[str], None]) -> dict:
    """The trained classifier's accuracy on the test split, reported per class."""
    test_accuracy = accuracy(model, prep.apply(test_part.images), test_part.labels, list(class_names))
    for line in describe_accuracy(test_accuracy, list(class_names)):
        progress(line)
    return test_accuracy


def _record(opts: _DataOptions, fit: _FitOptions, factory_ref: str, class_names: list[str], prep: Preprocessing,
            sources: list[Source], splits: dict, history: list[dict], test_accuracy: dict, weights,
            outlier_specs: list[str], outlier_x: np.ndarray | None) -> TrainingRecord:
    """The run's training.json, all but the checkpoint's hash: what a later export or ``--base`` run reads back."""
    return TrainingRecord(
        backbone=factory_ref,
        class_names=list(class_names),
        preprocessing=prep.to_dict(),
        data=sources[0].data,
        classes=sources[0].classes,
        seed=fit.seed,
        splits={name: part.tolist() for name, part in splits.items()},
        history=history,
        test_accuracy=test_accuracy,
        sources=[source.to_dict() for source in sources],
        base=str(opts.base) if opts.base is not None else None,
        init_from=str(fit.init_from) if fit.init_from is not None else None,
        balanced=weights is not None,
        shift=fit.shift,
        outliers=outlier_specs,
        outlier_images=len(outlier_x) if outlier_x is not None else 0,
    )


def _save(out_dir: Path, model: Classifier, record: TrainingRecord, progress: Callable[[str], None]) -> TrainingRecord:
    """Write the checkpoint and its record (with the checkpoint's hash) together, and say where."""
    saved = save_run(out_dir, model, lambda checkpoint_sha256: replace(record, checkpoint_sha256=checkpoint_sha256))
    progress(f"saved {out_dir / CHECKPOINT_FILE} and {out_dir / RECORD_FILE}")
    return saved


def save_run(out_dir: Path, model: Classifier, make_record: Callable[[str], TrainingRecord]) -> TrainingRecord:
    """Write ``checkpoint.pt`` and ``training.json`` (``make_record(checkpoint's sha256)``) into ``out_dir``.

    Both are written beside their final names, then renamed in together with Ctrl-C held back: an interrupt or
    a crash leaves the run folder as it was (never a half-written checkpoint, nor a new checkpoint beside an
    older run's training.json), and a folder this call created is removed again."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        checkpoint = staged_file(out_dir / CHECKPOINT_FILE, lambda tmp: save_checkpoint(model, tmp))
        staged.append((checkpoint, out_dir / CHECKPOINT_FILE))
        record = make_record(file_sha256(checkpoint))
        staged.append((staged_file(out_dir / RECORD_FILE, record.save), out_dir / RECORD_FILE))
        replace_together(staged)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return record


def describe_accuracy(test_accuracy: dict, class_names: list[str] | None = None,
                      few: int = FEW_TEST_PER_CLASS) -> list[str]:
    """The lines `oodguard train` prints about the test accuracy: overall, then each class's accuracy with the
    number of test images behind it (``0 0.982 (n=57)``), then one warning naming the classes with fewer than
    ``few`` test images, whose accuracy is uncertain (a class new to the run often has a handful: ``1.000 (n=5)``;
    a class of ``class_names`` without any test image is named with n=0). A dict without ``per_class_n`` (an
    older record) gives the accuracies without counts and no warning."""
    counts = test_accuracy.get("per_class_n", {})
    lines = [f"test accuracy {test_accuracy['overall']:.4f} on {test_accuracy['n']} images; per class: "
             + ", ".join(f"{name} {acc:.3f}" + (f" (n={counts[name]})" if name in counts else "")
                         for name, acc in test_accuracy["per_class"].items())]
    if not counts:
        return lines
    thin = {name: counts.get(name, 0) for name in (class_names or list(counts)) if counts.get(name, 0) < few}
    if thin:
        lines.append(f"warning: class(es) {', '.join(f'{name} (n={n})' for name, n in thin.items())} have fewer than "
                     f"{few} test images: their accuracy is uncertain (label more images of them to measure it)")
    return lines


def init_weights(model: Classifier, checkpoint: Path) -> int:
    """Load ``checkpoint`` into ``model``; a head with fewer classes fills the first rows (new classes keep
    their fresh initialisation). Returns how many classes the head grew by."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weight, bias = state.get("head.weight"), state.get("head.bias")
    if weight is None or bias is None:
        raise ValueError(f"{checkpoint}: not an oodguard checkpoint (no head.weight / head.bias)")
    classes, features = weight.shape
    if features != model.head.in_features or classes > model.head.out_features:
        raise ValueError(f"{checkpoint}: head of {classes} classes x {features} features does not fit this run's "
                         f"{model.head.out_features} x {model.head.in_features}")
    head = {"head.weight": state.pop("head.weight"), "head.bias": state.pop("head.bias")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"head.weight", "head.bias"}:
        raise ValueError(f"{checkpoint}: does not match the backbone (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        model.head.weight[:classes] = head["head.weight"]
        model.head.bias[:classes] = head["head.bias"]
    return model.head.out_features - classes

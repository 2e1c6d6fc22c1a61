"""What one `oodguard export` is asked to do: :class:`ExportSpec`, and the two ways to build one.

:func:`spec_from_training` reads a checkpoint written by `oodguard train` (its training.json names the
backbone, classes, preprocessing and the disjoint train / calibration splits); :func:`spec_from_flags` builds
the spec of a user checkpoint without training.json from the command line. :mod:`oodguard.export.pipeline`
runs the export a spec describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from oodguard.datasets import Dataset
from oodguard.preprocess import Preprocessing

from . import new_classes


#: the default limit of the multi-layer scores' own bank (``--multi-layer-bank-size``)
MULTI_LAYER_BANK_SIZE = 5000


@dataclass
class ExportSpec:
    """Everything one export needs. ``bank_data`` is in-distribution *training* data; ``calibration_data``
    must be disjoint from it. ``score_params`` passes keyword arguments to a score's ``fit``."""

    repository: Path
    model_name: str
    backbone: str
    checkpoint: Path
    class_names: list[str]
    preprocessing: Preprocessing
    bank_data: Dataset
    calibration_data: Dataset
    bank_size: int | None = None
    bank_method: str = "auto"  # with bank_size: "probcover", "random", or "auto" (both fitted, see fitting.choose_bank)
    score_params: dict[str, dict] = field(default_factory=dict)
    target_tpr: float = 0.95
    validation_ood_size: int = 1000
    validation_ood_specs: list[str] = field(default_factory=list)  # --validation-ood: extra validation OOD sets
    max_batch_size: int = 64
    seed: int = 0
    provenance: dict = field(default_factory=dict)
    multi_layer: bool = False  # --multi-layer: also fit sisom_ml / sisome_ml (backward pass + their own bank)
    multi_layer_bank_size: int | None = MULTI_LAYER_BANK_SIZE  # their bank's limit (None: the export's bank)
    # the fused choice's "new" validation group (oodguard.export.new_classes): this many classes held out in turn,
    # each by a classifier trained without it for new_class_epochs (None: no training recipe known, no group)
    new_class_holdouts: int = new_classes.DEFAULT_HOLDOUTS
    new_class_epochs: int | None = None


def spec_from_training(checkpoint: Path, repository: Path, model_name: str, **overrides) -> ExportSpec:
    """An export of a checkpoint written by `oodguard train`: bank from its train split, calibration from
    its held-out calibration split (disjoint by construction)."""
    from .training_job import RECORD_FILE, TrainingRecord

    record = TrainingRecord.load(Path(checkpoint).with_name(RECORD_FILE))
    data = record.dataset()
    return ExportSpec(
        repository=Path(repository),
        model_name=model_name,
        backbone=record.backbone,
        checkpoint=Path(checkpoint),
        class_names=record.class_names,
        preprocessing=Preprocessing.from_dict(record.preprocessing),
        bank_data=record.part(data, "train"),
        calibration_data=record.part(data, "calibration"),
        seed=record.seed,
        provenance={"training_data": record.data, "training_classes": record.classes,
                    **({"test_accuracy": record.test_accuracy} if record.test_accuracy else {})},
        new_class_epochs=len(record.history) or None,
        **overrides,
    )


def spec_from_flags(args, **overrides) -> ExportSpec:
    """An export of a user checkpoint without training.json: everything comes from the command line."""
    from oodguard.datasets import load_dataset

    from .training_job import preprocessing_for

    missing = [flag for flag, value in (("--backbone", args.backbone), ("--bank-data", args.bank_data),
                                        ("--calibration-data", args.calibration_data), ("--class-names", args.class_names))
               if not value]
    if missing:
        raise ValueError(f"{args.checkpoint} has no training.json beside it: also give {', '.join(missing)}")
    from .backbones import BUILTIN_BACKBONES, resolve_factory

    backbone = BUILTIN_BACKBONES.get(args.backbone, args.backbone)
    bank = load_dataset(args.bank_data)
    shape = args.input_shape or getattr(resolve_factory(backbone)(), "input_shape", None)
    if shape is None:
        raise ValueError(f"backbone {backbone!r} has no input_shape attribute: give --input-shape C,H,W")
    prep = preprocessing_for(tuple(shape), bank)
    if args.mean or args.std:
        prep = Preprocessing(prep.channels, prep.height, prep.width, args.mean or prep.mean, args.std or prep.std)
    return ExportSpec(
        repository=args.repository, model_name=args.model, backbone=backbone, checkpoint=args.checkpoint,
        class_names=args.class_names.split(","), preprocessing=prep, bank_data=bank,
        calibration_data=load_dataset(args.calibration_data), seed=args.seed,
        provenance={"training_data": args.bank_data}, **overrides,
    )

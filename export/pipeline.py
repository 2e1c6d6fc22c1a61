"""`oodguard export`: classifier checkpoint → fused-head ONNX + calibration.json + Triton configs.

:func:`export_model` runs an :class:`~oodguard.export.spec.ExportSpec` as named steps, each timed and
reported: check the inputs (before any slow step); load the checkpoint; extract the training features and
those of the validation OOD (:mod:`oodguard.export.extraction`); choose the bank, fit every score of the
registry and choose the ``fused`` score (:mod:`oodguard.export.fitting`); export one ONNX graph; run it in ONNX
Runtime on the calibration split to fit the 95%-TPR thresholds (``fused`` on its held half only); write the
version folder atomically (built in a hidden temp folder, then renamed to the next free version number) and
refresh the model's Triton configs. The steps from the ONNX export on live here; so does the version's
calibration.json, which records the bank choice, the validation OOD, the calibration data, the fused score's
split and ``multi_layer`` (and ``multi_layer_bank``: size, limit, how it was drawn).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import oodguard
from oodguard import progress as bars
from oodguard.calibration import Calibration, CalibrationError
from oodguard.files import interrupts_deferred
from oodguard.onnx_runner import OnnxModel
from oodguard.preprocess import Preprocessing
from oodguard.repository import CALIBRATION_FILE, INPUT_NAME, MODEL_FILE, model_dir, next_version

from . import fused
from .backbones import file_sha256, load_classifier
from .bank import METHODS as BANK_METHODS
from .calibrate import fit_threshold, fit_thresholds, minimum_size
from .extraction import extract_training_features, extract_validation_ood, user_validation_sets
from .fitting import BankChoice, CalibrationSplit, add_fused_score, fit_bank_scores
from .scores import MULTI_LAYER, FitData, Score
from .scores.pvalue_fusion import NAME as FUSED
from .spec import ExportSpec
from .triton_config import ModelSignature, common_scores, served_versions, write_configs
from .triton_model import write_triton_model
from .validation import ValidationOOD



@dataclass
class ExportResult:
    version: int
    version_dir: Path
    calibration: Calibration
    model: fused.FusedModel
    seconds: dict[str, float]


#: a class with fewer calibration samples than this is reported (the thresholds need enough samples overall)
FEW_CALIBRATION_SAMPLES = 20


def calibration_counts(spec: ExportSpec) -> dict[str, int]:
    """Calibration samples per class name (empty when the calibration set has no labels)."""
    labels = spec.calibration_data.labels
    if labels is None:
        return {}
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(spec.class_names))
    return {name: int(n) for name, n in zip(spec.class_names, counts)}


def export_model(spec: ExportSpec, progress: Callable[[str], None] = print) -> ExportResult:
    seconds: dict[str, float] = {}
    lap = _stopwatch(seconds, progress)
    per_class, few = _check_inputs(spec, progress)
    user_sets = user_validation_sets(spec)
    classifier = load_classifier(spec.backbone, spec.checkpoint, num_classes=len(spec.class_names))
    bank_images, features, logits, layer_data = extract_training_features(spec, classifier, progress, lap)
    ood, ood_features, ood_logits, ood_layer_data = extract_validation_ood(spec, classifier, bank_images, user_sets,
                                                                           layer_data is not None, lap)
    split = CalibrationSplit.of(spec)
    labels = spec.bank_data.labels
    data = FitData(
        features=features, logits=logits, labels=labels, bank=np.arange(len(labels)),
        head_weight=classifier.head.weight.detach().numpy(), head_bias=classifier.head.bias.detach().numpy(),
        validation_ood_features=ood_features, validation_ood_logits=ood_logits, seed=spec.seed,
        validation_ood_groups=ood.groups, layers=layer_data, validation_ood_layers=ood_layer_data,
    )
    chosen = fit_bank_scores(spec, classifier, data, ood, split, progress, lap)
    scores = add_fused_score(spec, classifier, bank_images, chosen, ood, split, progress, lap)

    root = model_dir(spec.repository, spec.model_name)
    with _staging_folder(root) as staging:
        model = _export_onnx(classifier, scores, spec.preprocessing, staging, lap)
        thresholds = _calibrate(spec, staging, model, scores, split, lap)
        write_triton_model(staging)  # model.py for Triton's CPU config (python backend)
        calibration = _calibration_record(spec, model, scores, chosen, ood, thresholds, per_class, few, split)
        version, left_out = _publish_with_configs(spec, staging, root, calibration, classifier, model)
    _report_written(root, version, left_out, progress)
    return ExportResult(version, root / str(version), calibration, model, seconds)


def _stopwatch(seconds: dict[str, float], progress: Callable[[str], None]) -> Callable[[str], None]:
    """A ``lap(step)`` that records and reports the seconds since the previous lap: each export step is timed."""
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = now - clock
        clock = now
        progress(f"  {step}: {seconds[step]:.1f}s")

    return lap


def _check_inputs(spec: ExportSpec, progress: Callable[[str], None]) -> tuple[dict[str, int], dict[str, int]]:
    """Calibration samples per class and the thin ones, after refusing a spec that cannot export (before the slow steps)."""
    if spec.bank_data.labels is None:
        raise ValueError("the bank data needs labels")
    n_cal = len(spec.calibration_data)
    if n_cal < minimum_size(spec.target_tpr):  # fail before the slow steps
        raise CalibrationError(
            f"the calibration set ({spec.calibration_data.source}) is empty" if n_cal == 0 else
            f"{n_cal} calibration samples are too few for a {spec.target_tpr:.0%} TPR threshold "
            f"(need at least {minimum_size(spec.target_tpr)})")
    per_class = calibration_counts(spec)
    few = {name: n for name, n in per_class.items() if n < FEW_CALIBRATION_SAMPLES}
    if few:  # thresholds are per score over all classes: enough overall is what they need; say which are thin
        progress(f"  note: few calibration samples for class(es) {few} (under {FEW_CALIBRATION_SAMPLES}); "
                 f"thresholds use all {n_cal}, but the true-positive rate of these classes is estimated poorly")
    if spec.bank_method not in ("auto", *BANK_METHODS):
        raise ValueError(f"bank method must be auto, probcover or random, got {spec.bank_method!r}")
    if spec.multi_layer and spec.multi_layer_bank_size is not None and spec.multi_layer_bank_size < 2 * len(spec.class_names):
        raise ValueError(f"multi-layer bank size {spec.multi_layer_bank_size} is too small: at least 2 per class "
                         f"({2 * len(spec.class_names)}) are needed")
    return per_class, few


@contextlib.contextmanager
def _staging_folder(root: Path):
    """A hidden temp folder in the model folder to build the version in; on any error it goes (and the model folder too
    if this export created it and it is empty): a failed export leaves the repository as it was."""
    new_model = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; Triton may run as another user
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if new_model and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # a model folder this export created holds nothing: the repository is as it was
        raise


def _export_onnx(classifier, scores: dict[str, Score], prep: Preprocessing, staging: Path, lap) -> fused.FusedModel:
    """The fused model (classifier plus every score) exported as one ONNX graph into the staging folder."""
    with bars.phase("export ONNX"):
        model = fused.FusedModel(classifier, scores).eval()
        fused.export_onnx(model, prep.input_shape, staging / MODEL_FILE)
    lap("export ONNX")
    return model


def _calibrate(spec: ExportSpec, staging: Path, model: fused.FusedModel, scores: dict[str, Score],
               split: CalibrationSplit, lap) -> dict:
    """The thresholds at the target TPR, from the exported graph in ONNX Runtime (what is served is what is calibrated)."""
    outputs = OnnxModel(staging / MODEL_FILE).run(split.images, desc="calibrate: ONNX Runtime")
    thresholds = fit_thresholds(outputs, [n for n in model.score_names if n != FUSED], spec.target_tpr)
    if FUSED in scores:  # on the held half only: its references came from the other
        thresholds[FUSED] = fit_threshold(FUSED, outputs[FUSED][split.held], spec.target_tpr)
    lap(f"calibrate ({len(spec.calibration_data)} held-out in-distribution samples"
        + (f"; {FUSED} on {len(split.held)} of them)" if FUSED in scores else ")"))
    return thresholds


def _calibration_record(spec: ExportSpec, model: fused.FusedModel, scores: dict[str, Score], chosen: BankChoice,
                        ood: ValidationOOD, thresholds: dict, per_class: dict[str, int], few: dict[str, int],
                        split: CalibrationSplit) -> Calibration:
    """The version's calibration.json: model metadata, thresholds and where the calibration data came from."""
    return Calibration(
        model={**_metadata(spec, model, len(chosen.bank)), "bank_method": chosen.method,
               **_multi_layer_metadata(spec, scores, len(chosen.bank)),
               **({"bank_comparison": chosen.comparison} if chosen.comparison else {}),
               "validation_ood": {"groups": ood.group_sizes, "specs": list(spec.validation_ood_specs)}},
        thresholds=thresholds,
        data={"source": spec.calibration_data.source, "n": len(spec.calibration_data), "target_tpr": spec.target_tpr,
              **({"per_class": per_class} if per_class else {}),
              **({"few_samples": sorted(few)} if few else {}),
              **({"fused_split": {"references": len(split.references), "threshold": len(split.held), "seed": spec.seed}}
                 if FUSED in scores else {})},
    )


def _publish_with_configs(spec: ExportSpec, staging: Path, root: Path, calibration: Calibration, classifier,
                          model: fused.FusedModel) -> tuple[int, list[str]]:
    """Publish the staged version and rewrite the model's Triton configs together; the outputs the configs leave out."""
    signature = ModelSignature(spec.model_name, spec.preprocessing.input_shape, len(spec.class_names),
                               classifier.feature_dim, tuple(model.score_names))
    # the version and the configs that serve it go in together: Ctrl-C waits until both are written
    with interrupts_deferred():
        version = _publish(staging, root, calibration)
        left_out = [name for name in signature.scores if name not in common_scores(root, signature.scores)]
        write_configs(root, signature, max_batch_size=spec.max_batch_size,
                      preferred_batch_sizes=tuple(b for b in (16, 32, 64) if b <= spec.max_batch_size)
                      or (spec.max_batch_size,))
    return version, left_out


def _report_written(root: Path, version: int, left_out: list[str], progress: Callable[[str], None]) -> None:
    """Say what was written, and which outputs Triton does not serve yet (the configs declare the common ones)."""
    if left_out:
        progress(f"  note: the Triton configs declare only the outputs every served version has (versions "
                 f"{served_versions(root)}): {left_out} are served by Triton once no served version lacks them "
                 "(the embedded backend serves them now)")
    progress(f"wrote {root / str(version)} (model.onnx, calibration.json) and the Triton configs")


def _multi_layer_metadata(spec: ExportSpec, scores: dict, export_bank_size: int) -> dict:
    """``multi_layer`` (whether the export fitted the multi-layer scores) and, when it did, their bank."""
    if not spec.multi_layer:
        return {"multi_layer": False}
    bank_size = scores[MULTI_LAYER[0]].metadata()["bank_size"]
    return {"multi_layer": True,
            "multi_layer_bank": {"size": bank_size, "limit": spec.multi_layer_bank_size,
                                 "method": "export bank" if bank_size == export_bank_size
                                 else "class-stratified random draw from the export bank"}}


def _metadata(spec: ExportSpec, model: fused.FusedModel, bank_size: int) -> dict:
    return {
        "name": spec.model_name,
        "class_names": list(spec.class_names),
        "input": {"name": INPUT_NAME, "shape": list(spec.preprocessing.input_shape), "dtype": "float32"},
        "preprocessing": spec.preprocessing.to_dict(),
        "outputs": fused.output_names(model.score_names),
        "scores": model.score_names,
        "score_params": {name: score.metadata() for name, score in model.scores.items()},
        "bank_size": bank_size,
        "opset": fused.OPSET,
        "max_batch_size": spec.max_batch_size,
        "backbone": spec.backbone,
        "checkpoint_sha256": file_sha256(spec.checkpoint),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "oodguard_version": oodguard.__version__,
        **spec.provenance,
    }


def _publish(staging: Path, root: Path, calibration: Calibration) -> int:
    """Rename the finished staging folder to the next free version (retrying if another export won)."""
    for _ in range(100):
        version = next_version(root.parent, root.name)
        calibration.model["version"] = version
        calibration.save(staging / CALIBRATION_FILE)
        try:
            os.rename(staging, root / str(version))
            return version
        except OSError:
            if not (root / str(version)).exists():
                raise
    raise RuntimeError(f"could not claim a version folder in {root}")

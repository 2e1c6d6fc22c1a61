"""`oodguard export`: classifier checkpoint → fused-head ONNX + calibration.json + Triton configs.

Steps, each timed and reported: load the checkpoint; extract training features and those of the
validation OOD (synthetic corruptions of training images plus any ``--validation-ood`` sets; never a test
set); choose the bank (when ``bank_size`` is smaller than the training set: class-wise ProbCover and a
class-stratified random bank are both fitted, and ProbCover is kept only if it is at least as good on
validation for every bank-based score); fit every score of the registry (the multi-layer scores only with
``multi_layer``: see below); choose and fit the ``fused``
score on one half of the held-out calibration split (:mod:`oodguard.export.scores.pvalue_fusion`); export
one ONNX graph; run it in ONNX Runtime on the calibration split to fit the 95%-TPR thresholds (``fused``
on the other half only); write the version folder atomically (built in a hidden temp folder, then renamed
to the next free version number) and refresh the model's Triton configs.

The calibration split is halved per class (seeded): *references* (the fused score's reference scores,
the fused choice and the bank choice) and *held* (the fused threshold). Every other score's threshold uses
the whole split. A calibration split too small to halve (each half needs
:func:`~oodguard.export.calibrate.minimum_size` samples) gives a version without ``fused``, and the log
says so; the gateway then decides with its fallback score.

**Multi-layer SISOM is opt-in** (``multi_layer``, ``oodguard export --multi-layer``; default off). Without it
the export extracts no per-layer data and the graph has no ``sisom_ml`` / ``sisome_ml`` outputs, no backward
pass and no second bank, so the default export pays nothing for it. With it, the
per-layer data of the bank images is extracted (after the gradient check against autograd) and the two scores
get a bank of their own: the export's bank (full, or as ``bank_size`` chose it) cut to at most
``multi_layer_bank_size`` samples by a class-stratified random draw (water-filled quotas, seeded;
:func:`multi_layer_bank`). Their distances run on a wider feature (LeNet-5: 226 against 84 dimensions), so on
a full bank they would be the largest part of the graph, in time and in size (measurements:
docs/benchmarks.md#pipeline-multi-layer-bank-size). calibration.json records ``multi_layer`` (and
``multi_layer_bank``: size, limit, how it was drawn).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import oodguard
from oodguard import progress as bars
from oodguard.calibration import Calibration, CalibrationError
from oodguard.datasets import Dataset
from oodguard.files import interrupts_deferred
from oodguard.onnx_runner import OnnxModel
from oodguard.preprocess import Preprocessing
from oodguard.repository import CALIBRATION_FILE, INPUT_NAME, MODEL_FILE, model_dir, next_version

from . import fused, layers, new_classes
from .backbones import file_sha256, load_classifier
from .bank import METHODS as BANK_METHODS
from .bank import reduce_bank
from .calibrate import fit_threshold, fit_thresholds, minimum_size
from .scores import MULTI_LAYER, SCORES, FitData, Score, registry
from .scores.pvalue_fusion import NAME as FUSED, PValueFusion
from .synthetic import validation_ood
from .train import extract
from .validation import ValidationOOD, key, objective
from .triton_config import ModelSignature, common_scores, served_versions, write_configs
from .triton_model import write_triton_model


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
    bank_method: str = "auto"  # with bank_size: "probcover", "random", or "auto" (both fitted, see choose_bank)
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


@dataclass
class ExportResult:
    version: int
    version_dir: Path
    calibration: Calibration
    model: fused.FusedModel
    seconds: dict[str, float]


def fit_scores(data: FitData, params: dict[str, dict], multi_layer: bool = False,
               multi_layer_bank_size: int | None = None, desc: str = "fit scores") -> dict[str, Score]:
    """Every score of :func:`~oodguard.export.scores.registry` fitted on ``data`` (registry order); the
    multi-layer scores (``multi_layer`` only) on :func:`multi_layer_bank` of ``data.bank``. ``desc`` names the
    progress bar over the scores (:mod:`oodguard.progress`: on a terminal only)."""
    unknown = set(params) - set(SCORES) - {FUSED}
    if unknown:
        raise ValueError(f"parameters given for unknown score(s) {sorted(unknown)}; scores: {[*SCORES, FUSED]}")
    if not multi_layer and set(params) & set(MULTI_LAYER):
        raise ValueError(f"parameters given for {sorted(set(params) & set(MULTI_LAYER))}, which only an export "
                         "with multi_layer (--multi-layer) has")
    ml_data = None
    if multi_layer:
        ml_data = dataclasses.replace(data, bank=multi_layer_bank(data, multi_layer_bank_size))
    fitted: dict[str, Score] = {}
    scores = registry(multi_layer)
    with bars.bar(len(scores), desc, "score") as fitting:
        for name, cls in scores.items():
            fitting.set_description_str(f"{desc}: {name}")  # the parameter searches (sisom, knn, ...) take a while
            fitted[name] = cls.fit(ml_data if name in MULTI_LAYER else data, fitted, **params.get(name, {}))
            fitting.update(1)
    return fitted


def new_class_worlds(spec: ExportSpec, feature_dim: int, bank_images: np.ndarray, scores: dict[str, Score],
                     reference_images: np.ndarray, reference_labels: np.ndarray) -> list:
    """The leave-one-class-out worlds of the fused choice's ``new`` group (:mod:`oodguard.export.new_classes`):
    for each of ``spec.new_class_holdouts`` classes, a classifier trained without it (``spec.new_class_epochs``),
    every score fitted on its features with the parameters chosen here."""
    held = new_classes.held_out_classes(reference_labels, len(spec.class_names), spec.seed, spec.new_class_holdouts)
    out = []
    for c in bars.track(held, desc="new-class validation: train without a class", unit="class"):
        out.append(new_classes.retrained_world(
            c, spec.backbone, feature_dim, bank_images, np.asarray(spec.bank_data.labels, np.int64), reference_images,
            reference_labels, scores, lambda data, params: fit_scores(data, params, desc="fit scores without a class"),
            spec.new_class_epochs, spec.seed))
    return out


def multi_layer_bank(data: FitData, size: int | None) -> np.ndarray:
    """The multi-layer scores' bank: ``data.bank`` when it holds at most ``size`` samples (or ``size`` is
    None), else a class-stratified random draw of ``size`` of them (water-filled quotas, seeded)."""
    if size is None or len(data.bank) <= size:
        return data.bank
    pick = reduce_bank(data.features[data.bank], data.labels[data.bank], size, data.seed + 11, method="random")
    return data.bank[pick]


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
    bank_images, features, logits, layer_data = _extract_training_features(spec, classifier, progress, lap)
    ood, ood_features, ood_logits, ood_layer_data = _extract_validation_ood(spec, classifier, bank_images, user_sets,
                                                                            layer_data is not None, lap)
    split = _CalibrationSplit.of(spec)
    labels = spec.bank_data.labels
    data = FitData(
        features=features, logits=logits, labels=labels, bank=np.arange(len(labels)),
        head_weight=classifier.head.weight.detach().numpy(), head_bias=classifier.head.bias.detach().numpy(),
        validation_ood_features=ood_features, validation_ood_logits=ood_logits, seed=spec.seed,
        validation_ood_groups=ood.groups, layers=layer_data, validation_ood_layers=ood_layer_data,
    )
    chosen = _fit_bank_scores(spec, classifier, data, ood, split, progress, lap)
    scores = _add_fused_score(spec, classifier, bank_images, chosen, ood, split, progress, lap)

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


def _extract_training_features(spec: ExportSpec, classifier, progress: Callable[[str], None], lap):
    """The bank images as model inputs, their features and logits, and (multi-layer only) their per-layer data."""
    bank_images = spec.preprocessing.apply(spec.bank_data.images)
    with bars.phase(f"extract training features ({len(bank_images)} images)"):
        features, logits = extract(classifier, bank_images)
    layer_data = extract_layers(classifier, bank_images, progress) if spec.multi_layer else None
    lap("extract training features" + (" and layers" if layer_data is not None else ""))
    return bank_images, features, logits, layer_data


def _extract_validation_ood(spec: ExportSpec, classifier, bank_images: np.ndarray, user_sets: list[ValidationOOD],
                            with_layers: bool, lap):
    """The validation OOD (synthetic plus the user's sets) and its features: what the score and bank choices rank on."""
    with bars.phase("validation OOD: build it and extract its features"):
        ood = validation_set(spec, bank_images, spec.bank_data.labels, user_sets)
        ood_features, ood_logits = extract(classifier, ood.images)
        ood_layer_data = layers.extract(classifier, ood.images) if with_layers and len(ood) else None
    lap(f"validation OOD ({len(ood)}: {ood.group_sizes})")
    return ood, ood_features, ood_logits, ood_layer_data


@dataclass
class _CalibrationSplit:
    """The calibration images as model inputs and their halves: *references* (fused score) and *held* (its threshold)."""

    images: np.ndarray
    references: np.ndarray | None
    held: np.ndarray | None
    reference_images: np.ndarray | None

    @classmethod
    def of(cls, spec: ExportSpec) -> "_CalibrationSplit":
        """The split of ``spec.calibration_data`` (no halves when it is too small to halve)."""
        images = spec.preprocessing.apply(spec.calibration_data.images)
        references, held = split_calibration(len(spec.calibration_data), spec.calibration_data.labels,
                                             spec.target_tpr, spec.seed)
        return cls(images, references, held, images[references] if references is not None else None)


@dataclass
class _BankChoice:
    """The kept bank (method, indices), the scores fitted on it and their reference / validation OOD outputs."""

    method: str
    comparison: dict
    bank: np.ndarray
    scores: dict[str, Score]
    outputs: tuple | None


def _fit_bank_scores(spec: ExportSpec, classifier, data: FitData, ood: ValidationOOD, split: _CalibrationSplit,
                     progress: Callable[[str], None], lap) -> _BankChoice:
    """Fit the registry's scores on each candidate bank and keep the better bank (see :func:`choose_bank`)."""
    candidates = fit_bank_candidates(spec, classifier, data, ood, split.reference_images)
    bank_method, bank_comparison = choose_bank(candidates, ood.groups)
    bank, scores, outputs = candidates[bank_method]
    lap(f"fit scores (bank: {bank_method}, {len(bank)} of {len(data.labels)})")
    if bank_comparison:
        progress(f"  bank comparison (worst-group validation AUROC per bank-based score): {_figures(bank_comparison)}")
    return _BankChoice(bank_method, bank_comparison, bank, scores, outputs)


def _add_fused_score(spec: ExportSpec, classifier, bank_images: np.ndarray, chosen: _BankChoice, ood: ValidationOOD,
                     split: _CalibrationSplit, progress: Callable[[str], None], lap) -> dict[str, Score]:
    """The chosen bank's scores plus the fused score chosen on the references (without it, and a note, if there are none)."""
    scores, outputs = chosen.scores, chosen.outputs
    if outputs is None:
        progress(f"  note: {len(spec.calibration_data)} calibration samples are too few to split for the fused score "
                 f"(each half needs {minimum_size(spec.target_tpr)}): this version has no '{FUSED}' score")
        return scores
    held_out_worlds = _new_class_validation(spec, classifier, bank_images, scores, split, progress, lap)
    with bars.phase(f"choose the {FUSED} score"):
        fusion = PValueFusion.from_references({n: outputs[0][n] for n in scores},
                                              {n: outputs[1][n] for n in scores},
                                              ood.groups, worlds=held_out_worlds,
                                              **spec.score_params.get(FUSED, {}))
    scores = {**scores, FUSED: fusion}
    chosen_fusion = fusion.selection.get("chosen", {})
    lap(f"fused: {fusion.combination}({', '.join(fusion.components)}) on {len(split.references)} reference samples"
        + (f", validation AUROC {_figures({k: v for k, v in chosen_fusion['auroc'].items()})}" if chosen_fusion else ""))
    return scores


def _new_class_validation(spec: ExportSpec, classifier, bank_images: np.ndarray, scores: dict[str, Score],
                          split: _CalibrationSplit, progress: Callable[[str], None], lap) -> list:
    """The fused choice's leave-one-class-out worlds, when the run's training recipe is known (else none, with a note)."""
    held_out_worlds = []
    if spec.new_class_holdouts and not spec.new_class_epochs:
        progress("  note: no new-class validation: it retrains the classifier with the run's recipe, and this "
                 "checkpoint has no training.json beside it")
    if (spec.new_class_holdouts and spec.new_class_epochs and FUSED not in spec.score_params
            and spec.calibration_data.labels is not None):
        held_out_worlds = new_class_worlds(spec, classifier.feature_dim, bank_images, scores, split.reference_images,
                                           spec.calibration_data.labels[split.references])
        if held_out_worlds:
            lap(f"new-class validation: {len(held_out_worlds)} classes held out in turn "
                f"({sum(len(next(iter(w.new.values()))) for w in held_out_worlds)} reference images)")
    return held_out_worlds


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
               split: _CalibrationSplit, lap) -> dict:
    """The thresholds at the target TPR, from the exported graph in ONNX Runtime (what is served is what is calibrated)."""
    outputs = OnnxModel(staging / MODEL_FILE).run(split.images, desc="calibrate: ONNX Runtime")
    thresholds = fit_thresholds(outputs, [n for n in model.score_names if n != FUSED], spec.target_tpr)
    if FUSED in scores:  # on the held half only: its references came from the other
        thresholds[FUSED] = fit_threshold(FUSED, outputs[FUSED][split.held], spec.target_tpr)
    lap(f"calibrate ({len(spec.calibration_data)} held-out in-distribution samples"
        + (f"; {FUSED} on {len(split.held)} of them)" if FUSED in scores else ")"))
    return thresholds


def _calibration_record(spec: ExportSpec, model: fused.FusedModel, scores: dict[str, Score], chosen: _BankChoice,
                        ood: ValidationOOD, thresholds: dict, per_class: dict[str, int], few: dict[str, int],
                        split: _CalibrationSplit) -> Calibration:
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


def extract_layers(classifier, images: np.ndarray, progress: Callable[[str], None]):
    """The multi-layer SISOM inputs of the training images (:func:`oodguard.export.layers.extract`), after
    checking the backbone's hand-written gradients against autograd on a few of them; None (and a note) for a
    backbone without ``sisom_stages``."""
    if layers.names(classifier.backbone) == (layers.PENULTIMATE,):
        progress(f"  note: backbone {type(classifier.backbone).__name__} has no sisom_stages(): "
                 "sisom_ml and sisome_ml use the penultimate layer only")
        return None
    errors = layers.check(classifier, images[:8])
    progress(f"  multi-layer SISOM: layers {list(errors)}, gradient check against autograd "
             f"(largest relative error {max(errors.values()):.1e})")
    with bars.phase(f"extract training layers ({len(images)} images)"):
        return layers.extract(classifier, images)


def user_validation_sets(spec: ExportSpec) -> list[ValidationOOD]:
    """Each ``--validation-ood`` set as model inputs (group ``user:<spec>``, at most ``validation_ood_size``
    images each, seeded). Read before any slow step; a missing, unreadable, empty or wrongly shaped set is a
    :class:`ValueError` naming it."""
    from oodguard.evaluation import resolve_dataset

    rng = np.random.default_rng(spec.seed)
    parts = []
    for text in spec.validation_ood_specs:
        try:
            images = resolve_dataset(text, spec.preprocessing, seed=spec.seed).images
            if len(images) == 0:
                raise ValueError("the set holds no image")
            if len(images) > spec.validation_ood_size:
                images = images[np.sort(rng.choice(len(images), size=spec.validation_ood_size, replace=False))]
            x = spec.preprocessing.apply(images)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"--validation-ood {text}: {exc}") from None
        parts.append(ValidationOOD(x, np.full(len(x), f"user:{text}", dtype=object)))
    return parts


def validation_set(spec: ExportSpec, bank_images: np.ndarray, labels: np.ndarray,
                   user_sets: list[ValidationOOD]) -> ValidationOOD:
    """Synthetic validation OOD from training images (groups near / far) plus the user's sets."""
    return ValidationOOD.concatenate([validation_ood(bank_images, labels, spec.validation_ood_size, spec.seed),
                                      *user_sets])


def split_calibration(n: int, labels: np.ndarray | None, target_tpr: float, seed: int):
    """``(references, held)`` index arrays halving the calibration split per class (seeded), or
    ``(None, None)`` when a half would be too small for a threshold."""
    if n < 2 * minimum_size(target_tpr):
        return None, None
    rng = np.random.default_rng(seed + 7)
    order = rng.permutation(n)
    if labels is not None:  # alternate within each class: both halves get every class
        order = order[np.argsort(np.asarray(labels)[order], kind="stable")]
    first = int(rng.integers(2))
    return np.sort(order[first::2]), np.sort(order[1 - first::2])


def fit_bank_candidates(spec: ExportSpec, classifier, data: FitData, ood: ValidationOOD,
                        reference_images: np.ndarray | None) -> dict:
    """Per bank method (``full`` without a reduction; else ``probcover`` and/or ``random``): the bank, the
    registry's scores fitted on it, and their PyTorch outputs on the reference images and the validation OOD
    (None without references)."""
    params = {name: p for name, p in spec.score_params.items() if name != FUSED}
    reduced = spec.bank_size is not None and spec.bank_size < len(data.labels)
    methods = (BANK_METHODS if spec.bank_method == "auto" else (spec.bank_method,)) if reduced else ("full",)
    candidates = {}
    for method in methods:
        bank = (np.arange(len(data.labels)) if method == "full"
                else reduce_bank(data.features, data.labels, spec.bank_size, spec.seed, method=method))
        scores = fit_scores(dataclasses.replace(data, bank=bank), params, spec.multi_layer, spec.multi_layer_bank_size,
                            desc=f"fit scores ({method} bank)")
        outputs = None
        if reference_images is not None:
            model = fused.FusedModel(classifier, scores).eval()
            outputs = (fused.run_torch(model, reference_images, desc=f"score the references ({method} bank)"),
                       fused.run_torch(model, ood.images, desc=f"score the validation OOD ({method} bank)"))
        candidates[method] = (bank, scores, outputs)
    return candidates


def choose_bank(candidates: dict, groups: np.ndarray) -> tuple[str, dict]:
    """The bank method to keep and, when there was a choice, each method's worst-group validation AUROC per
    bank-based score. ProbCover is kept only if it is at least as good as the random bank for every
    bank-based score (worst group first, then the mean); otherwise the random bank."""
    if len(candidates) == 1 or any(outputs is None for _, _, outputs in candidates.values()):
        return next(iter(candidates)), {}
    comparison = {}
    for method, (_, scores, (id_out, ood_out)) in candidates.items():
        comparison[method] = {name: objective(id_out[name], ood_out[name], groups)
                              for name, score in scores.items() if score.uses_bank}
    probcover, random = comparison["probcover"], comparison["random"]
    keep = all(key(probcover[name]) >= key(random[name]) for name in probcover)
    return ("probcover" if keep else "random"), comparison


def _figures(table: dict) -> str:
    """A compact rendering of nested AUROC figures for the export log."""
    if all(isinstance(v, float) for v in table.values()):
        return ", ".join(f"{k} {v:.4f}" for k, v in table.items())
    return "; ".join(f"{method}: " + ", ".join(f"{name} {r['worst']:.4f}" for name, r in rows.items())
                     for method, rows in table.items())


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

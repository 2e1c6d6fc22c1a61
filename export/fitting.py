"""Fitting the export's scores: the bank, every score of the registry, and the ``fused`` score.

The bank: when ``bank_size`` is smaller than the training set, a class-wise ProbCover bank and a
class-stratified random bank are both fitted, and ProbCover is kept only if it is at least as good on the
validation OOD for every bank-based score (:func:`choose_bank`). Every score of the registry is fitted on the
kept bank (:func:`fit_scores`; the multi-layer scores only with ``multi_layer``: see below). The ``fused``
score is chosen and fitted on one half of the held-out calibration split
(:mod:`oodguard.export.scores.pvalue_fusion`); when the run's training recipe is known, the leave-one-class-out
worlds of :mod:`oodguard.export.new_classes` are its ``new`` validation group.

The calibration split is halved per class (seeded, :func:`split_calibration`): *references* (the fused score's
reference scores, the fused choice and the bank choice) and *held* (the fused threshold, fitted by
:mod:`oodguard.export.pipeline`). Every other score's threshold uses the whole split. A calibration split too
small to halve (each half needs :func:`~oodguard.export.calibrate.minimum_size` samples) gives a version
without ``fused``, and the log says so; the gateway then decides with its fallback score.

**Multi-layer SISOM is opt-in** (``multi_layer``, ``oodguard export --multi-layer``; default off). Without it
the export extracts no per-layer data and the graph has no ``sisom_ml`` / ``sisome_ml`` outputs, no backward
pass and no second bank, so the default export pays nothing for it. With it, the two scores get a bank of their
own: the export's bank (full, or as ``bank_size`` chose it) cut to at most ``multi_layer_bank_size`` samples by
a class-stratified random draw (water-filled quotas, seeded; :func:`multi_layer_bank`). Their distances run on
a wider feature (several layers' features concatenated, not the penultimate one's alone), so on a full bank
they would be the largest part of the graph, in time and in size
(docs/benchmarks.md#fitting-multi-layer-bank-size).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from oodguard import progress as bars

from . import fused, new_classes
from .bank import METHODS as BANK_METHODS
from .bank import reduce_bank
from .calibrate import minimum_size
from .scores import MULTI_LAYER, SCORES, FitData, Score, registry
from .scores.pvalue_fusion import NAME as FUSED, PValueFusion
from .spec import ExportSpec
from .validation import ValidationOOD, key, objective


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


def multi_layer_bank(data: FitData, size: int | None) -> np.ndarray:
    """The multi-layer scores' bank: ``data.bank`` when it holds at most ``size`` samples (or ``size`` is
    None), else a class-stratified random draw of ``size`` of them (water-filled quotas, seeded)."""
    if size is None or len(data.bank) <= size:
        return data.bank
    pick = reduce_bank(data.features[data.bank], data.labels[data.bank], size, data.seed + 11, method="random")
    return data.bank[pick]


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


@dataclass
class BankChoice:
    """The kept bank (method, indices), the scores fitted on it and their reference / validation OOD outputs."""

    method: str
    comparison: dict
    bank: np.ndarray
    scores: dict[str, Score]
    outputs: tuple | None


def fit_bank_scores(spec: ExportSpec, classifier, data: FitData, ood: ValidationOOD, split: CalibrationSplit,
                    progress: Callable[[str], None], lap) -> BankChoice:
    """Fit the registry's scores on each candidate bank and keep the better bank (see :func:`choose_bank`)."""
    candidates = fit_bank_candidates(spec, classifier, data, ood, split.reference_images)
    bank_method, bank_comparison = choose_bank(candidates, ood.groups)
    bank, scores, outputs = candidates[bank_method]
    lap(f"fit scores (bank: {bank_method}, {len(bank)} of {len(data.labels)})")
    if bank_comparison:
        progress(f"  bank comparison (worst-group validation AUROC per bank-based score): {_figures(bank_comparison)}")
    return BankChoice(bank_method, bank_comparison, bank, scores, outputs)


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


@dataclass
class CalibrationSplit:
    """The calibration images as model inputs and their halves: *references* (fused score) and *held* (its threshold)."""

    images: np.ndarray
    references: np.ndarray | None
    held: np.ndarray | None
    reference_images: np.ndarray | None

    @classmethod
    def of(cls, spec: ExportSpec) -> "CalibrationSplit":
        """The split of ``spec.calibration_data`` (no halves when it is too small to halve)."""
        images = spec.preprocessing.apply(spec.calibration_data.images)
        references, held = split_calibration(len(spec.calibration_data), spec.calibration_data.labels,
                                             spec.target_tpr, spec.seed)
        return cls(images, references, held, images[references] if references is not None else None)


def add_fused_score(spec: ExportSpec, classifier, bank_images: np.ndarray, chosen: BankChoice, ood: ValidationOOD,
                    split: CalibrationSplit, progress: Callable[[str], None], lap) -> dict[str, Score]:
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
                          split: CalibrationSplit, progress: Callable[[str], None], lap) -> list:
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


def _figures(table: dict) -> str:
    """A compact rendering of nested AUROC figures for the export log."""
    if all(isinstance(v, float) for v in table.values()):
        return ", ".join(f"{k} {v:.4f}" for k, v in table.items())
    return "; ".join(f"{method}: " + ", ".join(f"{name} {r['worst']:.4f}" for name, r in rows.items())
                     for method, rows in table.items())

"""Score datasets with an exported model version and compare ID against OOD sets, per score.

Scores come from the exported ONNX model (what is served), never from a separate code path. Images
of another shape are converted with the version's recorded preprocessing, and the conversion is
reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import progress
from .calibration import Calibration
from .datasets import Dataset
from .datasets import load_dataset
from .ood_metrics import aupr_in, aupr_out, auroc, fpr_at_tpr
from .onnx_runner import OnnxModel
from .preprocess import Preprocessing
from .repository import CALIBRATION_FILE, MODEL_FILE, RepositoryError, version_dir, versions

METRICS = ("auroc", "fpr_at_95tpr", "aupr_in", "aupr_out", "calibrated_tpr", "calibrated_fpr")
SYNTHETIC_SIZE = 2000


@dataclass
class ScoredSet:
    name: str
    scores: dict[str, np.ndarray]
    conversion: list[str]
    logits: np.ndarray | None = None


class VersionScorer:
    """One model version folder: its ONNX session, calibration and preprocessing."""

    def __init__(self, version_dir: str | Path):
        version_dir = Path(version_dir)
        self.calibration = Calibration.load(version_dir / CALIBRATION_FILE)
        self.model = OnnxModel(version_dir / MODEL_FILE)
        self.preprocessing = Preprocessing.from_dict(self.calibration.model["preprocessing"])

    @property
    def score_names(self) -> list[str]:
        return list(self.calibration.model["scores"])

    def score(self, name: str, dataset: Dataset, desc: str | None = None) -> ScoredSet:
        """``dataset`` through the model; ``desc`` names a progress bar over its batches (on a terminal only)."""
        outputs = self.model.run(self.preprocessing.apply(dataset.images), desc=desc)
        conversion = self.preprocessing.conversion_steps(dataset.images.shape[1:])
        return ScoredSet(name, {s: outputs[s] for s in self.score_names}, conversion, outputs["logits"])


def compare(scorer: VersionScorer, in_dist: ScoredSet, ood: ScoredSet) -> dict[str, dict[str, float]]:
    """Per score: AUROC, FPR@95TPR (OOD accepted at 95% ID kept), AUPR-In, AUPR-Out, and the realised
    TPR (ID accepted) / FPR (OOD accepted) at the calibrated threshold."""
    rows = {}
    for name in scorer.score_names:
        threshold = scorer.calibration.thresholds[name]
        id_scores, ood_scores = in_dist.scores[name], ood.scores[name]
        rows[name] = {
            "auroc": auroc(id_scores, ood_scores),
            "fpr_at_95tpr": fpr_at_tpr(id_scores, ood_scores, 0.95),
            "aupr_in": aupr_in(id_scores, ood_scores),
            "aupr_out": aupr_out(id_scores, ood_scores),
            "calibrated_tpr": float(np.mean(~threshold.is_ood(id_scores))),
            "calibrated_fpr": float(np.mean(~threshold.is_ood(ood_scores))),
        }
    return rows


def uniform_noise(count: int, shape: tuple[int, ...], seed: int = 0) -> Dataset:
    """Far-OOD: uint8 images of independent uniform pixels."""
    images = np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)
    return Dataset(images, None, None, f"uniform-noise(seed={seed})")


def gaussian_blobs(count: int, shape: tuple[int, ...], seed: int = 0) -> Dataset:
    """Far-OOD: 1-4 bright Gaussian blobs of random position, width and brightness on black."""
    rng = np.random.default_rng(seed)
    height, width = shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    images = np.zeros((count, height, width), np.float64)
    for image in images:
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            sigma = rng.uniform(0.05, 0.25) * min(height, width)
            image += rng.uniform(0.4, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    images = np.round(255 * np.clip(images, 0, 1)).astype(np.uint8)
    if len(shape) == 3:
        images = np.repeat(images[..., None], shape[2], axis=3)
    return Dataset(images, None, None, f"gaussian-blobs(seed={seed})")


SYNTHETIC = {"uniform": uniform_noise, "blobs": gaussian_blobs}


def resolve_dataset(spec: str, preprocessing: Preprocessing, seed: int = 0) -> Dataset:
    """A dataset spec (see :func:`oodguard.datasets.load_dataset`) or ``synthetic:uniform|blobs[:COUNT]``,
    generated at the model's input size."""
    if not spec.startswith("synthetic:"):
        return load_dataset(spec)
    _, kind, *count = spec.split(":")
    if kind not in SYNTHETIC:
        raise ValueError(f"unknown synthetic set {kind!r}; choose from {sorted(SYNTHETIC)}")
    shape = (preprocessing.height, preprocessing.width) + ((3,) if preprocessing.channels == 3 else ())
    return SYNTHETIC[kind](int(count[0]) if count else SYNTHETIC_SIZE, shape, seed)


@dataclass
class OodSet:
    name: str
    spec: str
    group: str  # "near", "far", "new" (classes the model never learned) or "" (ungrouped)
    classes: list[int] | None = None  # only these labels of the dataset (a class holdout's unseen classes)


#: OOD groups a report averages over: dataset shift (near, far) and classes the model never learned (new)
GROUPS = ("near", "far", "new")


def new_class_set(id_spec: str, classes: list[int]) -> OodSet:
    """The OOD set of a class holdout: the ID dataset's images of ``classes``, which the model never learned."""
    return OodSet(f"classes {','.join(map(str, classes))}", id_spec, "new", list(classes))


def parse_ood(text: str) -> OodSet:
    """``NAME=SPEC[:near|far|new]``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--ood {text!r}: expected NAME=PATH[:near|far|new]")
    spec, _, group = rest.rpartition(":")
    if group not in GROUPS:
        spec, group = rest, ""
    return OodSet(name, spec, group)


def resolve_version(repository: str | Path, model: str, version: int | None) -> Path:
    available = versions(repository, model)
    if not available:
        raise RepositoryError(f"model {model!r} has no versions in {repository}")
    if version is None:
        version = available[-1]
    elif version not in available:
        raise RepositoryError(f"model {model!r} has no version {version} (versions: {available})")
    return version_dir(repository, model, version)


def label_names(dataset: Dataset) -> np.ndarray:
    """Each item's label as a class name (the dataset's class names, else the label number as text)."""
    names = dataset.class_names or [str(c) for c in range(int(dataset.labels.max()) + 1)]
    return np.asarray(names, dtype=object)[dataset.labels]


def known_id_set(scorer: VersionScorer, dataset: Dataset, classes: list[int] | None) -> tuple[Dataset, dict]:
    """The ID set restricted to ``classes`` (labels the model knows), and what was left out or is unknown to
    the model: labels outside ``classes`` are reported and not counted as in-distribution; without
    ``classes``, labels whose names are not classes of the model are reported (and stay in the set)."""
    info: dict = {}
    if dataset.labels is None:
        if classes is not None:
            raise ValueError(f"{dataset.source}: --classes needs a labeled ID set")
        return dataset, info
    if classes is not None:
        keep = np.isin(dataset.labels, classes)
        left_out = sorted(set(label_names(dataset)[~keep].tolist()))
        info["left_out"] = {"n": int((~keep).sum()), "labels": left_out}
        dataset = dataset.take(np.flatnonzero(keep))
    unknown = labels_unknown_to(scorer.calibration.class_names, dataset)
    if unknown:
        info["unknown_labels"] = {"n": sum(unknown.values()), "labels": sorted(unknown)}
    return dataset, info


def labels_unknown_to(class_names: list[str], dataset: Dataset) -> dict[str, int]:
    """Per label name of ``dataset`` that is none of ``class_names``, how many items carry it ({} unlabeled)."""
    if dataset.labels is None or len(dataset.labels) == 0:
        return {}
    names, counts = np.unique(label_names(dataset).astype(str), return_counts=True)
    known = set(class_names)
    return {str(n): int(c) for n, c in zip(names, counts) if str(n) not in known}


def classification_accuracy(scorer: VersionScorer, dataset: Dataset, scored: ScoredSet) -> dict | None:
    """Top-1 accuracy on the items whose label names a class of the model, overall and per class."""
    if dataset.labels is None or scored.logits is None:
        return None
    names = scorer.calibration.class_names
    truth = label_names(dataset)
    known = np.isin(truth, names)
    if not known.any():
        return None
    predicted = np.asarray(names, dtype=object)[np.argmax(scored.logits, axis=1)]
    hit = predicted == truth
    per_class = {name: float(hit[truth == name].mean()) for name in names if np.any(truth == name)}
    return {"overall": float(hit[known].mean()), "n": int(known.sum()), "per_class": per_class}


def score_sets(scorer: VersionScorer, id_spec: str, oods: list[OodSet], seed: int = 0,
               classes: list[int] | None = None) -> tuple[ScoredSet, list[ScoredSet], dict]:
    """Score the ID set (restricted to ``classes``) and every OOD set with the exported model; the third
    value says what the ID set held: labels left out, labels unknown to the model, classification accuracy."""
    with progress.phase(f"load ID set {id_spec}"):
        dataset, info = known_id_set(scorer, resolve_dataset(id_spec, scorer.preprocessing, seed), classes)
    in_dist = scorer.score("id", dataset, desc="score ID set")
    accuracy = classification_accuracy(scorer, dataset, in_dist)
    if accuracy is not None:
        info["accuracy"] = accuracy
    scored = []
    for number, ood in enumerate(oods, 1):
        with progress.phase(f"load OOD set {ood.name} ({number}/{len(oods)})"):
            dataset = resolve_dataset(ood.spec, scorer.preprocessing, seed)
            if ood.classes is not None:
                dataset = dataset.select_classes(ood.classes)  # a clear error for labels it lacks
        scored.append(scorer.score(ood.name, dataset, desc=f"score OOD set {ood.name} ({number}/{len(oods)})"))
    return in_dist, scored, info


def build_report(scorer: VersionScorer, id_spec: str, in_dist: ScoredSet, oods: list[OodSet], scored: list[ScoredSet],
                 id_info: dict | None = None) -> dict:
    """Metrics per OOD set × score, and plain means over the near and far groups."""
    report: dict = {
        "model": scorer.calibration.model["name"],
        "version": scorer.calibration.model.get("version"),
        "id": {"spec": id_spec, "n": len(next(iter(in_dist.scores.values()))), "conversion": in_dist.conversion,
               **(id_info or {})},
        "conventions": "scores higher = more OOD; FPR@95TPR = fraction of OOD accepted at the threshold keeping "
                       "95% of ID; calibrated_tpr/fpr = ID/OOD accepted at calibration.json's threshold",
        "sets": {},
        "groups": {},
    }
    for ood, result in zip(oods, scored):
        report["sets"][ood.name] = {
            "spec": ood.spec, "group": ood.group, "n": len(next(iter(result.scores.values()))),
            "conversion": result.conversion, "metrics": compare(scorer, in_dist, result),
        }
    for group in GROUPS:
        members = [s for s in report["sets"].values() if s["group"] == group]
        if members:
            report["groups"][group] = {
                score: {m: float(np.mean([s["metrics"][score][m] for s in members])) for m in METRICS}
                for score in scorer.score_names
            }
    return report


def evaluate(scorer: VersionScorer, id_spec: str, oods: list[OodSet], seed: int = 0,
             classes: list[int] | None = None) -> dict:
    """Score the ID set (its ``classes`` only, when given) and every OOD set with the exported model; metrics
    per set × score, group means, and the ID set's classification accuracy."""
    in_dist, scored, info = score_sets(scorer, id_spec, oods, seed, classes)
    return build_report(scorer, id_spec, in_dist, oods, scored, info)


def format_report(report: dict) -> str:
    header = f"{'score':<10}{'AUROC':>8}{'FPR@95':>8}{'AUPR-In':>9}{'AUPR-Out':>9}{'TPR@cal':>9}{'FPR@cal':>9}"
    lines = [f"model {report['model']} version {report['version']}; ID {report['id']['spec']} (n={report['id']['n']})"
             + (f", converted: {', '.join(report['id']['conversion'])}" if report['id']['conversion'] else ""),
             "metrics in %; " + report["conventions"]]
    ident = report["id"]
    if "accuracy" in ident:
        acc = ident["accuracy"]
        lines.append(f"classification accuracy {100 * acc['overall']:.2f}% on {acc['n']} ID images; per class: "
                     + ", ".join(f"{name} {100 * value:.1f}" for name, value in acc["per_class"].items()))
    if "left_out" in ident:
        lines.append(f"left out of the ID set (outside --classes): {ident['left_out']['n']} images of labels "
                     f"{ident['left_out']['labels']}")
    if "unknown_labels" in ident:
        lines.append(f"warning: {ident['unknown_labels']['n']} ID images have labels the model does not know "
                     f"({ident['unknown_labels']['labels']}) and are counted as in-distribution; give --classes")

    def table(title: str, metrics: dict) -> None:
        lines.extend(["", title, header])
        for score, row in metrics.items():
            lines.append(f"{score:<10}" + "".join(f"{100 * row[m]:>{w}.2f}" for m, w in zip(METRICS, (8, 8, 9, 9, 9, 9))))

    for name, entry in report["sets"].items():
        conversion = f"; converted: {', '.join(entry['conversion'])}" if entry["conversion"] else ""
        group = f" [{entry['group']}]" if entry["group"] else ""
        table(f"OOD {name}{group}: {entry['spec']} (n={entry['n']}){conversion}", entry["metrics"])
    for group, metrics in report["groups"].items():
        table(f"mean over {group}-OOD sets", metrics)
    return "\n".join(lines)

"""Calibrated thresholds as stored in ``calibration.json``, read by the gateway and by evaluation.

Convention: every score is *higher = more OOD*; an input is accepted as in-distribution when
``score <= threshold`` and flagged when ``score > threshold``. Thresholds are fitted on the export
side (:mod:`oodguard.export.calibrate`); this module reads, validates and applies them with NumPy only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "oodguard.calibration/1"
DIRECTION = "higher_is_ood"


class CalibrationError(ValueError):
    """A calibration file is missing, malformed, or inconsistent with its model."""


def conformal_p_values(sorted_references: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(1 + #{references >= s}) / (n + 1)`` per score, against ascending ``sorted_references`` (float64)."""
    n = len(sorted_references)
    at_least = n - np.searchsorted(sorted_references, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + at_least) / (n + 1.0)


@dataclass(frozen=True)
class ScoreThreshold:
    """The 95%-TPR threshold of one score and the calibration sample it came from."""

    name: str
    threshold: float
    target_tpr: float
    n: int
    accepted: int
    achieved_tpr: float
    achieved_tpr_ci95: tuple[float, float]
    sorted_scores: np.ndarray = field(repr=False)

    def is_ood(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values ``(1 + #{calib >= s}) / (n + 1)``: small means unlike the ID calibration data."""
        return conformal_p_values(self.sorted_scores, scores)

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "direction": DIRECTION,
            "target_tpr": self.target_tpr,
            "n": self.n,
            "accepted": self.accepted,
            "achieved_tpr": self.achieved_tpr,
            "achieved_tpr_ci95": list(self.achieved_tpr_ci95),
            "sorted_scores": self.sorted_scores.tolist(),
        }

    @classmethod
    def from_dict(cls, name: str, raw: dict) -> "ScoreThreshold":
        try:
            if raw["direction"] != DIRECTION:
                raise CalibrationError(f"score {name!r}: direction {raw['direction']!r}, expected {DIRECTION!r}")
            sorted_scores = np.asarray(raw["sorted_scores"], dtype=np.float64)
            item = cls(
                name=name,
                threshold=float(raw["threshold"]),
                target_tpr=float(raw["target_tpr"]),
                n=int(raw["n"]),
                accepted=int(raw["accepted"]),
                achieved_tpr=float(raw["achieved_tpr"]),
                achieved_tpr_ci95=(float(raw["achieved_tpr_ci95"][0]), float(raw["achieved_tpr_ci95"][1])),
                sorted_scores=sorted_scores,
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"score {name!r}: malformed entry ({exc!r})") from exc
        if item.n != len(sorted_scores) or item.n < 1:
            raise CalibrationError(f"score {name!r}: n={item.n} but {len(sorted_scores)} calibration scores stored")
        if not math.isfinite(item.threshold) or np.any(np.diff(sorted_scores) < 0):
            raise CalibrationError(f"score {name!r}: threshold not finite or calibration scores not sorted")
        return item


@dataclass(frozen=True)
class Calibration:
    """One model version's ``calibration.json``: model metadata plus a threshold per score."""

    model: dict
    thresholds: dict[str, ScoreThreshold]
    data: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.model["class_names"])

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model,
            "calibration_data": self.data,
            "scores": {name: t.to_dict() for name, t in self.thresholds.items()},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, raw: dict) -> "Calibration":
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CalibrationError(f"not an oodguard calibration file (expected format {FORMAT!r})")
        for key in ("model", "scores", "calibration_data"):
            if key not in raw:
                raise CalibrationError(f"calibration file has no {key!r} section")
        for key in ("model", "scores"):
            if not isinstance(raw[key], dict):
                raise CalibrationError(f"calibration file's {key!r} section is not an object")
        model = raw["model"]
        for key in ("class_names", "input", "preprocessing", "scores"):
            if key not in model:
                raise CalibrationError(f"calibration file's model section has no {key!r}")
        thresholds = {name: ScoreThreshold.from_dict(name, entry) for name, entry in raw["scores"].items()}
        missing = set(model["scores"]) - set(thresholds)
        if missing:
            raise CalibrationError(f"no threshold for score(s) {sorted(missing)}")
        return cls(model=model, thresholds=thresholds, data=raw["calibration_data"])

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CalibrationError(f"{path}: no calibration file") from exc
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}: not valid JSON ({exc})") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{path}: cannot read calibration file ({exc})") from exc
        try:
            return cls.from_dict(raw)
        except CalibrationError as exc:
            raise CalibrationError(f"{path}: {exc}") from exc

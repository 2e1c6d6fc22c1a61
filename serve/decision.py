"""The decision: a pure function of (model outputs, a version's calibration, the policy) → one verdict per item.

Every score is *higher = more OOD*; a score *crosses* when ``score > threshold``. The policy names the
scores that decide and the mode: ``any`` flags an item when at least one deciding score crosses, ``all``
when every deciding score does. Thresholds and conformal p-values of every exported score are reported,
deciding or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from oodguard.calibration import Calibration

MODES = ("any", "all")


class PolicyError(ValueError):
    """The decision policy is invalid, or names scores the model does not export."""


@dataclass(frozen=True)
class DecisionPolicy:
    scores: tuple[str, ...] = ("sisome",)
    mode: str = "any"

    def __post_init__(self) -> None:
        if isinstance(self.scores, str):
            raise PolicyError(f"decision scores must be a sequence of names, got the string {self.scores!r}")
        if not self.scores:
            raise PolicyError("the decision policy names no score; name at least one, e.g. ('sisome',)")
        if len(set(self.scores)) != len(self.scores):
            raise PolicyError(f"the decision policy repeats a score: {list(self.scores)}")
        if self.mode not in MODES:
            raise PolicyError(f"decision mode must be 'any' or 'all', got {self.mode!r}")

    def validate(self, available: Iterable[str], where: str = "the model") -> None:
        """Raise :class:`PolicyError` unless every deciding score is among ``available``."""
        available = list(available)
        missing = [s for s in self.scores if s not in available]
        if missing:
            raise PolicyError(
                f"decision score(s) {missing} not exported by {where}; it exports {available}"
            )


@dataclass(frozen=True)
class Verdict:
    """The decision for one item."""

    ood: bool
    crossed: tuple[str, ...]  # every score with score > threshold, in the model's score order
    deciding: tuple[str, ...]
    mode: str
    scores: dict[str, float]
    thresholds: dict[str, float]
    p_values: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "ood": self.ood,
            "crossed": list(self.crossed),
            "deciding": list(self.deciding),
            "mode": self.mode,
            "thresholds": self.thresholds,
            "p_values": self.p_values,
        }


def decide(outputs: Mapping[str, np.ndarray], calibration: Calibration, policy: DecisionPolicy) -> list[Verdict]:
    """One :class:`Verdict` per batch item. ``outputs`` holds one ``[B]`` array per score named in
    ``calibration.model["scores"]`` (extra outputs such as logits and features are ignored)."""
    names = [str(n) for n in calibration.model["scores"]]
    policy.validate(names, f"model {calibration.model.get('name', '?')!r}")
    missing = [n for n in names if n not in outputs]
    if missing:
        raise PolicyError(f"model outputs lack score(s) {missing}")
    columns = {n: np.asarray(outputs[n], dtype=np.float64).reshape(-1) for n in names}
    sizes = {len(c) for c in columns.values()}
    if len(sizes) != 1:
        raise PolicyError(f"score outputs disagree on the batch size: { {n: len(c) for n, c in columns.items()} }")
    size = sizes.pop()
    crossed = {n: calibration.thresholds[n].is_ood(columns[n]) for n in names}
    p_values = {n: calibration.thresholds[n].p_values(columns[n]) for n in names}
    thresholds = {n: float(calibration.thresholds[n].threshold) for n in names}
    combine = np.any if policy.mode == "any" else np.all
    ood = combine(np.stack([crossed[n] for n in policy.scores]), axis=0)
    return [
        Verdict(
            ood=bool(ood[i]),
            crossed=tuple(n for n in names if crossed[n][i]),
            deciding=tuple(policy.scores),
            mode=policy.mode,
            scores={n: float(columns[n][i]) for n in names},
            thresholds=dict(thresholds),
            p_values={n: float(p_values[n][i]) for n in names},
        )
        for i in range(size)
    ]

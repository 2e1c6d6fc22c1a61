"""The decision: a pure function of (model outputs, a version's calibration, the policy) → one verdict per item.

Every score is *higher = more OOD*; a score *crosses* when ``score > threshold``. The policy names the
scores that decide and the mode: ``any`` flags an item when at least one deciding score crosses, ``all``
when every deciding score does. Thresholds and conformal p-values of every exported score are reported,
deciding or not.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from oodguard.calibration import Calibration

MODES = ("any", "all")
#: batches up to this many rows count calibration scores with :func:`bisect.bisect_left`, larger ones with NumPy
BISECT_MAX_ROWS = 4


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


class Decisions:
    """The verdicts of a batch, column-wise: ``scores`` / ``crossed`` / ``p_values`` are ``[B, S]`` in
    ``names`` order, ``ood`` is ``[B]``. A sequence of :class:`Verdict` (``len``, ``[i]``, iteration);
    ``[start:stop]`` is the :class:`Decisions` of those rows (views, no copies)."""

    __slots__ = ("names", "deciding", "mode", "thresholds", "scores", "crossed", "p_values", "ood")

    def __init__(self, names: tuple[str, ...], deciding: tuple[str, ...], mode: str, thresholds: np.ndarray,
                 scores: np.ndarray, crossed: np.ndarray, p_values: np.ndarray, ood: np.ndarray):
        self.names, self.deciding, self.mode, self.thresholds = names, deciding, mode, thresholds
        self.scores, self.crossed, self.p_values, self.ood = scores, crossed, p_values, ood

    def __len__(self) -> int:
        return len(self.ood)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Decisions(self.names, self.deciding, self.mode, self.thresholds, self.scores[index],
                             self.crossed[index], self.p_values[index], self.ood[index])
        return self.verdict(index)

    def __iter__(self):
        return (self.verdict(i) for i in range(len(self)))

    def verdict(self, i: int) -> Verdict:
        names = self.names
        return Verdict(
            ood=bool(self.ood[i]),
            crossed=tuple(n for n, c in zip(names, self.crossed[i].tolist()) if c),
            deciding=self.deciding,
            mode=self.mode,
            scores=dict(zip(names, self.scores[i].tolist())),
            thresholds=dict(zip(names, self.thresholds.tolist())),
            p_values=dict(zip(names, self.p_values[i].tolist())),
        )


class DecisionRule:
    """A version's calibration and the policy, prepared once (validated, thresholds as arrays) and then
    applied to each batch of outputs: ``rule(outputs) -> Decisions``. Raises :class:`PolicyError` when
    the policy names a score the calibration lacks."""

    def __init__(self, calibration: Calibration, policy: DecisionPolicy):
        self.names = tuple(str(n) for n in calibration.model["scores"])
        policy.validate(self.names, f"model {calibration.model.get('name', '?')!r}")
        self.policy = policy
        thresholds = [calibration.thresholds[n] for n in self.names]
        self.thresholds = np.array([t.threshold for t in thresholds], dtype=np.float64)
        self._sorted = [np.asarray(t.sorted_scores, dtype=np.float64) for t in thresholds]
        self._sorted_lists = [calib.tolist() for calib in self._sorted]  # for bisect on small batches
        self._n_plus_1 = np.array([t.n + 1.0 for t in thresholds], dtype=np.float64)
        self._deciding = [self.names.index(n) for n in policy.scores]

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> Decisions:
        """One verdict per batch item. ``outputs`` holds one ``[B]`` array per score of the calibration
        (extra outputs such as logits and features are ignored). Conformal p-values are
        ``(1 + #{calibration scores >= s}) / (n + 1)``, as :meth:`ScoreThreshold.p_values`."""
        try:
            columns = [outputs[n] for n in self.names]
        except KeyError:
            raise PolicyError(f"model outputs lack score(s) {[n for n in self.names if n not in outputs]}") from None
        rows = columns[0].size
        if any(c.size != rows for c in columns):
            raise PolicyError(f"score outputs disagree on the batch size: { {n: c.size for n, c in zip(self.names, columns)} }")
        scores = np.concatenate(columns, axis=None, dtype=np.float64).reshape(len(columns), rows).T  # [B, S]
        crossed = scores > self.thresholds
        if rows <= BISECT_MAX_ROWS:  # a few rows: plain bisect beats NumPy's per-call overhead
            below = np.array([[bisect.bisect_left(calib, v) for calib, v in zip(self._sorted_lists, row)]
                              for row in scores.tolist()], dtype=np.float64).reshape(rows, len(columns))
        else:
            below = np.stack([np.searchsorted(calib, column, side="left") for calib, column in zip(self._sorted, scores.T)],
                             axis=1)
        p_values = (self._n_plus_1 - below) / self._n_plus_1  # [B, S]: #{calibration >= s} = n - below
        if len(self._deciding) == 1:
            ood = crossed[:, self._deciding[0]]
        else:
            deciding = crossed[:, self._deciding]
            ood = deciding.any(axis=1) if self.policy.mode == "any" else deciding.all(axis=1)
        return Decisions(self.names, tuple(self.policy.scores), self.policy.mode, self.thresholds, scores, crossed,
                         p_values, ood)

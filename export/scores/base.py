"""What every OOD score in the fused head shares.

A score has an offline part, :meth:`Score.fit`, that builds its state (a feature bank, class means,
statistics) from the classifier's training features with NumPy, and an exported part, ``forward``, a
torch computation from ``(logits, features)`` to a ``[B]`` tensor that becomes one output of the ONNX
graph. Convention: **higher = more OOD** for every score.

A score with ``uses_layers = True`` also reads the backbone's per-layer pooled activations and loss
gradients (:mod:`oodguard.export.layers`): it names them in ``layer_names`` and its ``forward`` gets a fourth
argument, ``{layer: (a [B, C], g [B, C])}``, which the fused head computes once for all such scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class FitData:
    """Training-side arrays a score may fit on.

    ``features``/``logits``/``labels`` are the in-distribution training samples the bank is drawn from;
    ``bank`` indexes the (possibly reduced) bank inside them. ``head_weight``/``head_bias`` are the final
    linear layer. ``validation_ood_*`` are features/logits of a *validation* OOD set (synthetic, or the
    user's ``--validation-ood``, never a test set) that a score may use to tune a hyper-parameter, with the
    group of each item (``near`` / ``far`` / ``user:...``, see :mod:`oodguard.export.validation`); empty when
    none is given. ``layers`` / ``validation_ood_layers`` hold, per backbone layer, the pooled activations and
    loss gradients ``(a [N, C], g [N, C])`` of the same rows (:func:`oodguard.export.layers.extract`); None
    when the backbone names no layers.
    """

    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    bank: np.ndarray
    head_weight: np.ndarray
    head_bias: np.ndarray
    validation_ood_features: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    validation_ood_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    seed: int = 0
    validation_ood_groups: np.ndarray | None = None  # None: one group ("ood") for every validation item
    layers: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None
    validation_ood_layers: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def groups(self) -> np.ndarray:
        """The group of each validation OOD item."""
        if self.validation_ood_groups is None:
            return np.full(len(self.validation_ood_features), "ood", dtype=object)
        return np.asarray(self.validation_ood_groups, dtype=object)

    def search_subset(self, size: int) -> np.ndarray:
        """At most ``size`` bank indices (seeded; every bank sample when the bank is small enough), the
        in-distribution side of a leave-one-out hyper-parameter search."""
        if len(self.bank) <= size:
            return self.bank
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(self.bank, size=size, replace=False))

    @property
    def num_classes(self) -> int:
        return self.head_weight.shape[0]


class Score(nn.Module):
    """Base class: a fitted score is a torch module mapping ``(logits, features)`` to ``[B]``.
    ``uses_bank``: the score's state comes from the (possibly reduced) feature bank. ``uses_layers``: the
    score reads the backbone's layers (see the module docstring)."""

    name: ClassVar[str]
    uses_bank: ClassVar[bool] = False
    uses_layers: ClassVar[bool] = False
    layer_names: tuple[str, ...] = ()

    @classmethod
    def fit(cls, data: FitData, fitted: Mapping[str, "Score"], **params) -> "Score":
        """Build the fitted score. ``fitted`` holds the scores fitted before this one (registry order)."""
        return cls()

    def forward(self, logits: torch.Tensor, features: torch.Tensor, computed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def metadata(self) -> dict:
        """What the score records in calibration.json (hyper-parameters, bank size, statistics)."""
        return {}


def buffer(array: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array)).to(dtype)


def squared_distances(a: torch.Tensor, b_t: torch.Tensor, b_sq_norms: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` squared Euclidean distances from rows of ``a`` to the columns of ``b_t`` (``[D, N]``),
    via one matrix product (exportable), clamped at 0."""
    a_sq = (a * a).sum(dim=1, keepdim=True)
    return torch.clamp(a_sq + b_sq_norms.unsqueeze(0) - 2.0 * (a @ b_t), min=0.0)


def numpy_squared_distances(a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Offline float64 squared distances ``[len(a), len(b)]`` in row chunks."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    b_sq = (b * b).sum(axis=1)
    out = np.empty((len(a), len(b)), np.float64)
    for start in range(0, len(a), chunk):
        block = a[start : start + chunk]
        out[start : start + chunk] = (block * block).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * block @ b.T
    return np.maximum(out, 0.0, out=out)

"""SISOM (Schmidt et al., TMLR 2025): feature-space distance ratio of gradient-weighted features.

Enriched features, penultimate layer only (the paper's several layers are ``sisom_ml``:
:mod:`oodguard.export.scores.sisom_ml`), in closed form (no backward pass, so it exports to ONNX):
the loss is cross-entropy to the uniform target, whose gradient w.r.t. the penultimate features ``h`` of
a linear head ``z = W h + b`` is ``g = W^T (softmax(z) - 1/K)``, and ``s = sigmoid(alpha * h * g)``.
Distances are taken on ``s - 0.5 = tanh(alpha * h * g / 2) / 2`` (identical distances, no cancellation
at small alpha), centred on the bank mean, and computed in float64 inside the graph: the nearest-anchor
search subtracts nearly equal squared norms, and in float32 ``r`` differs between PyTorch and ONNX Runtime
(docs/methods.md#sisom-float64-distances-and-the-alpha-fallback). The ratio is returned as float32.

Score, for predicted class ``c = argmax z``: the anchor ``a`` is the nearest bank sample of class ``c``,
``d_in = ||s(x) - s(a)||`` and ``r = d_in / d_out(a)`` with ``d_out(a)`` the distance from the anchor to the
nearest bank sample of another class (precomputed per bank sample; guarded below by 1e-12). Higher = more OOD.

Choices where the paper is not explicit (method note, sections 2-4):

- The bank holds the enriched features of the bank samples with their *true* labels; ``d_out`` uses them.
- Bank samples scored against the bank (``r_avg``, SISOMe statistics, the alpha search) are leave-one-out
  and use their *predicted* class, as inference does.
- **Optimal sigmoid steepness (OS)**: alpha is picked on the log grid 1e-3 ... 1e4. With a validation OOD
  set (synthetic corruptions of training images or the user's ``--validation-ood``, never a test set), the
  procedure ``validation-auroc`` maximises the *worst group's* AUROC between the leave-one-out bank ratios
  and the validation-OOD ratios of each group (near, far, user sets; ties by the mean:
  :func:`oodguard.export.validation.objective`), so neither near nor far OOD alone decides; without one,
  ``min-r_avg`` minimises the leave-one-out ``r_avg`` (only the fallback: it picks the steepest alpha,
  which costs near-OOD AUROC). Ties go to the smaller
  alpha. The search uses a stratified subset of at most ``search_size`` bank samples. A fixed ``alpha``
  skips the search.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import validation
from .base import FitData, Score, buffer, numpy_squared_distances, squared_distances

ALPHA_GRID = tuple(10.0**e for e in range(-3, 5))
MIN_D_OUT = 1e-12


def enriched(features: np.ndarray, logits: np.ndarray, head_weight: np.ndarray, alpha: float) -> np.ndarray:
    """``s - 0.5`` for each row, in float64: ``tanh(alpha * h * W^T(softmax(z) - 1/K) / 2) / 2``."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    grad = (p - 1.0 / z.shape[1]) @ np.asarray(head_weight, np.float64)
    return np.tanh(alpha * np.asarray(features, np.float64) * grad / 2.0) / 2.0


def bank_geometry(bank_s: np.ndarray, labels: np.ndarray, predicted: np.ndarray, chunk: int = 2048):
    """One pass over the bank: ``d_out`` per sample, and leave-one-out ratios ``r`` of the bank itself."""
    n = len(bank_s)
    d_out = np.empty(n)
    loo_d_in = np.empty(n)
    loo_anchor = np.empty(n, np.int64)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        d2 = numpy_squared_distances(bank_s[rows], bank_s)
        d_out[rows] = np.sqrt(np.where(labels[None, :] != labels[rows, None], d2, np.inf).min(axis=1))
        d2[np.arange(len(rows)), rows] = np.inf  # leave one out
        same = np.where(labels[None, :] == predicted[rows, None], d2, np.inf)
        loo_anchor[rows] = same.argmin(axis=1)
        loo_d_in[rows] = np.sqrt(same[np.arange(len(rows)), loo_anchor[rows]])
    d_out = np.maximum(d_out, MIN_D_OUT)
    return d_out, loo_d_in / d_out[loo_anchor]


def ratios(query_s: np.ndarray, predicted: np.ndarray, bank_s, labels, d_out, chunk: int = 2048) -> np.ndarray:
    """SISOM ratios of query rows against a bank (NumPy reference of the exported computation)."""
    out = np.empty(len(query_s))
    for start in range(0, len(query_s), chunk):
        stop = start + chunk
        d2 = numpy_squared_distances(query_s[start:stop], bank_s)
        same = np.where(labels[None, :] == predicted[start:stop, None], d2, np.inf)
        anchor = same.argmin(axis=1)
        out[start:stop] = np.sqrt(same[np.arange(len(anchor)), anchor]) / d_out[anchor]
    return out


class BankRatio(Score):
    """The exported distance ratio of enriched features ``s - 0.5`` against a bank (shared by
    :class:`Sisom` and the multi-layer :class:`~oodguard.export.scores.sisom_ml.SisomMl`)."""

    uses_bank = True

    def register_bank(self, bank_s: np.ndarray, bank_labels: np.ndarray, d_out: np.ndarray) -> None:
        centre = bank_s.mean(axis=0)
        centred = bank_s - centre
        self.register_buffer("centre", buffer(centre))
        # Banks are stored transposed ([D, N]) so that the ONNX initialiser keeps its name (no folded transpose).
        self.register_buffer("bank_t", buffer(centred.T, torch.float64))
        self.register_buffer("bank_sq_norms", buffer((centred * centred).sum(axis=1), torch.float64))
        self.register_buffer("bank_labels", buffer(bank_labels, torch.int64))
        self.register_buffer("d_out", buffer(d_out, torch.float64))

    def ratio(self, s: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``r`` of enriched features ``s - 0.5`` (``[B, D]``) for the predicted classes of ``logits``."""
        d2 = squared_distances((s - self.centre).double(), self.bank_t, self.bank_sq_norms)
        same_class = self.bank_labels.unsqueeze(0) == logits.argmax(dim=1, keepdim=True)
        d2_in, anchor = torch.where(same_class, d2, torch.full_like(d2, float("inf"))).min(dim=1)
        return (torch.sqrt(d2_in) / self.d_out[anchor]).float()


class Sisom(BankRatio):
    name = "sisom"

    def __init__(self, head_weight, bank_s, bank_labels, d_out, alpha: float, info: dict):
        super().__init__()
        self.alpha = float(alpha)
        self.info = info
        self.register_buffer("head_weight", buffer(head_weight))
        self.register_bank(bank_s, bank_labels, d_out)

    @classmethod
    def fit(cls, data: FitData, fitted, alpha: float | None = None, search_size: int = 5000):
        bank_h = data.features[data.bank]
        bank_z = data.logits[data.bank]
        labels = data.labels[data.bank].astype(np.int64)
        counts = np.bincount(labels, minlength=data.num_classes)
        if counts.min() < 2:
            raise ValueError(f"sisom: the bank needs at least 2 samples of every class, got counts {counts.tolist()}")
        predicted = bank_z.argmax(axis=1)
        if alpha is None:
            alpha, search = choose_alpha(data, search_size)
        else:
            search = {"procedure": "fixed"}
        bank_s = enriched(bank_h, bank_z, data.head_weight, alpha)
        d_out, loo_r = bank_geometry(bank_s, labels, predicted)
        info = {"alpha": alpha, "alpha_search": search, "bank_size": len(labels), "loo_r": loo_r}
        return cls(data.head_weight, bank_s, labels, d_out, alpha, info)

    def forward(self, logits, features, computed):
        p = torch.softmax(logits, dim=1)
        grad = (p - 1.0 / logits.shape[1]) @ self.head_weight
        return self.ratio(torch.tanh(self.alpha * features * grad / 2.0) / 2.0, logits)

    def metadata(self):
        loo_r = self.info["loo_r"]
        return {
            "alpha": self.alpha,
            "alpha_search": self.info["alpha_search"],
            "bank_size": self.info["bank_size"],
            "layers": ["penultimate"],
            "r_avg": float(loo_r.mean()),
        }


def choose_alpha(data: FitData, search_size: int) -> tuple[float, dict]:
    """Optimal sigmoid steepness on :data:`ALPHA_GRID` (see the module docstring). Returns (alpha, record)."""
    idx = data.search_subset(search_size)
    h, z, labels = data.features[idx], data.logits[idx], data.labels[idx].astype(np.int64)
    predicted = z.argmax(axis=1)
    ood_h, ood_z = data.validation_ood_features, data.validation_ood_logits
    procedure = "validation-auroc" if len(ood_h) else "min-r_avg"
    objective, per_group = [], []
    for alpha in ALPHA_GRID:
        bank_s = enriched(h, z, data.head_weight, alpha)
        d_out, loo_r = bank_geometry(bank_s, labels, predicted)
        if procedure == "min-r_avg":
            objective.append(-float(loo_r.mean()))
        else:
            ood_r = ratios(enriched(ood_h, ood_z, data.head_weight, alpha), ood_z.argmax(axis=1), bank_s, labels, d_out)
            result = validation.objective(loo_r, ood_r, data.groups)
            objective.append(result["worst"])
            per_group.append(result)
    if per_group:  # worst group first, then the mean; the first maximum: ties go to the smaller alpha
        best = max(range(len(per_group)), key=lambda i: (validation.key(per_group[i]), -i))
    else:
        best = int(np.argmax(objective))
    record = {
        "procedure": procedure,
        "grid": list(ALPHA_GRID),
        "objective": objective,
        "objective_name": "worst validation group's AUROC" if procedure == "validation-auroc" else "-r_avg (leave-one-out)",
        **({"group_auroc": [r["auroc"] for r in per_group]} if per_group else {}),
        "search_size": int(len(idx)),
        "validation_ood_size": int(len(ood_h)),
    }
    return ALPHA_GRID[best], record

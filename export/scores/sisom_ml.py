"""Multi-layer SISOM, as the paper defines it: gradient-weighted features of several layers, concatenated.

For each layer ``j`` the backbone names (:func:`oodguard.export.layers.names`: LeNet-5 ``conv1``, ``conv2``,
``fc1``; the CIFAR ResNet-18 ``layer1``-``layer3``; always the penultimate features last), with pooled
activation ``a_j`` and pooled loss gradient ``g_j`` computed inside the graph by the hand-written backward
pass of :mod:`oodguard.export.layers`: ``s_j - 0.5 = tanh(alpha_j * a_j * g_j / 2) / 2``. The layers are
concatenated and scored by SISOM's distance ratio (nearest same-class anchor, ``d_out`` from the anchor,
float64 distances on ``s - 0.5``: :class:`~oodguard.export.scores.sisom.BankRatio`). The penultimate-only
score stays ``sisom``, so the two can be compared.

Choices (the paper and NAC tune per-layer steepness on validation data, without a procedure to copy):

- **A grid relative to each layer's scale**: ``alpha_j = c_j / rms_j`` with ``rms_j`` the root mean square of
  ``a_j * g_j`` over the search subset and ``c_j`` on :data:`RELATIVE_GRID` (1e-2 ... 1e3). Pooled gradients of
  early layers are orders of magnitude smaller than the penultimate's (ResNet-18: ~1e-6 in layer1 against
  ~1e-3), so one absolute grid would leave early layers in the sigmoid's linear range (their alpha only
  weighs them) and saturate the last; relative, ``c = 1`` is the same steepness for every layer, and the
  grid spans linear (``c = 0.01``) to binarised (``c = 1000``, NAC's regime).
- **Search** (:func:`choose_alphas`): SISOM's objective (:mod:`oodguard.export.scores.sisom`): the worst
  validation-OOD group's AUROC of the leave-one-out bank ratios against each group's ratios, ties by the mean;
  without validation OOD, ``-r_avg``. Each layer starts at its own best ``c`` (the layer scored alone), then
  coordinate ascent: sweep the layers, each over the grid with the others fixed, keeping a change only if it
  strictly improves the objective, until a sweep changes nothing (at most ``sweeps``). Squared distances add
  over layers, so a candidate recomputes one layer's distances. Every candidate's figure is recorded.
- A backbone without ``sisom_stages`` (no per-layer data): the penultimate layer alone, with this grid; the
  export log says so and ``layers`` in calibration.json is ``["penultimate"]``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .. import validation
from ..layers import penultimate
from .base import FitData, numpy_squared_distances
from .sisom import MIN_D_OUT, BankRatio, bank_geometry

RELATIVE_GRID = tuple(10.0**e for e in range(-2, 4))
log = logging.getLogger(__name__)


def products(layer_data, rows=None) -> dict[str, np.ndarray]:
    """``a_j * g_j`` per layer (float64), of ``rows`` (all rows when None)."""
    pick = slice(None) if rows is None else rows
    return {name: np.asarray(a[pick], np.float64) * np.asarray(g[pick], np.float64) for name, (a, g) in layer_data.items()}


def enriched(u: dict[str, np.ndarray], alphas: dict[str, float]) -> np.ndarray:
    """Concatenated ``s - 0.5 = tanh(alpha_j * u_j / 2) / 2`` in layer order (float64)."""
    return np.concatenate([np.tanh(alphas[name] * u[name] / 2.0) / 2.0 for name in alphas], axis=1)


class SisomMl(BankRatio):
    name = "sisom_ml"
    uses_layers = True

    def __init__(self, layer_names, alphas: dict[str, float], bank_s, bank_labels, d_out, info: dict):
        super().__init__()
        self.layer_names = tuple(layer_names)
        self.alphas = {name: float(alphas[name]) for name in self.layer_names}
        self.info = info
        self.register_bank(bank_s, bank_labels, d_out)

    @classmethod
    def fit(cls, data: FitData, fitted, relative_alpha: float | None = None, search_size: int = 2000, sweeps: int = 3):
        """``relative_alpha``: a fixed ``c`` for every layer (skips the search)."""
        layer_data = data.layers
        if layer_data is None:
            log.info("%s: no per-layer data (a backbone without sisom_stages()): the penultimate layer only", cls.name)
            layer_data = penultimate(data.features, data.logits, data.head_weight)
        labels = data.labels[data.bank].astype(np.int64)
        counts = np.bincount(labels, minlength=data.num_classes)
        if counts.min() < 2:
            raise ValueError(f"{cls.name}: the bank needs at least 2 samples of every class, got counts {counts.tolist()}")
        if relative_alpha is None:
            alphas, search = choose_alphas(data, layer_data, search_size, sweeps)
        else:
            scale = scales(products(layer_data, data.search_subset(search_size)))
            alphas = {name: relative_alpha / scale[name] for name in layer_data}
            search = {"procedure": "fixed", "relative_alpha": {name: relative_alpha for name in layer_data}, "scale": scale}
        bank_s = enriched(products(layer_data, data.bank), alphas)
        d_out, loo_r = bank_geometry(bank_s, labels, data.logits[data.bank].argmax(axis=1))
        info = {"alpha_search": search, "bank_size": len(labels), "loo_r": loo_r,
                "dims": {name: int(a.shape[1]) for name, (a, _) in layer_data.items()}}
        return cls(list(layer_data), alphas, bank_s, labels, d_out, info)

    def forward(self, logits, features, computed, layers):
        s = torch.cat([torch.tanh(self.alphas[name] * layers[name][0] * layers[name][1] / 2.0) / 2.0
                       for name in self.layer_names], dim=1)
        return self.ratio(s, logits)

    def metadata(self):
        return {
            "layers": list(self.layer_names),
            "alpha": self.alphas,
            "dims": self.info["dims"],
            "alpha_search": self.info["alpha_search"],
            "bank_size": self.info["bank_size"],
            "r_avg": float(self.info["loo_r"].mean()),
        }


def choose_alphas(data: FitData, layer_data, search_size: int, sweeps: int) -> tuple[dict[str, float], dict]:
    """Per-layer steepness by the coordinate search of the module docstring. Returns (alphas, record)."""
    idx = data.search_subset(search_size)
    labels, predicted = data.labels[idx].astype(np.int64), data.logits[idx].argmax(axis=1)
    u_bank = products(layer_data, idx)
    with_ood = len(data.validation_ood_logits) > 0
    u_ood = {}
    if with_ood:
        ood_data = data.validation_ood_layers if data.layers is not None else (
            penultimate(data.validation_ood_features, data.validation_ood_logits, data.head_weight))
        if ood_data is None:
            raise ValueError("sisom_ml: per-layer data for the bank but not for the validation OOD")
        u_ood = products(ood_data)
    ood_predicted = data.validation_ood_logits.argmax(axis=1) if with_ood else None
    names = list(u_bank)
    scale = scales(u_bank)

    def distances(name: str, c: float) -> tuple[np.ndarray, np.ndarray | None]:
        alpha = {name: c / scale[name]}
        bank_s = enriched({name: u_bank[name]}, alpha)
        ood_s = enriched({name: u_ood[name]}, alpha) if with_ood else None
        return numpy_squared_distances(bank_s, bank_s), (numpy_squared_distances(ood_s, bank_s) if with_ood else None)

    def evaluate(d2_bank: np.ndarray, d2_ood: np.ndarray | None) -> dict:
        d_out, loo_r = _leave_one_out(d2_bank, labels, predicted)
        if not with_ood:
            return {"worst": -float(loo_r.mean()), "mean": -float(loo_r.mean())}
        return validation.objective(loo_r, _query_ratios(d2_ood, ood_predicted, labels, d_out), data.groups)

    alone, current, cached = {}, {}, {}
    for name in names:  # each layer's own best: the starting point
        results = [evaluate(*distances(name, c)) for c in RELATIVE_GRID]
        alone[name] = [r["worst"] for r in results]
        current[name] = RELATIVE_GRID[max(range(len(results)), key=lambda i: (validation.key(results[i]), -i))]
        cached[name] = distances(name, current[name])
    total_bank = sum(cached[name][0] for name in names)
    total_ood = sum(cached[name][1] for name in names) if with_ood else None
    best = evaluate(total_bank, total_ood)
    start = best
    history = []
    for _ in range(sweeps):
        changed = False
        for name in names:
            rest_bank = total_bank - cached[name][0]
            rest_ood = total_ood - cached[name][1] if with_ood else None
            figures = []
            for c in RELATIVE_GRID:
                d2 = cached[name] if c == current[name] else distances(name, c)
                result = evaluate(rest_bank + d2[0], rest_ood + d2[1] if with_ood else None)
                figures.append(result["worst"])
                if validation.key(result) > validation.key(best):
                    best, current[name], cached[name], changed = result, c, d2, True
            total_bank = rest_bank + cached[name][0]
            total_ood = rest_ood + cached[name][1] if with_ood else None
            history.append({"layer": name, "objective": figures, "chosen": current[name]})
        if not changed:
            break
    record = {
        "procedure": "validation-auroc" if with_ood else "min-r_avg",
        "objective_name": "worst validation group's AUROC" if with_ood else "-r_avg (leave-one-out)",
        "relative_grid": list(RELATIVE_GRID),
        "scale": scale,
        "relative_alpha": dict(current),
        "alone": alone,
        "start": start["worst"],
        "sweeps": history,
        "objective": best["worst"],
        **({"group_auroc": best["auroc"]} if with_ood else {}),
        "search_size": int(len(idx)),
        "validation_ood_size": int(len(data.validation_ood_logits)),
    }
    return {name: current[name] / scale[name] for name in names}, record


def scales(u: dict[str, np.ndarray]) -> dict[str, float]:
    """``rms_j``: the root mean square of each layer's ``a_j * g_j`` (at least 1e-300: a dead layer)."""
    return {name: max(float(np.sqrt(np.mean(values**2))), 1e-300) for name, values in u.items()}


def _leave_one_out(d2: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``d_out`` per bank sample and leave-one-out ratios of the bank, from its squared distances."""
    d_out = np.maximum(np.sqrt(np.where(labels[None, :] != labels[:, None], d2, np.inf).min(axis=1)), MIN_D_OUT)
    same = np.where(labels[None, :] == predicted[:, None], d2, np.inf)
    np.fill_diagonal(same, np.inf)
    anchor = same.argmin(axis=1)
    return d_out, np.sqrt(same[np.arange(len(anchor)), anchor]) / d_out[anchor]


def _query_ratios(d2: np.ndarray, predicted: np.ndarray, labels: np.ndarray, d_out: np.ndarray) -> np.ndarray:
    """Ratios of query rows from their squared distances to the bank."""
    same = np.where(labels[None, :] == predicted[:, None], d2, np.inf)
    anchor = same.argmin(axis=1)
    return np.sqrt(same[np.arange(len(anchor)), anchor]) / d_out[anchor]

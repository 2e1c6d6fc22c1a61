"""Multi-layer SISOM, as the paper defines it: gradient-weighted features of several layers, concatenated.

For each layer ``j`` the backbone names (:func:`oodguard.export.layers.names`: LeNet-5 ``conv1``, ``conv2``,
``fc1``; the CIFAR ResNet-18 ``layer1``-``layer3``; always the penultimate features last), with pooled
activation ``a_j`` and pooled loss gradient ``g_j`` computed inside the graph by the hand-written backward
pass of :mod:`oodguard.export.layers`: ``s_j - 0.5 = tanh(alpha_j * a_j * g_j / 2) / 2``. The layers are
concatenated and scored by SISOM's distance ratio (nearest same-class anchor, ``d_out`` from the anchor,
on ``s - 0.5``), computed in the graph by :class:`BlockedBankRatio` (below). The penultimate-only score stays
``sisom``, so the two can be compared. Opt-in: only ``oodguard export --multi-layer`` fits it, on a bank of its
own (at most ``--multi-layer-bank-size`` samples, :func:`oodguard.export.fitting.multi_layer_bank`).

Choices (the paper and NAC tune per-layer steepness on validation data, without a procedure to copy):

- **A grid relative to each layer's scale**: ``alpha_j = c_j / rms_j`` with ``rms_j`` the root mean square of
  ``a_j * g_j`` over the search subset and ``c_j`` on :data:`RELATIVE_GRID` (1e-2 ... 1e3). Pooled gradients of
  early layers are orders of magnitude smaller than the penultimate's, so one absolute grid would leave early
  layers in the sigmoid's linear range (their alpha only weighs them) and saturate the last; relative, ``c = 1``
  is the same steepness for every layer, and the grid spans linear (``c = 0.01``) to binarised (``c = 1000``,
  NAC's regime).
- **Search** (:func:`choose_alphas`): SISOM's objective (:mod:`oodguard.export.scores.sisom`): the worst
  validation-OOD group's AUROC of the leave-one-out bank ratios against each group's ratios, ties by the mean;
  without validation OOD, ``-r_avg``. Each layer starts at its own best ``c`` (the layer scored alone), then
  coordinate ascent: sweep the layers, each over the grid with the others fixed, keeping a change only if it
  strictly improves the objective, until a sweep changes nothing (at most ``sweeps``). Squared distances add
  over layers, so a candidate recomputes one layer's distances. Every candidate's figure is recorded.
- A backbone without ``sisom_stages`` (no per-layer data): the penultimate layer alone, with this grid; the
  export log says so and ``layers`` in calibration.json is ``["penultimate"]``.
- **Distances in the graph** (:class:`BlockedBankRatio`): a float64 distance matrix over the whole bank would
  dominate the head's cost (docs/benchmarks.md#sisom_ml-distances-in-the-graph), but float32 alone can pick
  the wrong anchor: squared distances from ``|a|^2 + |b|^2 - 2ab`` cancel, and a near tie can pick another
  anchor (another ``d_out``). So a float32 product *finds* the candidates and float64 *decides*: the bank is
  stored in float32, in class blocks (``[K * n, D]``, ``n`` the largest class count, padding with infinite
  norm), so the predicted class's block of the product is one gather, the per-row constant ``|a|^2`` is left
  out, and its :data:`CANDIDATES` nearest (float32 order) are re-measured directly, ``sum (a - b)^2`` in float64
  (no cancellation), the smallest of those being the anchor. The float64 anchor can only be missed when more
  than :data:`CANDIDATES` bank samples tie with it to float32 precision, and then any of them is as near.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .. import validation
from ..layers import penultimate
from .base import FitData, Score, buffer, numpy_squared_distances
from .sisom import MIN_D_OUT, bank_geometry

RELATIVE_GRID = tuple(10.0**e for e in range(-2, 4))
#: float32 nearest candidates per query re-measured in float64 (at most the smallest class's bank count)
CANDIDATES = 4
log = logging.getLogger(__name__)


def products(layer_data, rows=None) -> dict[str, np.ndarray]:
    """``a_j * g_j`` per layer (float64), of ``rows`` (all rows when None)."""
    pick = slice(None) if rows is None else rows
    return {name: np.asarray(a[pick], np.float64) * np.asarray(g[pick], np.float64) for name, (a, g) in layer_data.items()}


def enriched(u: dict[str, np.ndarray], alphas: dict[str, float]) -> np.ndarray:
    """Concatenated ``s - 0.5 = tanh(alpha_j * u_j / 2) / 2`` in layer order (float64)."""
    return np.concatenate([np.tanh(alphas[name] * u[name] / 2.0) / 2.0 for name in alphas], axis=1)


class BlockedBankRatio(Score):
    """SISOM's distance ratio of ``s - 0.5`` against a bank held in class blocks: float32 product to find
    :data:`CANDIDATES` nearest same-class samples, float64 direct distances to choose among them (module
    docstring). Same values as :class:`~oodguard.export.scores.sisom.BankRatio` up to float32 rounding of the
    stored bank (~1e-7 relative)."""

    uses_bank = True

    def register_bank(self, bank_s: np.ndarray, bank_labels: np.ndarray, d_out: np.ndarray) -> None:
        bank_s = np.asarray(bank_s, np.float64)
        labels = np.asarray(bank_labels, np.int64)
        counts = np.bincount(labels)
        k, n = len(counts), int(counts.max())
        centre = bank_s.mean(axis=0)
        centred = (bank_s - centre).astype(np.float32)
        order = np.argsort(labels, kind="stable")
        slots = labels[order] * n + (np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts))
        blocks = np.zeros((k * n, bank_s.shape[1]), np.float32)
        blocks[slots] = centred[order]
        sq_norms = np.full(k * n, np.inf, np.float32)
        sq_norms[slots] = (centred[order].astype(np.float64) ** 2).sum(axis=1)
        d_out_blocks = np.ones(k * n, np.float64)
        d_out_blocks[slots] = d_out[order]
        self.block = n
        self.candidates = int(min(CANDIDATES, counts.min()))
        self.register_buffer("centre", buffer(centre))
        # row-major ([K * n, D]): the product is a Gemm with transB (no transposed copy), and the candidates'
        # rows are contiguous (a gather of columns from [D, N] cost LeNet-5 0.6 ms at batch 64)
        self.register_buffer("bank", buffer(blocks))
        self.register_buffer("bank_sq_norms", buffer(sq_norms.reshape(k, n)))
        self.register_buffer("bank_labels", buffer(labels, torch.int64))  # in fit order (not used by the graph)
        self.register_buffer("d_out", buffer(d_out_blocks, torch.float64))

    def ratio(self, s: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``r`` of enriched features ``s - 0.5`` (``[B, D]``) for the predicted classes of ``logits``."""
        query = s - self.centre
        batch, n = query.shape[0], self.block
        predicted = logits.argmax(dim=1)
        products = torch.nn.functional.linear(query, self.bank).reshape(batch, -1, n)  # [B, K, n]
        own = torch.gather(products, 1, predicted.reshape(batch, 1, 1).expand(batch, 1, n)).squeeze(1)  # [B, n]
        approx = self.bank_sq_norms[predicted] - 2.0 * own  # |q - b|^2 - |q|^2, float32
        candidates = torch.topk(approx, self.candidates, dim=1, largest=False).indices  # [B, c]
        slots = predicted.unsqueeze(1) * n + candidates
        rows = self.bank.index_select(0, slots.reshape(-1))  # [B * c, D]
        diff = query.double().unsqueeze(1) - rows.double().reshape(batch, self.candidates, -1)
        d2_in, nearest = (diff * diff).sum(dim=2).min(dim=1)
        anchor = torch.gather(slots, 1, nearest.unsqueeze(1)).squeeze(1)
        return (torch.sqrt(d2_in) / self.d_out[anchor]).float()


class SisomMl(BlockedBankRatio):
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

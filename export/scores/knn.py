"""Deep nearest neighbours (Sun et al. 2022): distance to the k-th nearest training feature.

Features are normalised to unit length; the bank holds the normalised features of the bank samples.
The score is the Euclidean distance ``sqrt(2 - 2 cos)`` to the k-th nearest bank feature (higher =
more OOD; OpenOOD reports its negative).

Choosing ``k`` (the paper used 50 on CIFAR-10; smaller k can win on near OOD with the same bank:
docs/methods.md#knn-choosing-k):

- **Search**: without a fixed ``k``, every k of :data:`K_GRID` is scored on validation data: leave-one-out
  bank samples (a bank sample's own feature is skipped: its k-th neighbour is the (k+1)-th of the bank)
  against the validation OOD, and the k with the best worst-group AUROC wins
  (:func:`oodguard.export.validation.objective`; ties to the smaller k). Without validation OOD, k = 50.
- **Centred** (:class:`KnnCentred`, ``knn_centred``, k = 1 by default): the bank's mean feature is subtracted
  before normalising (SimpleShot's CL2N, Wang et al. 2019). Penultimate features after a ReLU all share one
  direction, the mean, and plain cosine similarity is dominated by it; centred, the distance reads the
  class-specific directions, which is what sets an unseen class of the same domain apart
  (docs/methods.md#new-classes).
- **Small classes**: k is at most half the bank count of the smallest class (at least 1). With more
  neighbours than a class has bank samples, the k-th neighbour of an image of that class lies in another
  class, and the class is flagged wholesale (a small class added by a retrain is the typical case). A fixed
  ``k`` is clipped the same way (and to the bank size).
"""

import numpy as np
import torch

from .. import validation
from .base import Score, buffer

K_GRID = (1, 2, 5, 10, 20, 50)
DEFAULT_K = 50
#: k of :class:`KnnCentred`, the default decision's distance (see the class)
NEW_CLASS_K = 1


def normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def kth_distances(query: np.ndarray, bank: np.ndarray, ks, skip_self: bool = False, chunk: int = 1024) -> np.ndarray:
    """``[len(query), len(ks)]`` distances ``sqrt(2 - 2 cos)`` from each (unit) query to its k-th nearest
    (unit) bank row, for each k; ``skip_self`` drops the nearest neighbour (the query itself, for bank rows)."""
    ks = np.asarray(ks, dtype=np.int64) + (1 if skip_self else 0)
    deepest = int(min(ks.max(), len(bank)))
    out = np.empty((len(query), len(ks)), np.float64)
    for start in range(0, len(query), chunk):
        cos = query[start:start + chunk] @ bank.T
        top = -np.sort(-np.partition(cos, len(bank) - deepest, axis=1)[:, len(bank) - deepest:], axis=1)
        out[start:start + chunk] = np.sqrt(np.clip(2.0 - 2.0 * top[:, np.minimum(ks, deepest) - 1], 0.0, None))
    return out


class Knn(Score):
    name = "knn"
    uses_bank = True
    #: subtract the bank's mean feature before normalising (:class:`KnnCentred`)
    centred = False

    def __init__(self, bank: np.ndarray, k: int, search: dict | None = None):
        super().__init__()
        if not 1 <= k <= len(bank):
            raise ValueError(f"{self.name}: k={k} must be between 1 and the bank size {len(bank)}")
        self.k = k
        self.search = search or {"procedure": "fixed"}
        centre = self.centre_of(bank)
        self.register_buffer("centre", buffer(centre))  # [D]
        self.register_buffer("bank_t", buffer(normalise(bank - centre).T))  # [D, N]: see Sisom

    @classmethod
    def centre_of(cls, bank: np.ndarray) -> np.ndarray:
        """What is subtracted from every feature before normalising: the bank's mean, or zero."""
        bank = np.asarray(bank, np.float64)
        return bank.mean(axis=0) if cls.centred else np.zeros(bank.shape[1])

    @classmethod
    def fit(cls, data, fitted, k: int | None = None, search_size: int = 5000):
        bank = data.features[data.bank]
        counts = np.bincount(data.labels[data.bank].astype(np.int64))
        k_max = max(1, int(counts[counts > 0].min()) // 2)
        if k is not None:
            return cls(bank, max(1, min(k, k_max, len(bank))), {"procedure": "fixed", "requested_k": k, "k_max": k_max})
        if not len(data.validation_ood_features):
            return cls(bank, min(DEFAULT_K, k_max, len(bank)), {"procedure": "default", "k_max": k_max})
        grid = [g for g in K_GRID if g <= min(k_max, len(bank) - 1)] or [1]
        centre = cls.centre_of(bank)
        unit_bank = normalise(np.asarray(bank, np.float64) - centre)
        ids = data.search_subset(search_size)
        position = np.searchsorted(data.bank, ids)  # the search samples' rows in the bank
        loo = kth_distances(unit_bank[position], unit_bank, grid, skip_self=True)
        ood = kth_distances(normalise(np.asarray(data.validation_ood_features, np.float64) - centre), unit_bank, grid)
        results = [validation.objective(loo[:, j], ood[:, j], data.groups) for j in range(len(grid))]
        best = max(range(len(grid)), key=lambda j: (validation.key(results[j]), -j))
        search = {"procedure": "validation-auroc", "grid": grid, "k_max": k_max, "search_size": int(len(ids)),
                  "objective": [r["worst"] for r in results], "group_auroc": [r["auroc"] for r in results]}
        return cls(bank, grid[best], search)

    def forward(self, logits, features, computed):
        if self.centred:
            features = features - self.centre
        unit = features / torch.clamp(torch.linalg.vector_norm(features, dim=1, keepdim=True), min=1e-12)
        cos = unit @ self.bank_t
        kth = torch.topk(cos, self.k, dim=1).values[:, -1]
        return torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))

    def metadata(self):
        return {"k": self.k, "bank_size": int(self.bank_t.shape[1]), "k_search": self.search}


class KnnCentred(Knn):
    """kNN on centred features (see the module docstring), with k = :data:`NEW_CLASS_K` unless given (clipped
    for small classes as :class:`Knn`): on class holdouts the nearest neighbour separates unseen classes best,
    where the validation search (built on synthetic OOD) picks 2 to 20 and costs the default decision up to a
    point (docs/methods.md#new-classes)."""

    name = "knn_centred"
    centred = True

    @classmethod
    def fit(cls, data, fitted, k: int | None = None, search_size: int = 5000):
        if k is None:
            fixed = super().fit(data, fitted, k=NEW_CLASS_K)
            fixed.search = {**fixed.search, "procedure": "new-class default", "requested_k": NEW_CLASS_K}
            return fixed
        return super().fit(data, fitted, k=k, search_size=search_size)

    def metadata(self):
        return {**super().metadata(), "centred": "the bank's mean feature subtracted before normalising"}

"""A validation signal for new classes, from the export's own labeled data: leave one class out, retrained.

The OOD the active-learning loop exists to find is a *new class of the same domain* (a digit the model never
learned). Synthetic validation OOD (:mod:`oodguard.export.validation`: blends, jigsaws, permutations) looks
nothing like that. No labeled new class exists at export time, but every known class can play one: for a class
``c`` (:func:`held_out_classes` picks which, seeded), :func:`retrained_world` trains a classifier of the same
architecture and recipe *without* ``c``, fits every score on its features with the export's parameters, and
scores the held-out *reference* calibration images: those of the other classes are in-distribution, those of
``c`` a class the model never saw. The fused choice (:func:`oodguard.export.scores.pvalue_fusion.choose`) pools
the worlds into one validation group, ``new``, each world's scores as p-values against its own references.

Why retrained and not only the head: with the backbone kept (drop ``c``'s logit and ``c`` from the bank), ``c``'s
features are still the tight cluster the backbone learned for it, and distance scores look perfect (digits demo:
kNN 99.6% held-out AUROC, 92.1% on the real digits 8-9). Retrained, the signal ranks the scores far closer to
the truth (``bench/new_class_signal.py`` prints both per candidate), but not yet closely enough to pick the
fused decision alone, so it is opt-in (``oodguard export --new-class-holdouts N``; default 0).

Scores that read the backbone's layers (``sisom_ml``, ``sisome_ml``) are left out of the worlds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from .scores import MULTI_LAYER, FitData, Score

NEW = "new"
#: at most this many classes are held out in turn (each costs one fit of every score)
MAX_HELD_OUT = 10
#: how many classes an export holds out in turn, each with a classifier trained without it (0: the group is off)
DEFAULT_HOLDOUTS = 0
#: a class needs at least this many reference images to stand in for a new class
MIN_NEW_IMAGES = 5


@dataclass(frozen=True)
class World:
    """Scores of one held-out class's world: ``references`` (ID reference images of the other classes) and
    ``new`` (the held-out class's reference images), each ``{score name: [N]}``."""

    held_out: int
    references: dict[str, np.ndarray]
    new: dict[str, np.ndarray]


def held_out_classes(labels: np.ndarray, num_classes: int, seed: int, limit: int = MAX_HELD_OUT,
                     min_images: int = MIN_NEW_IMAGES) -> list[int]:
    """The classes that take turns as the new class: those with at least ``min_images`` reference images
    (and at least two other classes left), at most ``limit`` of them, a seeded draw when there are more."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    eligible = [c for c in range(num_classes) if counts[c] >= min_images]
    if num_classes < 3 or len(eligible) < 1:
        return []
    if len(eligible) > limit:
        eligible = sorted(np.random.default_rng(seed + 29).choice(eligible, size=limit, replace=False).tolist())
    return eligible


def fixed_params(scores: Mapping[str, Score]) -> dict[str, dict]:
    """The hyper-parameters the full export chose, to be reused as they are in every world."""
    params: dict[str, dict] = {}
    if "sisom" in scores:
        params["sisom"] = {"alpha": float(scores["sisom"].alpha)}
    if "knn" in scores:
        params["knn"] = {"k": int(scores["knn"].k)}
    return params


def score_rows(scores: Mapping[str, Score], logits: np.ndarray, features: np.ndarray,
               batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Every score's values of rows given as (logits, features), in registry order (later scores may read earlier
    ones), float64."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    with torch.no_grad():
        for start in range(0, len(logits), batch_size):
            z = torch.as_tensor(logits[start:start + batch_size], dtype=torch.float32)
            h = torch.as_tensor(features[start:start + batch_size], dtype=torch.float32)
            computed: dict[str, torch.Tensor] = {}
            for name, score in scores.items():
                computed[name] = score(z, h, computed)
                out[name].append(computed[name].double().numpy())
    return {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in out.items()}


def retrained_world(c: int, factory_ref: str, feature_dim: int, bank_images: np.ndarray, bank_labels: np.ndarray,
                    reference_images: np.ndarray, reference_labels: np.ndarray, scores: Mapping[str, Score],
                    fit: Callable[[FitData, dict], dict[str, Score]], epochs: int, seed: int,
                    batch_size: int = 128, lr: float = 1e-3) -> World:
    """The world without class ``c``, with a classifier *trained* without it: the same backbone architecture
    and training recipe on the bank images of the other classes (labels above ``c`` moved down), every score
    fitted on its features with the export's parameters; ``c``'s reference images are then truly unseen."""
    from .backbones import Classifier, resolve_factory
    from .train import extract, train_classifier

    keep = bank_labels != c
    labels = np.where(bank_labels[keep] > c, bank_labels[keep] - 1, bank_labels[keep]).astype(np.int64)
    torch.manual_seed(seed + 1000 + c)
    model = Classifier(resolve_factory(factory_ref)(), int(labels.max()) + 1, feature_dim=feature_dim)
    train_classifier(model, bank_images[keep], labels, epochs=epochs, batch_size=batch_size, lr=lr,
                     seed=seed + 1000 + c, progress=None)
    features, logits = extract(model, bank_images[keep])
    data = FitData(features=features, logits=logits, labels=labels, bank=np.arange(len(labels)),
                   head_weight=model.head.weight.detach().numpy(), head_bias=model.head.bias.detach().numpy(),
                   seed=seed)
    fitted = {n: s for n, s in fit(data, fixed_params(scores)).items() if n in scores and n not in MULTI_LAYER}
    ref_features, ref_logits = extract(model, reference_images)
    values = score_rows(fitted, ref_logits, ref_features)
    is_new = np.asarray(reference_labels) == c
    return World(c, {n: v[~is_new] for n, v in values.items()}, {n: v[is_new] for n, v in values.items()})


__all__ = ["DEFAULT_HOLDOUTS", "MAX_HELD_OUT", "NEW", "World", "fixed_params", "held_out_classes", "retrained_world",
           "score_rows"]

"""What the export's scores are fitted and chosen on: the training images' features, and the validation OOD's.

The validation OOD is synthetic (corruptions of training images, groups ``near`` / ``far``:
:mod:`oodguard.export.synthetic`) plus each ``--validation-ood`` set (group ``user:<spec>``); never a test set.
The bank choice, the scores' parameter searches and the fused choice (:mod:`oodguard.export.fitting`) rank on it.
With ``multi_layer`` the per-layer data of both is extracted too (multi-layer SISOM), after checking the
backbone's hand-written gradients against autograd; without it, none is.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from oodguard import progress as bars

from . import layers
from .spec import ExportSpec
from .synthetic import validation_ood
from .train import extract
from .validation import ValidationOOD


def extract_training_features(spec: ExportSpec, classifier, progress: Callable[[str], None], lap):
    """The bank images as model inputs, their features and logits, and (multi-layer only) their per-layer data."""
    bank_images = spec.preprocessing.apply(spec.bank_data.images)
    with bars.phase(f"extract training features ({len(bank_images)} images)"):
        features, logits = extract(classifier, bank_images)
    layer_data = extract_layers(classifier, bank_images, progress) if spec.multi_layer else None
    lap("extract training features" + (" and layers" if layer_data is not None else ""))
    return bank_images, features, logits, layer_data


def extract_validation_ood(spec: ExportSpec, classifier, bank_images: np.ndarray, user_sets: list[ValidationOOD],
                           with_layers: bool, lap):
    """The validation OOD (synthetic plus the user's sets) and its features: what the score and bank choices rank on."""
    with bars.phase("validation OOD: build it and extract its features"):
        ood = validation_set(spec, bank_images, spec.bank_data.labels, user_sets)
        ood_features, ood_logits = extract(classifier, ood.images)
        ood_layer_data = layers.extract(classifier, ood.images) if with_layers and len(ood) else None
    lap(f"validation OOD ({len(ood)}: {ood.group_sizes})")
    return ood, ood_features, ood_logits, ood_layer_data


def extract_layers(classifier, images: np.ndarray, progress: Callable[[str], None]):
    """The multi-layer SISOM inputs of the training images (:func:`oodguard.export.layers.extract`), after
    checking the backbone's hand-written gradients against autograd on a few of them; None (and a note) for a
    backbone without ``sisom_stages``."""
    if layers.names(classifier.backbone) == (layers.PENULTIMATE,):
        progress(f"  note: backbone {type(classifier.backbone).__name__} has no sisom_stages(): "
                 "sisom_ml and sisome_ml use the penultimate layer only")
        return None
    errors = layers.check(classifier, images[:8])
    progress(f"  multi-layer SISOM: layers {list(errors)}, gradient check against autograd "
             f"(largest relative error {max(errors.values()):.1e})")
    with bars.phase(f"extract training layers ({len(images)} images)"):
        return layers.extract(classifier, images)


def user_validation_sets(spec: ExportSpec) -> list[ValidationOOD]:
    """Each ``--validation-ood`` set as model inputs (group ``user:<spec>``, at most ``validation_ood_size``
    images each, seeded). Read before any slow step; a missing, unreadable, empty or wrongly shaped set is a
    :class:`ValueError` naming it."""
    from oodguard.evaluation import resolve_dataset

    rng = np.random.default_rng(spec.seed)
    parts = []
    for text in spec.validation_ood_specs:
        try:
            images = resolve_dataset(text, spec.preprocessing, seed=spec.seed).images
            if len(images) == 0:
                raise ValueError("the set holds no image")
            if len(images) > spec.validation_ood_size:
                images = images[np.sort(rng.choice(len(images), size=spec.validation_ood_size, replace=False))]
            x = spec.preprocessing.apply(images)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"--validation-ood {text}: {exc}") from None
        parts.append(ValidationOOD(x, np.full(len(x), f"user:{text}", dtype=object)))
    return parts


def validation_set(spec: ExportSpec, bank_images: np.ndarray, labels: np.ndarray,
                   user_sets: list[ValidationOOD]) -> ValidationOOD:
    """Synthetic validation OOD from training images (groups near / far) plus the user's sets."""
    return ValidationOOD.concatenate([validation_ood(bank_images, labels, spec.validation_ood_size, spec.seed),
                                      *user_sets])

"""Per-layer pooled activations and loss gradients, the inputs of multi-layer SISOM.

For each layer ``j`` a backbone names (the :ref:`sisom_stages` protocol of :mod:`oodguard.export.backbones`)
and for the penultimate features: ``a_j = mean_hw A_j`` and ``g_j = mean_hw dL/dA_j``, ``[B, C_j]`` each, with
``L`` the cross-entropy to the uniform target (``dL/dlogits = softmax(z) - 1/K``, so ``dL/dfeatures =
(softmax(z) - 1/K) W``). The gradients into earlier layers come from the hand-written VJPs of
:mod:`oodguard.export.vjp`, backwards from the features through the backbone's tail only: the stages up to
the earliest named layer run forward alone. The same torch code runs inside the exported graph
(:func:`pooled`) and offline over a dataset (:func:`extract`), so the bank and the graph agree.

A backbone without ``sisom_stages`` has one layer, the penultimate (no backward pass).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import vjp
from .backbones import Classifier

PENULTIMATE = "penultimate"


def names(backbone: nn.Module) -> tuple[str, ...]:
    """The backbone's SISOM layers, earliest first, ending with :data:`PENULTIMATE`; only the penultimate for
    a backbone without ``sisom_stages``."""
    if not hasattr(backbone, "sisom_stages"):
        return (PENULTIMATE,)
    labels = _labels(backbone.sisom_stages())
    named = [name for name in labels if name is not None]
    if len(set(named)) != len(named):
        raise ValueError(f"{type(backbone).__name__}.sisom_stages(): layer names must be unique, got {labels}")
    return tuple(named)


def pooled(classifier: Classifier, x: torch.Tensor, layers: tuple[str, ...]):
    """``(features, logits, {layer: (a, g)})`` for ``layers`` (a subset of :func:`names`, in its order)."""
    if layers == (PENULTIMATE,):
        features = classifier.backbone(x)
        logits = classifier.head(features)
        return features, logits, {PENULTIMATE: (features, feature_gradient(classifier.head, logits))}
    stages = classifier.backbone.sisom_stages()
    labels = _labels(stages)
    earliest = min(labels.index(name) for name in layers)
    for _, stage in stages[: earliest + 1]:
        x = vjp.run(stage, x)
    activations, backs = {labels[earliest]: x}, []
    for label, (_, stage) in zip(labels[earliest + 1 :], stages[earliest + 1 :]):
        # into the earliest layer only its pooled gradient is needed: the summed VJP (vjp.taped_sum) skips
        # the spatial routing where the stage allows it
        x, back = (vjp.taped_sum if not backs and x.ndim == 4 else vjp.taped)(stage, x)
        activations[label] = x
        backs.append(back)
    features = x
    logits = classifier.head(features)
    grad = feature_gradient(classifier.head, logits)
    gradients = {PENULTIMATE: grad}
    for i in range(len(stages) - 1, earliest, -1):  # the gradient w.r.t. stage i's input: stage i-1's output
        grad = backs[i - earliest - 1](grad)
        gradients[labels[i - 1]] = grad
    out = {name: (_spatial_mean(activations[name]), _spatial_mean(gradients[name])) for name in layers
           if name != labels[earliest]}
    first = activations[labels[earliest]]
    summed = first.ndim == 4
    out[labels[earliest]] = (_spatial_mean(first), gradients[labels[earliest]] / (first.shape[2] * first.shape[3])
                             if summed else gradients[labels[earliest]])
    return features, logits, {name: out[name] for name in layers}


def feature_gradient(head: nn.Linear, logits: torch.Tensor) -> torch.Tensor:
    """``dL/dfeatures = (softmax(z) - 1/K) W`` for the cross-entropy to the uniform target."""
    return (torch.softmax(logits, dim=1) - 1.0 / logits.shape[1]) @ head.weight


@torch.no_grad()
def extract(classifier: Classifier, images: np.ndarray, batch_size: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Offline :func:`pooled` over ``images`` for every layer of :func:`names` (float32 ``[N, C_j]`` pairs), or
    None for a backbone without ``sisom_stages`` (the scores then derive the penultimate layer themselves)."""
    layers = names(classifier.backbone)
    if layers == (PENULTIMATE,):
        return None
    classifier.eval()
    device = next(classifier.parameters()).device
    parts = []
    for first in range(0, len(images), batch_size):
        x = torch.as_tensor(np.ascontiguousarray(images[first : first + batch_size]), dtype=torch.float32).to(device)
        parts.append(pooled(classifier, x, layers)[2])
    return {name: tuple(np.concatenate([part[name][i].float().cpu().numpy() for part in parts]) for i in range(2))
            for name in layers}


def check(classifier: Classifier, images: np.ndarray, tolerance: float = 1e-4) -> dict[str, float]:
    """Each layer's largest gradient error of :func:`pooled` against ``torch.autograd.grad`` through the same
    stages on ``images``, relative to the layer's largest gradient; :class:`ValueError` when the stages do not
    compose to the backbone's forward pass or an error exceeds ``tolerance`` (a wrong user VJP must not reach
    a model)."""
    layers = names(classifier.backbone)
    classifier.eval()
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32).to(next(classifier.parameters()).device)
    with torch.no_grad():
        features, _, out = pooled(classifier, x, layers)
        if not torch.allclose(features, classifier.backbone(x), rtol=1e-5, atol=1e-6):
            raise ValueError(f"{type(classifier.backbone).__name__}.sisom_stages() does not compose to its forward pass")
    stages = classifier.backbone.sisom_stages()
    h, activations = x, {}
    for label, (_, stage) in zip(_labels(stages), stages):
        h = vjp.run(stage, h)
        activations[label] = h
    logits = classifier.head(h)
    loss = (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).sum()
    reference = torch.autograd.grad(loss, [activations[name] for name in layers])
    errors = {}
    for name, grad in zip(layers, reference):
        expected = _spatial_mean(grad)
        errors[name] = float((out[name][1] - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    wrong = {name: error for name, error in errors.items() if error > tolerance}
    if wrong:
        raise ValueError(f"{type(classifier.backbone).__name__}: hand-written layer gradients differ from autograd "
                         f"(relative error {wrong}); check the VJPs of its sisom_stages()")
    return errors


def penultimate(features: np.ndarray, logits: np.ndarray, head_weight: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The penultimate layer alone, in NumPy: ``{PENULTIMATE: (features, (softmax(z) - 1/K) W)}`` (float64)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return {PENULTIMATE: (np.asarray(features, np.float64), (p - 1.0 / z.shape[1]) @ np.asarray(head_weight, np.float64))}


def _labels(stages) -> list[str | None]:
    """Each stage's layer name; the last stage's output is the penultimate features, whatever it is called."""
    *inner, (last, _) = stages
    if last not in (None, PENULTIMATE):
        raise ValueError(f"sisom_stages(): the last stage's output is the penultimate features; name it None or "
                         f"{PENULTIMATE!r}, not {last!r}")
    return [name for name, _ in inner] + [PENULTIMATE]


def _spatial_mean(activation: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...] -> [B, C]``: the mean over every axis after the channels (none for ``[B, C]``)."""
    return activation.mean(dim=tuple(range(2, activation.ndim))) if activation.ndim > 2 else activation

"""Supervised training of a :class:`~oodguard.export.backbones.Classifier`, and batched inference.

Training is plain Adam + cross-entropy over shuffled mini-batches. All randomness (the
shuffle, and anything torch draws internally) comes from ``seed``, so two runs from
identically initialised models on the same data end with identical weights on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from oodguard.progress import bar

from .backbones import Classifier


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_images(model: Classifier, images: np.ndarray) -> np.ndarray:
    """Validate an image batch against the model and return it as contiguous float32."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0)")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floating point, got dtype {images.dtype}")
    expected = getattr(model.backbone, "input_shape", None)
    if expected is not None and tuple(images.shape[1:]) != tuple(expected):
        raise ValueError(
            f"images have per-sample shape {tuple(images.shape[1:])}, backbone expects {tuple(expected)}"
        )
    return np.ascontiguousarray(images, dtype=np.float32)


def _check_labels(model: Classifier, labels: np.ndarray, n: int) -> np.ndarray:
    """Validate labels (integers in ``[0, K)``, one per image) and return them as int64."""
    if not isinstance(labels, np.ndarray) or labels.ndim != 1:
        raise ValueError(f"labels must be a 1-d numpy array, got {getattr(labels, 'shape', type(labels).__name__)}")
    if labels.shape[0] != n:
        raise ValueError(f"got {n} images but {labels.shape[0]} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= model.num_classes:
        raise ValueError(
            f"labels must lie in [0, {model.num_classes - 1}] for a {model.num_classes}-class model, "
            f"got range [{low}, {high}]"
        )
    return labels.astype(np.int64)


def train_classifier(
    model: Classifier,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: Callable[[str], None] | None = print,
    report_every_s: float = 10.0,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    sample_weights: np.ndarray | None = None,
    shift: int = 0,
) -> list[dict]:
    """Train ``model`` in place on ``images`` ``[N, C, H, W]`` float and ``labels`` ``[N]`` int.

    Reports one line per epoch to ``progress`` (epoch, mean loss, training accuracy, validation accuracy
    when ``validation`` = (images, labels) is given, seconds), plus an intermediate line whenever
    ``report_every_s`` seconds pass within an epoch; on a terminal a bar over all ``epochs`` x batches shows
    the epoch, the batches done and the running loss (:func:`oodguard.progress.bar`; nothing elsewhere).
    Returns one ``{"epoch", "loss", "accuracy", ["validation_accuracy",] "seconds"}`` dict per epoch; leaves
    the model in eval mode. The validation accuracy is only reported: nothing is chosen by it.
    ``sample_weights`` (``[N]``, e.g. the inverse of each sample's class count) draws each epoch's N samples
    with replacement in proportion to them instead of a permutation: class-balanced sampling. ``shift`` > 0
    moves every training image by a random whole number of pixels in ``[-shift, shift]`` along each axis (see
    :func:`random_shift`), drawn anew each time it is seen.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0 pixels, got {shift}")
    images = _check_images(model, images)
    if shift >= min(images.shape[2:]):
        raise ValueError(f"shift must be smaller than the image ({images.shape[2]}x{images.shape[3]}), got {shift}")
    labels = _check_labels(model, labels, images.shape[0])
    report = progress or (lambda _line: None)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    n = x_all.shape[0]
    weights = None
    if sample_weights is not None:
        weights = torch.as_tensor(np.asarray(sample_weights, dtype=np.float64))
        if weights.shape != (n,) or not bool(torch.all(weights >= 0)) or float(weights.sum()) <= 0:
            raise ValueError(f"sample_weights must be [N={n}] non-negative with a positive sum")
    n_batches = (n + batch_size - 1) // batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    history: list[dict] = []
    model.train()
    # one bar over every batch of every epoch (on a terminal only, see oodguard.progress); the lines reported
    # while it shows are written around it, so they stay whole
    with bar(total=epochs * n_batches, desc="train", unit="batch") as steps:

        def say(line: str) -> None:
            with steps.external_write_mode():
                report(line)

        try:
            for epoch in range(1, epochs + 1):
                steps.set_description(f"epoch {epoch}/{epochs}")  # refreshes: each epoch shows at least once
                start = last_report = time.monotonic()
                order = (torch.randperm(n, generator=generator) if weights is None
                         else torch.multinomial(weights, n, replacement=True, generator=generator))
                loss_sum, correct, seen = 0.0, 0, 0
                for batch, first in enumerate(range(0, n, batch_size), start=1):
                    idx = order[first : first + batch_size]
                    x, y = x_all[idx], y_all[idx]
                    if shift:
                        x = random_shift(x, shift, generator)
                    x, y = x.to(device), y.to(device)
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    (loss / len(idx)).backward()
                    optimizer.step()
                    loss_sum += loss.item()
                    correct += int((logits.argmax(dim=1) == y).sum())
                    seen += len(idx)
                    steps.set_postfix_str(f"loss {loss_sum / seen:.4f} acc {correct / seen:.4f}", refresh=False)
                    steps.update(1)
                    now = time.monotonic()
                    if now - last_report >= report_every_s and batch < n_batches:
                        say(
                            f"epoch {epoch}/{epochs}  batch {batch}/{n_batches}  loss {loss_sum / seen:.4f}  "
                            f"acc {correct / seen:.4f}  {now - start:.1f}s"
                        )
                        last_report = now
                record = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen}
                if validation is not None:
                    record["validation_accuracy"] = accuracy(model, *validation)["overall"]
                    model.train()
                record["seconds"] = time.monotonic() - start
                history.append(record)
                say(
                    f"epoch {epoch}/{epochs}  loss {record['loss']:.4f}  acc {record['accuracy']:.4f}  "
                    + (f"val acc {record['validation_accuracy']:.4f}  " if validation is not None else "")
                    + f"{record['seconds']:.1f}s"
                )
        finally:
            model.eval()
    return history


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """``images`` ``[N, C, H, W]``, each translated by its own random ``(dy, dx)`` in ``[-shift, shift]``
    pixels; the pixels moved in repeat the border (the background of a centred digit or object)."""
    n, _, height, width = images.shape
    dy, dx = torch.randint(-shift, shift + 1, (2, n, 1, 1), generator=generator)
    rows = (torch.arange(height).view(1, height, 1) - dy).clamp_(0, height - 1)  # [N, H, 1]
    cols = (torch.arange(width).view(1, 1, width) - dx).clamp_(0, width - 1)  # [N, 1, W]
    batch = torch.arange(n).view(n, 1, 1)
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def extract(model: Classifier, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[N, D]`` and logits ``[N, K]`` (float32) of ``images``, computed in eval mode."""
    images = _check_images(model, images)
    model.eval()
    device = _model_device(model)
    features, logits = [], []
    for first in range(0, images.shape[0], batch_size):
        x = torch.from_numpy(images[first : first + batch_size]).to(device)
        f = model.features(x)
        features.append(f.float().cpu().numpy())
        logits.append(model.head(f).float().cpu().numpy())
    return np.concatenate(features), np.concatenate(logits)


@torch.no_grad()
def predict_logits(model: Classifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, K]`` (float32) of ``images``, computed in eval mode."""
    images = _check_images(model, images)
    model.eval()
    device = _model_device(model)
    logits = [
        model(torch.from_numpy(images[first : first + batch_size]).to(device)).float().cpu().numpy()
        for first in range(0, images.shape[0], batch_size)
    ]
    return np.concatenate(logits)


def accuracy(model: Classifier, images: np.ndarray, labels: np.ndarray,
             class_names: list[str] | None = None) -> dict:
    """Top-1 accuracy of ``model`` on ``images`` / ``labels``: ``{"overall", "n", "per_class": {name: acc},
    "per_class_n": {name: images}}``. ``per_class_n`` is the number of images behind each class's accuracy, so a
    reader can tell 1.000 from 5 images from 1.000 from 500; a class without samples is left out of both."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = predict_logits(model, images).argmax(axis=1)
    names = class_names or [str(c) for c in range(model.head.out_features)]
    present = [c for c in range(len(names)) if np.any(labels == c)]
    per_class = {names[c]: float(np.mean(predicted[labels == c] == c)) for c in present}
    per_class_n = {names[c]: int(np.sum(labels == c)) for c in present}
    return {"overall": float(np.mean(predicted == labels)) if len(labels) else float("nan"), "n": int(len(labels)),
            "per_class": per_class, "per_class_n": per_class_n}

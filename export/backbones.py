"""Feature-extractor backbones, the linear-head classifier around them, and checkpoint I/O.

A *backbone* maps an image batch to penultimate features ``[B, D]``; a :class:`Classifier`
adds one linear head ``D -> K``. OOD scores are computed from those features and logits, so
every model oodguard exports is a backbone plus a linear head.

Backbones are named by a *factory reference*: a builtin name (``"lenet5"``,
``"resnet18_cifar"``) or ``"package.module:factory"``, where ``factory()`` returns an
``nn.Module``. A checkpoint is the ``state_dict`` of a :class:`Classifier` (keys
``backbone.*``, ``head.weight``, ``head.bias``), optionally wrapped as ``{"state_dict": ...}``;
it is always read with ``weights_only=True``, so loading it never runs pickled code.

.. _sisom_stages:

**Layers for multi-layer SISOM (optional protocol).** A backbone may implement
``sisom_stages() -> list[tuple[str | None, nn.Module | list[nn.Module]]]``: the backbone as a chain of stages
(a module, or a list of modules applied in order), whose composition *is* its forward pass. A stage with a name marks its output as a SISOM layer (pooled over space);
the last stage's output is the penultimate features (name it ``None`` or ``"penultimate"``). Every stage after
the earliest named one must have a hand-written VJP (:mod:`oodguard.export.vjp`: conv, eval-mode BatchNorm,
ReLU, non-overlapping max-pool, global average pool, flatten, linear, ``Sequential`` of those, or a module with
its own ``taped(x)``, like :class:`BasicBlock`); the export checks the VJP against ``torch.autograd`` before
using it. A backbone without ``sisom_stages`` gets the penultimate-only variant, and the export log says so.
:class:`LeNet5` names its conv stages and first fc layer; :class:`CifarResNet18` names ``layer1``-``layer3``
(the stage outputs NAC and the SISOM paper use).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from . import vjp

BUILTIN_BACKBONES: dict[str, str] = {
    "lenet5": "oodguard.export.backbones:lenet5",
    "resnet18_cifar": "oodguard.export.backbones:resnet18_cifar",
}


class LeNet5(nn.Module):
    """LeNet-5 for ``[B, 1, 28, 28]`` images (MNIST-sized); returns the 84-d penultimate features."""

    feature_dim = 84
    input_shape = (1, 28, 28)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def sisom_stages(self) -> list[tuple[str | None, vjp.Stage]]:
        """SISOM layers: each conv block's output (after its max-pool) and the first fc layer's."""
        conv, fc = list(self.conv), list(self.fc)
        return [("conv1", conv[:3]), ("conv2", conv[3:]), ("fc1", fc[:3]), (None, fc[3:])]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))

    def taped(self, x: torch.Tensor) -> tuple[torch.Tensor, vjp.VJP]:
        """The forward pass and its VJP: the output ReLU's mask, then both the residual branch and the
        shortcut, summed."""
        out, back_branch = vjp.chain([self.conv1, self.bn1, self.relu, self.conv2, self.bn2], x)
        short, back_shortcut = vjp.taped(self.shortcut, x)
        out, back_relu = vjp.taped(self.relu, out + short)

        def backward(g: torch.Tensor) -> torch.Tensor:
            g = back_relu(g)
            return back_branch(g) + back_shortcut(g)

        return out, backward


class CifarResNet18(nn.Module):
    """CIFAR-style ResNet-18 for ``[B, 3, 32, 32]`` images; returns 512-d pooled features.

    Differs from the ImageNet ResNet-18 in its stem: one 3x3 stride-1 conv and no max-pool,
    so a 32x32 input reaches the last stage at 4x4. No in-place ops, so it exports cleanly
    with ``torch.onnx.export(..., dynamo=True)``.
    """

    feature_dim = 512
    input_shape = (3, 32, 32)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_channels = 64
        for out_channels, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(
                nn.Sequential(
                    BasicBlock(in_channels, out_channels, stride),
                    BasicBlock(out_channels, out_channels, 1),
                )
            )
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.stages(self.stem(x))))

    def sisom_stages(self) -> list[tuple[str | None, vjp.Stage]]:
        """SISOM layers ``layer1``-``layer3`` (the first three stage outputs); the penultimate is the pool."""
        return [(None, self.stem), ("layer1", self.stages[0]), ("layer2", self.stages[1]),
                ("layer3", self.stages[2]), (None, [self.stages[3], self.pool, self.flatten])]


def lenet5() -> LeNet5:
    """Factory for the builtin ``"lenet5"`` backbone."""
    return LeNet5()


def resnet18_cifar() -> CifarResNet18:
    """Factory for the builtin ``"resnet18_cifar"`` backbone."""
    return CifarResNet18()


class Classifier(nn.Module):
    """A backbone followed by one linear head: ``logits = head(backbone(x))``.

    ``feature_dim`` is the backbone's output width; it defaults to ``backbone.feature_dim``
    and must be passed explicitly for backbones without that attribute.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, feature_dim: int | None = None) -> None:
        super().__init__()
        if feature_dim is None:
            feature_dim = getattr(backbone, "feature_dim", None)
            if feature_dim is None:
                raise ValueError(
                    f"{type(backbone).__name__} has no 'feature_dim' attribute; "
                    "pass feature_dim= (the width of the backbone's output features)"
                )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.head = nn.Linear(int(feature_dim), int(num_classes))

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, D]``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]``."""
        return self.head(self.backbone(x))


class CheckpointError(ValueError):
    """A backbone factory or classifier checkpoint cannot be resolved or loaded."""


def resolve_factory(ref: str) -> Callable[[], nn.Module]:
    """Return the backbone factory named by ``ref``: a builtin name or ``"package.module:factory"``."""
    target = BUILTIN_BACKBONES.get(ref, ref)
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        builtins = ", ".join(sorted(BUILTIN_BACKBONES))
        raise CheckpointError(
            f"backbone factory {ref!r} is neither a builtin ({builtins}) nor of the form 'package.module:factory'"
        )
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module, not ours
        raise CheckpointError(
            f"backbone factory {ref!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise CheckpointError(f"backbone factory {ref!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckpointError(f"backbone factory {ref!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


def _load_failure_reason(exc: Exception) -> str:
    """The one-line cause inside torch.load's multi-paragraph weights-only error, else the exception itself."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first = lines[0]
    return first[: first.index(". ") + 1] if ". " in first else first


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file with ``weights_only=True`` and return its tensor state dict."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not loadable with torch.load(weights_only=True) "
            f"(not a PyTorch file, or it pickles objects other than tensors): {_load_failure_reason(exc)}"
        ) from exc
    if isinstance(raw, Mapping) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a state dict (a mapping of names to tensors), "
            f"got {type(raw).__name__}"
        )
    return dict(raw)


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_classifier(factory_ref: str, checkpoint: str | Path, num_classes: int | None = None) -> Classifier:
    """Build the backbone named by ``factory_ref`` and load ``checkpoint`` into a :class:`Classifier`.

    The number of classes K and the feature width D come from ``head.weight`` (shape ``[K, D]``).
    If ``num_classes`` is given it must equal K. Every failure is a :class:`CheckpointError`
    with a one-line message. The model is returned in eval mode, on the CPU.
    """
    path = Path(checkpoint)
    factory = resolve_factory(factory_ref)
    try:
        backbone = factory()
    except Exception as exc:
        raise CheckpointError(f"backbone factory {factory_ref!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(backbone, nn.Module):
        raise CheckpointError(
            f"backbone factory {factory_ref!r} returned {type(backbone).__name__}, not a torch.nn.Module"
        )

    state = _read_state_dict(path)
    head_weight = state.get("head.weight")
    if head_weight is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no 'head.weight'; expected the state dict of an "
            "oodguard Classifier (keys backbone.*, head.weight, head.bias)"
        )
    if head_weight.ndim != 2:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: 'head.weight' has shape {tuple(head_weight.shape)}, "
            "expected [classes, features]"
        )
    k, d = head_weight.shape
    expected_d = getattr(backbone, "feature_dim", None)
    if expected_d is not None and d != expected_d:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: head expects {d}-d features but backbone {factory_ref!r} "
            f"produces {expected_d}-d features (wrong backbone for this checkpoint?)"
        )
    if num_classes is not None and num_classes != k:
        raise CheckpointError(f"checkpoint has {k} classes but {num_classes} class names were given")

    model = Classifier(backbone, num_classes=k, feature_dim=d)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match backbone {factory_ref!r}: " + "; ".join(parts)
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {key!r} has shape {tuple(state[key].shape)} "
                f"in the checkpoint but {tuple(tensor.shape)} in backbone {factory_ref!r}"
            )
    model.load_state_dict(state)
    return model.eval()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(model: Classifier, path: str | Path) -> str:
    """Save ``model.state_dict()`` to ``path`` and return the file's SHA-256."""
    torch.save(model.state_dict(), path)
    return file_sha256(path)

"""The fused head: one module, and one ONNX graph, from image to logits, features and every OOD score.

``FusedModel(input) -> (logits [B,K], features [B,D], <score> [B] for each score in registry order)``,
all float32; output names are :func:`output_names`. The ONNX file is self-contained (no external
data), has a dynamic batch axis and passes ``onnx.checker``. When a score reads the backbone's layers
(multi-layer SISOM), the graph also holds the hand-written backward pass through the backbone's tail
(:mod:`oodguard.export.layers`); otherwise it is the plain forward pass.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch
from torch import nn

from oodguard import progress
from oodguard.repository import INPUT_NAME, TENSOR_OUTPUTS

from . import layers
from .backbones import Classifier
from .scores import Score

OPSET = 18


class FusedModel(nn.Module):
    def __init__(self, classifier: Classifier, scores: Mapping[str, Score]):
        super().__init__()
        self.classifier = classifier
        self.scores = nn.ModuleDict(dict(scores))
        self.layer_names = tuple(dict.fromkeys(n for s in self.scores.values() if s.uses_layers for n in s.layer_names))

    @property
    def score_names(self) -> list[str]:
        return list(self.scores.keys())

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.layer_names:
            features, logits, pooled = layers.pooled(self.classifier, input, self.layer_names)
        else:
            features = self.classifier.backbone(input)
            logits = self.classifier.head(features)
            pooled = {}
        computed: dict[str, torch.Tensor] = {}
        for name, score in self.scores.items():
            computed[name] = score(logits, features, computed, pooled) if score.uses_layers else score(logits, features, computed)
        return (logits, features, *computed.values())


def output_names(score_names: list[str]) -> list[str]:
    return [*TENSOR_OUTPUTS, *score_names]


def export_onnx(model: FusedModel, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Export the fused model to one ONNX file with a dynamic batch axis; checks it with ``onnx.checker``."""
    return export_module(model, input_shape, path, output_names(model.score_names))


def export_module(module: nn.Module, input_shape: tuple[int, ...], path: str | Path, outputs: list[str]) -> Path:
    """Export any image module (input ``input`` [B, *input_shape]) to one checked, self-contained ONNX file."""
    path = Path(path)
    module.eval()
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    # The exporter logs a warning per missing torchvision op and a FutureWarning; neither concerns us.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def run_torch(model: FusedModel, images: np.ndarray, batch_size: int = 256,
              desc: str | None = None) -> dict[str, np.ndarray]:
    """Outputs of the PyTorch module by name, in batches (parity checks; the export's choices); with ``desc``, a
    progress bar of that name counts the images (:mod:`oodguard.progress`: on a terminal only)."""
    parts: list[tuple[torch.Tensor, ...]] = []
    counted = progress.bar(len(images), desc, "img") if desc is not None else contextlib.nullcontext()
    with torch.no_grad(), counted:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            parts.append(model(torch.as_tensor(batch, dtype=torch.float32)))
            if desc is not None:
                counted.update(len(batch))
    return {name: np.concatenate([part[i].numpy() for part in parts])
            for i, name in enumerate(output_names(model.score_names))}

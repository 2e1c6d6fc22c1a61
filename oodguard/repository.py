"""The model repository: the contract between export (offline) and serving (online).

Layout (Triton's, plus one calibration file per version)::

    <repo>/<model>/config.pbtxt            production config (ONNX Runtime backend, GPU)
    <repo>/<model>/configs/cpu.pbtxt       CPU config used by tests (python backend)
    <repo>/<model>/<version>/model.onnx    fused-head model, one self-contained file
    <repo>/<model>/<version>/calibration.json

Everything the gateway needs to know about a model version lives in that version's folder.
This module only knows paths; it imports neither torch nor grpc.
"""

from __future__ import annotations

from pathlib import Path

MODEL_FILE = "model.onnx"
CALIBRATION_FILE = "calibration.json"
CONFIG_FILE = "config.pbtxt"
CPU_CONFIG_FILE = "configs/cpu.pbtxt"
INPUT_NAME = "input"
#: Output tensors of every fused-head model, in graph order. Scores follow the two tensors.
TENSOR_OUTPUTS = ("logits", "features")


class RepositoryError(ValueError):
    """The repository (or a model or version in it) is missing or malformed."""


def model_dir(repository: str | Path, model: str) -> Path:
    return Path(repository) / model


def versions(repository: str | Path, model: str) -> list[int]:
    """Version numbers present for ``model`` (folders named by a positive integer), ascending."""
    root = model_dir(repository, model)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir()]
    found = [int(name) for name in names if name.isascii() and name.isdigit() and int(name) > 0]
    return sorted(found)


def next_version(repository: str | Path, model: str) -> int:
    existing = versions(repository, model)
    return existing[-1] + 1 if existing else 1


def version_dir(repository: str | Path, model: str, version: int) -> Path:
    return model_dir(repository, model) / str(version)


def models(repository: str | Path) -> list[str]:
    """Model folders in the repository (those holding a config.pbtxt or a version folder)."""
    root = Path(repository)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a folder")
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and ((p / CONFIG_FILE).exists() or versions(root, p.name))
    )

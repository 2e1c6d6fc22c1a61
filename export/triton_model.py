"""The python-backend ``model.py`` every version folder carries for Triton's CPU configuration.

``configs/cpu.pbtxt`` declares ``backend: "python"``; Triton's python backend then imports
``<version>/model.py``, which runs ``<version>/model.onnx`` with ONNX Runtime (source:
``export/triton_python_model.py``). The production config (ONNX Runtime backend) ignores the file.

A version folder holds only ``model.onnx``, ``model.py`` and ``calibration.json``: no bytecode. When Triton's
python backend imports ``model.py`` it would write ``<version>/__pycache__``, which litters the repository and
which the server's repository poll sees as a change, answered with one more reload of the version. The stub
runs an isolated interpreter (``PYTHON*`` variables are ignored), so ``scripts/setup_triton.sh`` puts a ``.pth``
file into the Triton environment that sets ``sys.pycache_prefix`` to its ``pycache/`` folder: bytecode goes
there. A Triton environment of your own that runs the CPU config wants the same line.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

MODEL_PY = "model.py"
#: Where the source lives in this package.
SOURCE_MODULE = "triton_python_model.py"


def model_source() -> str:
    """The text written as ``<version>/model.py``."""
    return resources.files(__package__).joinpath(SOURCE_MODULE).read_text()


def write_triton_model(version_dir: str | Path) -> Path:
    """Write ``model.py`` (world-readable: Triton may run as another user) into ``version_dir``; return its path.

    Call it on the staging folder, before the version is published, so the server never sees a half-written folder.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise FileNotFoundError(f"version folder {version_dir} does not exist")
    path = version_dir / MODEL_PY
    path.write_text(model_source())
    path.chmod(0o644)
    return path


__all__ = ["MODEL_PY", "model_source", "write_triton_model"]

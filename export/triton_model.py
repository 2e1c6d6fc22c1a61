"""The python-backend ``model.py`` every version folder carries for Triton's CPU configuration.

``configs/cpu.pbtxt`` declares ``backend: "python"``; Triton's python backend then imports
``<version>/model.py``, which runs ``<version>/model.onnx`` with ONNX Runtime (source:
``export/triton_python_model.py``). The production config (ONNX Runtime backend) ignores the file.

The file is written precompiled: when Triton's python backend imports a ``model.py`` without bytecode it
writes ``<version>/__pycache__``, which the server's repository poll sees as a change and answers with one
more reload of the version. The bytecode is hash-checked (not timestamp-checked), so it stays valid when
the folder is copied and the source's modification time changes. It is compiled by the exporting
interpreter, so it matches the server's only when both run the same Python minor version (3.11 here);
otherwise the server writes its own once, and the version reloads once more.
"""

from __future__ import annotations

import py_compile
from importlib import resources
from pathlib import Path

MODEL_PY = "model.py"
#: Where the source lives in this package.
SOURCE_MODULE = "triton_python_model.py"


def model_source() -> str:
    """The text written as ``<version>/model.py``."""
    return resources.files(__package__).joinpath(SOURCE_MODULE).read_text()


def write_triton_model(version_dir: str | Path) -> Path:
    """Write ``model.py`` into ``version_dir`` and its bytecode into ``version_dir/__pycache__``; return its path.

    Files are world-readable (Triton may run as another user). Call it on the staging folder, before the
    version is published, so the server never sees a half-written folder.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise FileNotFoundError(f"version folder {version_dir} does not exist")
    path = version_dir / MODEL_PY
    path.write_text(model_source())
    path.chmod(0o644)
    compiled = Path(py_compile.compile(str(path), doraise=True,
                                       invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH))
    compiled.chmod(0o644)
    compiled.parent.chmod(0o755)
    return path


__all__ = ["MODEL_PY", "model_source", "write_triton_model"]

"""Print the runtime requirements of the gateway image: pyproject's base dependencies with ``onnxruntime``
replaced by the chosen ONNX Runtime package (``onnxruntime`` or ``onnxruntime-gpu``; never both). scripts/lock.sh
locks them into locks/gateway-<package>.txt, which the Dockerfile installs.

    python scripts/docker_requirements.py [pyproject.toml] [onnxruntime|onnxruntime-gpu]

Fails when the base dependencies name torch (the image serves only) or no onnxruntime at all.
"""

from __future__ import annotations

import re
import sys
import tomllib

ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def name_of(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"cannot read the package name of {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def runtime_requirements(pyproject: str, ort_package: str = "onnxruntime") -> list[str]:
    if ort_package not in ORT_PACKAGES:
        raise ValueError(f"ONNX Runtime package must be one of {ORT_PACKAGES}, got {ort_package!r}")
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    names = [name_of(d) for d in deps]
    if "torch" in names:
        raise ValueError("the base install must not depend on torch")
    if sum(n in ORT_PACKAGES for n in names) != 1:
        raise ValueError(f"expected exactly one onnxruntime dependency, got {names}")
    return [ort_package + d.strip()[len(n):] if n in ORT_PACKAGES else d.strip() for d, n in zip(deps, names)]


if __name__ == "__main__":
    args = sys.argv[1:]
    try:
        print("\n".join(runtime_requirements(args[0] if args else "pyproject.toml", args[1] if len(args) > 1 else "onnxruntime")))
    except ValueError as exc:
        sys.exit(f"docker_requirements: {exc}")

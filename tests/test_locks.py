"""The lock files (locks/, made by scripts/lock.sh) agree with what they are made from, and every environment,
set-up script and the gateway image install from them with hashes checked.

A dependency added to pyproject.toml (or a locks/*.in file) and not locked, a locked top-level package that no
input asks for any more, or a lock whose version an input's range no longer allows fails here: run
``bash scripts/lock.sh`` and commit locks/.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "locks"
sys.path.insert(0, str(ROOT / "scripts"))
from docker_requirements import runtime_requirements  # noqa: E402

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)")


def read_lock(path: Path) -> dict[str, dict]:
    """{canonical name: {"version", "hashes", "via"}} of a uv/pip-tools requirements lock with hashes."""
    packages: dict[str, dict] = {}
    current = None
    for line in path.read_text().splitlines():
        pin = _PIN.match(line)
        if pin:
            current = {"version": Version(pin.group(3)), "hashes": [], "via": []}
            packages[canonicalize_name(pin.group(1))] = current
        elif current is not None and line.strip().startswith("--hash=sha256:"):
            current["hashes"].append(line.strip().split(":", 1)[1].rstrip(" \\"))
        elif current is not None and re.match(r"\s+#\s+(via\s+)?", line):
            current["via"].append(re.sub(r"^\s+#\s+(via\s*)?", "", line).strip())
        elif line.strip() and not line.startswith("#"):
            raise AssertionError(f"{path.name}: a line that is not a pin, hash or annotation: {line!r}")
    return packages


def read_inputs(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def pyproject_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in extras:
        deps += project["optional-dependencies"][extra]
    return [Requirement(d) for d in deps]


def top_level(lock: dict[str, dict], source: str) -> set[str]:
    """The locked packages an input named ``source`` asks for by name (uv annotates them ``via <source>``)."""
    return {name for name, entry in lock.items() if any(source in via for via in entry["via"])}


def assert_satisfies(lock: dict[str, dict], wanted: list[Requirement], lock_name: str) -> None:
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} is not in {lock_name}: run bash scripts/lock.sh"
        assert req.specifier.contains(lock[name]["version"], prereleases=True), (
            f"{lock_name} pins {name}=={lock[name]['version']}, outside {req}: run bash scripts/lock.sh")


LOCK_FILES = sorted(LOCKS.glob("*.txt"))


def test_every_input_has_its_lock_and_the_documented_command_made_them():
    assert {p.stem for p in LOCK_FILES} >= {"dev", "gateway-onnxruntime", "gateway-onnxruntime-gpu", "triton",
                                            "triton-no-deps", "label-studio", "build", "uv"}
    for lock in LOCK_FILES:
        assert "bash scripts/lock.sh" in lock.read_text().splitlines()[1], f"{lock.name} was not made by scripts/lock.sh"
    for source in LOCKS.glob("*.in"):
        assert (LOCKS / f"{source.stem}.txt").exists() or source.stem == "dev", f"{source.name} has no lock"


@pytest.mark.parametrize("lock_path", LOCK_FILES, ids=lambda p: p.name)
def test_every_locked_package_is_exact_and_hashed(lock_path):
    lock = read_lock(lock_path)
    assert lock, f"{lock_path.name} pins nothing"
    for name, entry in lock.items():
        assert entry["hashes"], f"{lock_path.name}: {name} has no hash"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in entry["hashes"]), name


def test_dev_lock_matches_pyproject():
    """Both ways: every dependency of pyproject's base and its extras is locked within its range, and every
    package the lock says pyproject asked for is still asked for."""
    lock = read_lock(LOCKS / "dev.txt")
    wanted = pyproject_requirements("export", "dev", "bench") + read_inputs(LOCKS / "dev.in")
    assert_satisfies(lock, wanted, "locks/dev.txt")
    asked = {canonicalize_name(r.name) for r in wanted}
    locked_top = top_level(lock, "pyproject.toml") | top_level(lock, "dev.in")
    assert locked_top == asked, (
        f"pyproject.toml / locks/dev.in and locks/dev.txt disagree: only in the inputs {sorted(asked - locked_top)}, "
        f"only in the lock {sorted(locked_top - asked)}; run bash scripts/lock.sh")
    assert str(lock["torch"]["version"]).endswith("+cpu"), "the dev lock must take torch's CPU build"


@pytest.mark.parametrize("ort", ["onnxruntime", "onnxruntime-gpu"])
def test_gateway_image_locks_match_the_base_dependencies(ort):
    lock = read_lock(LOCKS / f"gateway-{ort}.txt")
    wanted = [Requirement(r) for r in runtime_requirements(str(ROOT / "pyproject.toml"), ort)]
    assert_satisfies(lock, wanted, f"locks/gateway-{ort}.txt")
    assert top_level(lock, "pyproject.toml") == {canonicalize_name(r.name) for r in wanted}
    other = {"onnxruntime": "onnxruntime-gpu", "onnxruntime-gpu": "onnxruntime"}[ort]
    assert other not in lock and "torch" not in lock, "the image serves: one ONNX Runtime, no torch"


@pytest.mark.parametrize("name", ["triton", "triton-no-deps", "label-studio", "build", "uv"])
def test_environment_locks_match_their_inputs(name):
    lock = read_lock(LOCKS / f"{name}.txt")
    wanted = read_inputs(LOCKS / f"{name}.in")
    assert_satisfies(lock, wanted, f"locks/{name}.txt")
    assert top_level(lock, f"{name}.in") == {canonicalize_name(r.name) for r in wanted}


def test_label_studio_lock_keeps_a_sentry_sdk_it_can_start_with():
    lock = read_lock(LOCKS / "label-studio.txt")
    assert lock["sentry-sdk"]["version"] < Version("3"), "label-studio 1.23.2 fails at start with sentry-sdk 3"


def test_triton_lock_has_numpy_1_and_pytriton_alone():
    assert read_lock(LOCKS / "triton.txt")["numpy"]["version"] < Version("2")
    assert set(read_lock(LOCKS / "triton-no-deps.txt")) == {"nvidia-pytriton"}


@pytest.mark.parametrize("script, locks", [
    ("setup.sh", ["locks/dev.txt"]),
    ("setup_triton.sh", ["locks/triton.txt", "locks/triton-no-deps.txt"]),
    ("setup_label_studio.sh", ["locks/label-studio.txt"]),
])
def test_setup_scripts_install_from_their_locks_only(script, locks):
    text = (ROOT / "scripts" / script).read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    syncs = re.findall(r'"\$UV" pip sync [^\n]*', code)
    assert len(syncs) == 1 and "--require-hashes" in syncs[0], syncs
    for lock in locks:
        assert lock in syncs[0]
    # nothing is installed by name, outside a lock
    assert not re.search(r"pip install(?![^\n]*(--no-deps --no-build-isolation -e \.|-r locks/))", code), code


def test_dockerfile_installs_from_the_locks_with_hashes():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY locks/gateway-\$\{ORT_PACKAGE\}\.txt ", text, re.M)
    assert re.search(r"pip install --no-cache-dir --require-hashes --no-deps -r /wheels/requirements\.txt", text)
    assert re.search(r"pip install --no-cache-dir --require-hashes -r locks/build\.txt", text)
    assert "--no-build-isolation" in text  # the wheel is built with the locked setuptools, not a fresh one

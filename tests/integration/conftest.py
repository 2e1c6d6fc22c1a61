"""Real-component fixtures: every helper that starts a server for the integration tests lives here, and each
stops what it started by PID.

tritonserver comes from ``.venv-triton`` (``bash scripts/setup_triton.sh``; another location with
``OODGUARD_TRITON_ENV``). Without it the Triton tests skip with the reason, unless ``OODGUARD_REQUIRE_TRITON=1``
(set by .ci/run), where its absence is a failure. Why the environment looks the way it does:
oodguard/triton_local.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from missing import missing
from oodguard.triton_local import TritonInstall, TritonServer, triton_env_dir


def require_triton() -> "TritonInstall":
    """The tritonserver install, or a skip (a failure with OODGUARD_REQUIRE_TRITON=1) saying what is missing."""
    install = TritonInstall.find(triton_env_dir())
    if isinstance(install, str):
        missing(f"{install}; run `bash scripts/setup_triton.sh` (or set OODGUARD_TRITON_ENV)", "OODGUARD_REQUIRE_TRITON")
    return install


def start_triton(repository: Path, log_path: Path, **options) -> TritonServer:
    """Start tritonserver on ``repository`` (skips/fails as :func:`require_triton` when it is not installed)."""
    return TritonServer(require_triton(), Path(repository), Path(log_path), **options).start()


@pytest.fixture(scope="session")
def triton_install() -> TritonInstall:
    """The tritonserver install; skips (or fails with OODGUARD_REQUIRE_TRITON=1) before any slow setup."""
    return require_triton()


@pytest.fixture(scope="module")
def triton_repository(triton_install, digits_export, tmp_path_factory) -> Path:
    """A private copy of the digits repository: tests may add versions to it without touching other tests."""
    _, _, repository, _ = digits_export
    target = tmp_path_factory.mktemp("triton-repo") / "repository"
    shutil.copytree(repository, target)
    return target


@pytest.fixture(scope="module")
def triton_server(triton_install, triton_repository, tmp_path_factory):
    """A running tritonserver on the digits repository copy. Yields the :class:`TritonServer` handle
    (``.url``, ``.repository``, ``.stop()/.kill()/.start()/.restart()``); stopped by PID at teardown."""
    server = TritonServer(triton_install, triton_repository, tmp_path_factory.mktemp("triton-log") / "tritonserver.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()

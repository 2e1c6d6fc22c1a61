"""Real-component fixtures: every helper that starts a server for the integration tests lives here, and each
stops what it started by PID.

tritonserver comes from ``.venv-triton`` (``bash scripts/setup_triton.sh``; another location with
``OODGUARD_TRITON_ENV``). Without it the Triton tests skip with the reason, unless ``OODGUARD_REQUIRE_TRITON=1``
(set by .ci/run), where its absence is a failure. Why the environment looks the way it does:
oodguard/triton_local.py.
"""

from __future__ import annotations

import os
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


#: Where a failed test's tritonserver log is copied (kept after pytest's temporary folders are gone).
FAILED_LOG_DIR = Path(os.environ.get("OODGUARD_TEST_LOG_DIR") or Path(__file__).resolve().parents[2] / "runs" / "test-logs")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that fails while a tritonserver of the ``triton_server`` fixture runs keeps that server's log: its
    tail goes into the failure report (a section "tritonserver log") and the whole log is copied to
    runs/test-logs/ (OODGUARD_TEST_LOG_DIR), so a cause like refused connections mid-module can be found."""
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("triton_server")
    if not report.failed or server is None:
        return
    FAILED_LOG_DIR.mkdir(parents=True, exist_ok=True)
    kept = FAILED_LOG_DIR / f"{item.nodeid.replace('/', '_').replace('::', '-')}-{report.when}-tritonserver.log"
    try:
        shutil.copyfile(server.log_path, kept)
        where = f"whole log: {kept}"
    except OSError as exc:
        where = f"the log could not be kept: {exc}"
    report.sections.append(("tritonserver log", f"{where}\n{server.log_tail(6000)}"))

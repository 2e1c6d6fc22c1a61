"""A real Label Studio server on a loopback port for the harvest → Label Studio → `labels import` tests,
stopped by PID (its process group).

``label-studio`` comes from ``.venv-label-studio`` (``bash scripts/setup_label_studio.sh``; another location
with ``OODGUARD_LABEL_STUDIO_ENV``). Without it the tests that need it skip with the reason, unless
``OODGUARD_REQUIRE_LABEL_STUDIO=1`` (set by .ci/run), where its absence is a failure.

How the server is set up (Label Studio 1.23):

* its own data folder (SQLite database, media) in a temporary folder: the first start runs the migrations,
  30-60 s; nothing is shared with a user's ``~/.local/share/label-studio``;
* a user and an API token created non-interactively by ``label-studio start --username --password
  --user-token``; the token is a *legacy* API token (``Authorization: Token <key>``), which 1.23 only accepts
  when the organization allows them: ``--enable-legacy-api-token`` (applied when the first start creates the
  organization);
* local files: ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``
  a temporary folder (``document_root``). Label Studio serves ``/data/local-files/?d=<path>`` only for files
  below the path of a project's Local Files storage, so :meth:`LabelStudioServer.import_tasks` adds one for each folder the tasks' images are in;
* no version check or analytics calls (no network here).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

from dataclasses import dataclass
from pathlib import Path

import pytest
from missing import missing

from oodguard.harvest.label_studio_client import LabelStudioClient, LabelStudioError

ROOT = Path(__file__).resolve().parents[1]
USERNAME = "oodguard-tests@example.com"
PASSWORD = "oodguard-tests-password"
TOKEN = "oodguard0tests0api0token0000000000000000"  # the legacy token form: 40 characters
STARTED = re.compile(r"Starting development server at http://127\.0\.0\.1:(\d+)/")


def label_studio_env_dir() -> Path:
    return Path(os.environ.get("OODGUARD_LABEL_STUDIO_ENV") or ROOT / ".venv-label-studio")


def require_label_studio() -> Path:
    """The ``label-studio`` executable, or a skip (a failure with OODGUARD_REQUIRE_LABEL_STUDIO=1)."""
    binary = label_studio_env_dir() / "bin" / "label-studio"
    if not binary.is_file():
        missing(f"Label Studio is not installed at {binary.parent.parent}; run `bash scripts/setup_label_studio.sh` "
                "(or set OODGUARD_LABEL_STUDIO_ENV)", "OODGUARD_REQUIRE_LABEL_STUDIO")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabelStudioServer(LabelStudioClient):
    """``start()`` returns once the API answers with the token; ``stop()`` is SIGTERM to its process group (then
    SIGKILL). The REST API calls are the product's own client (:class:`LabelStudioClient`), with the token."""

    token = TOKEN
    timeout_s = 60.0

    binary: Path
    data_dir: Path
    document_root: Path
    port: int = 0
    process: subprocess.Popen | None = None
    start_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / "label-studio.log"

    def environment(self) -> dict[str, str]:
        """The caller's environment without anything Label Studio would read (it reads LABEL_STUDIO_X, HEARTEX_X
        and plain X for many settings, e.g. HOST, PORT, USERNAME), plus this server's settings."""
        ignored = {"HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DATABASE_NAME", "DJANGO_DB", "DEBUG",
                   "LOG_LEVEL", "SECRET_KEY", "DJANGO_SETTINGS_MODULE", "LOCAL_FILES_SERVING_ENABLED",
                   "LOCAL_FILES_DOCUMENT_ROOT", "BASE_DATA_DIR"}
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LABEL_STUDIO_", "HEARTEX_")) and k not in ignored}
        env.update({
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self, timeout_s: float = 240.0) -> "LabelStudioServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"label-studio already runs (PID {self.process.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.document_root.mkdir(parents=True, exist_ok=True)
        command = [str(self.binary), "start", "--no-browser", "--internal-host", "127.0.0.1",
                   "--port", str(self.port or _free_port()), "--data-dir", str(self.data_dir),
                   "--username", USERNAME, "--password", PASSWORD, "--user-token", TOKEN,
                   "--enable-legacy-api-token", "--log-level", "WARNING"]
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), cwd=self.data_dir, start_new_session=True)
        deadline = began + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"label-studio exited with {self.process.returncode}:\n{self.log_tail()}")
            found = STARTED.findall(self.log_text())  # it moves to the next port when the one given is taken
            if found:
                self.port = int(found[-1])
                if self._answers():
                    self.start_seconds = time.monotonic() - began
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"label-studio did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            return self.api("GET", "/api/current-user/whoami", timeout=5).get("email") == USERNAME
        except (OSError, LabelStudioError, ValueError):
            return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:] or "(empty log)"

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the group is its PID
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(10)
        self.process = None

    def import_tasks(self, project_id: int, tasks: list[dict], local_files_root: Path | None = None) -> dict:
        return super().import_tasks(project_id, tasks, local_files_root or self.document_root)

    def annotate(self, task_id: int, answer: dict) -> dict:
        """Submit an annotation: ``answer["label"]`` as the ``label`` choice (a list for several), with
        ``answer["new_class"]`` as the ``new_class`` text when given; ``was_cancelled`` (skipped) when
        ``answer["cancelled"]``."""
        labels = answer.get("label", [])
        result = [{"from_name": "label", "to_name": "image", "type": "choices",
                   "value": {"choices": labels if isinstance(labels, list) else [labels]}}] if labels else []
        if answer.get("new_class") is not None:
            result.append({"from_name": "new_class", "to_name": "image", "type": "textarea",
                           "value": {"text": [answer["new_class"]]}})
        return self.api("POST", f"/api/tasks/{task_id}/annotations",
                        {"result": result, "was_cancelled": bool(answer.get("cancelled"))})


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A running Label Studio (:class:`LabelStudioServer`: ``.url``, ``.document_root`` — harvest into folders
    below it, with ``ExportOptions(local_files_root=document_root)`` —, ``create_project()``, ``import_tasks()``,
    ``tasks()``, ``annotate()``, ``export()``, ``get_bytes()``, ``api()``); started once per session (30-60 s:
    migrations), stopped by PID at the end."""
    binary = require_label_studio()
    work = tmp_path_factory.mktemp("label-studio")
    server = LabelStudioServer(binary, work / "data", (work / "files").resolve())
    try:
        server.start()
        yield server
    finally:
        server.stop()

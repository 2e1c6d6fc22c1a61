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

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from missing import missing

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


class LabelStudioError(RuntimeError):
    """An API call answered with an error status."""

    def __init__(self, method: str, path: str, status: int, body: bytes):
        super().__init__(f"{method} {path}: HTTP {status}: {body[:2000].decode(errors='replace')}")
        self.status, self.body = status, body


@dataclass
class LabelStudioServer:
    """``start()`` returns once the API answers with the token; ``stop()`` is SIGTERM to its process group (then
    SIGKILL). ``api()`` calls the REST API with the token."""

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

    # --- the REST API, with the token

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes, dict]:
        data = None
        all_headers = {"Authorization": f"Token {TOKEN}", **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers or {})

    def api(self, method: str, path: str, body=None, timeout: float = 60):
        """The JSON answer of a 2xx call; :class:`LabelStudioError` otherwise."""
        status, data, _ = self.request(method, path, body, timeout=timeout)
        if not 200 <= status < 300:
            raise LabelStudioError(method, path, status, data)
        return json.loads(data) if data else None

    def add_local_storage(self, project_id: int, path: Path) -> dict:
        """A Local Files storage of the project at ``path`` (a folder below ``document_root``, not the root itself),
        so that Label Studio serves the files below it; not synced (tasks are imported with their URLs)."""
        return self.api("POST", "/api/storages/localfiles", {
            "project": project_id, "path": str(Path(path).resolve()), "title": "oodguard harvest images",
            "use_blob_urls": False})

    # --- what a test does with a project

    def create_project(self, title: str, label_config: str) -> int:
        """A new project with this labeling configuration; returns its id."""
        return self.api("POST", "/api/projects", {"title": title, "label_config": label_config})["id"]

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        """Import ``tasks`` (tasks.json as it is), after adding a Local Files storage for each folder their
        local-files images are in (what a user does in the project's Cloud Storage settings)."""
        storages = {s["path"] for s in self.api("GET", f"/api/storages/localfiles?project={project_id}")}
        for folder in sorted({self.local_file(t["data"]["image"]).parent for t in tasks
                              if str(t["data"].get("image", "")).startswith("/data/local-files/")}):
            if str(folder) not in storages:
                self.add_local_storage(project_id, folder)
                storages.add(str(folder))
        answer = self.api("POST", f"/api/projects/{project_id}/import", tasks, timeout=300)
        assert answer["task_count"] == len(tasks), answer
        return answer

    def local_file(self, url: str) -> Path:
        """The file a ``/data/local-files/?d=...`` URL names (below ``document_root``)."""
        query = urllib.parse.urlparse(url).query
        return self.document_root / urllib.parse.parse_qs(query)["d"][0]

    def tasks(self, project_id: int) -> list[dict]:
        """Every task of the project, in id order."""
        out, page = [], 1
        while True:
            answer = self.api("GET", f"/api/tasks?project={project_id}&page={page}&page_size=100")
            out.extend(answer["tasks"])
            if len(out) >= answer["total"] or not answer["tasks"]:
                return sorted(out, key=lambda t: t["id"])
            page += 1

    def get_bytes(self, url: str) -> bytes:
        """GET a URL of the server (e.g. a task's ``data.image``) with the token; raises unless 200."""
        status, data, _ = self.request("GET", url if url.startswith("/") else urllib.parse.urlparse(url).path)
        if status != 200:
            raise LabelStudioError("GET", url, status, data)
        return data

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

    def export(self, project_id: int, export_type: str) -> bytes:
        """The project's export (``JSON``, ``JSON_MIN``, ``CSV``, ...) through the export API."""
        status, data, _ = self.request("GET", f"/api/projects/{project_id}/export?exportType={export_type}",
                                       timeout=300)
        if status != 200:
            raise LabelStudioError("GET", f"export {export_type}", status, data)
        return data


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

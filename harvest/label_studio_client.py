"""A small client of Label Studio's REST API (urllib only): push a harvest into a new project, pull an export.

``oodguard labels push HARVEST_DIR`` creates a project from the harvest's ``label_config.xml``, connects a Local
Files storage for the folder its task images are in (Label Studio 1.23 serves ``/data/local-files/?d=...`` only
below the path of a project's Local Files storage, and that path may not be the document root itself), and
imports ``tasks.json`` as it is. ``oodguard labels pull`` downloads the project's export (``JSON``,
``JSON_MIN`` or ``CSV``) that ``oodguard labels import`` reads.

Auth: a Label Studio API token, sent as ``Authorization: Token <token>`` (the "legacy" token; Label Studio
1.23 accepts it once the organization allows legacy tokens: start it with ``--enable-legacy-api-token``).
The server must serve local files: ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` = the ``--local-files-root`` the harvest was written with.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

EXPORT_TYPES = ("JSON", "JSON_MIN", "CSV")
LOCAL_FILES_PREFIX = "/data/local-files/"


class LabelStudioError(RuntimeError):
    """Label Studio answered a call with an error (or could not be reached)."""

    def __init__(self, method: str, path: str, status: int, body: bytes):
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500].decode(errors='replace')}")
        self.status, self.body = status, body


class LabelStudioClient:
    def __init__(self, url: str, token: str, timeout_s: float = 60.0):
        if not token:
            raise ValueError("a Label Studio API token is needed (Account & Settings → Access Token)")
        self._url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s

    @property
    def url(self) -> str:
        return self._url

    def request(self, method: str, path: str, body=None, timeout: float | None = None) -> tuple[int, bytes]:
        """(status, body) of one call; ``body`` is sent as JSON."""
        headers = {"Authorization": f"Token {self.token}"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError as exc:
            raise LabelStudioError(method, path, 0, f"cannot reach Label Studio at {self.url}: {exc}".encode()) from exc

    def api(self, method: str, path: str, body=None, timeout: float | None = None):
        """The JSON answer of a 2xx call; :class:`LabelStudioError` otherwise."""
        status, data = self.request(method, path, body, timeout)
        if not 200 <= status < 300:
            raise LabelStudioError(method, path, status, data)
        return json.loads(data) if data else None

    # -- projects -------------------------------------------------------------------------------------
    def create_project(self, title: str, label_config: str) -> int:
        """A new project with this labeling configuration; returns its id."""
        return self.api("POST", "/api/projects", {"title": title, "label_config": label_config})["id"]

    def add_local_storage(self, project_id: int, path: Path) -> dict:
        """A Local Files storage of the project at ``path`` (an absolute folder below the server's document
        root), so that the server serves the files below it; not synced: tasks are imported with their URLs."""
        return self.api("POST", "/api/storages/localfiles", {
            "project": project_id, "path": str(Path(path).resolve()), "title": "oodguard harvest images",
            "use_blob_urls": False})

    def import_tasks(self, project_id: int, tasks: list[dict], local_files_root: Path = Path("/")) -> dict:
        """Import ``tasks`` (a harvest's tasks.json as it is), after connecting a Local Files storage for each
        folder their local-files images are in (``local_files_root``: the server's document root)."""
        storages = {s["path"] for s in self.api("GET", f"/api/storages/localfiles?project={project_id}")}
        for folder in sorted({local_file(t["data"]["image"], local_files_root).parent for t in tasks
                              if str(t["data"].get("image", "")).startswith(LOCAL_FILES_PREFIX)}):
            if str(folder) not in storages:
                self.add_local_storage(project_id, folder)
                storages.add(str(folder))
        answer = self.api("POST", f"/api/projects/{project_id}/import", tasks, timeout=300)
        if answer.get("task_count") != len(tasks):
            raise LabelStudioError("POST", f"/api/projects/{project_id}/import", 200,
                                   f"imported {answer.get('task_count')} of {len(tasks)} tasks".encode())
        return answer

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
        """GET a URL of the server (e.g. a task's ``data.image``); raises unless 200."""
        path = url if url.startswith("/") else urllib.parse.urlparse(url).path
        status, data = self.request("GET", path)
        if status != 200:
            raise LabelStudioError("GET", url, status, data)
        return data

    def export(self, project_id: int, export_type: str) -> bytes:
        """The project's export in ``export_type`` (``JSON``, ``JSON_MIN``, ``CSV``)."""
        if export_type not in EXPORT_TYPES:
            raise ValueError(f"export type must be one of {EXPORT_TYPES}, got {export_type!r}")
        path = f"/api/projects/{project_id}/export?exportType={export_type}"
        status, data = self.request("GET", path, timeout=300)
        if status != 200:
            raise LabelStudioError("GET", path, status, data)
        return data


def local_file(url: str, local_files_root: Path) -> Path:
    """The file a ``/data/local-files/?d=<path>`` URL names, below ``local_files_root``."""
    query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
    return Path(local_files_root) / query["d"][0]


def push_harvest(client: LabelStudioClient, harvest_dir: Path, local_files_root: Path = Path("/"),
                 title: str | None = None) -> int:
    """A new project holding the harvest at ``harvest_dir`` (its config and tasks); returns the project id."""
    harvest_dir = Path(harvest_dir)
    for name in ("label_config.xml", "tasks.json"):
        if not (harvest_dir / name).is_file():
            raise ValueError(f"{harvest_dir} holds no {name}: is it a harvest output folder?")
    tasks = json.loads((harvest_dir / "tasks.json").read_text())
    project = client.create_project(title or f"oodguard {harvest_dir.name}", (harvest_dir / "label_config.xml").read_text())
    client.import_tasks(project, tasks, local_files_root)
    return project


__all__ = ["LabelStudioClient", "LabelStudioError", "push_harvest", "local_file", "EXPORT_TYPES"]

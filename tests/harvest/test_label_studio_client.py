"""The Label Studio client without a server: its errors and URL mapping (the real server: tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oodguard.cli import main
from oodguard.harvest.label_studio_client import LabelStudioClient, LabelStudioError, local_file, push_harvest


def test_local_files_urls_map_below_the_document_root():
    assert local_file("/data/local-files/?d=runs/h1/images/a.png", Path("/srv/files")) == Path("/srv/files/runs/h1/images/a.png")
    assert local_file("/data/local-files/?d=tmp%2Fx%20y.png", Path("/")) == Path("/tmp/x y.png")


def test_push_refuses_a_folder_that_is_not_a_harvest(tmp_path):
    client = LabelStudioClient("http://127.0.0.1:9", "token")
    with pytest.raises(ValueError, match="holds no label_config.xml: is it a harvest output folder"):
        push_harvest(client, tmp_path)


def test_an_unreachable_server_and_a_missing_token_are_clear_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="API token is needed"):
        LabelStudioClient("http://127.0.0.1:9", "")
    with pytest.raises(LabelStudioError, match="cannot reach Label Studio at http://127.0.0.1:9"):
        LabelStudioClient("http://127.0.0.1:9", "token", timeout_s=2).export(1, "JSON")
    with pytest.raises(ValueError, match="export type must be one of"):
        LabelStudioClient("http://127.0.0.1:9", "token").export(1, "XML")
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    out = tmp_path / "x.json"
    assert main(["labels", "pull", "--label-studio", "http://127.0.0.1:9", "--project", "1", "--out", str(out)]) == 2
    assert "set LABEL_STUDIO_API_KEY to a Label Studio API token" in capsys.readouterr().err
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "token")
    assert main(["labels", "pull", "--label-studio", "http://127.0.0.1:9", "--project", "1", "--out", str(out)]) == 2
    assert "Label Studio: GET /api/projects/1/export" in capsys.readouterr().err and not out.exists()

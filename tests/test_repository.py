"""Model repository paths: version folders, the next version number, and which folders are models."""

from __future__ import annotations

from pathlib import Path

import pytest

from oodguard.repository import CONFIG_FILE, RepositoryError, model_dir, models, next_version, version_dir, versions


def make_dirs(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)


def test_versions_are_positive_integer_folders_in_numeric_order(tmp_path):
    make_dirs(tmp_path / "m", "1", "10", "2", "0", "latest", "3a", "-4", "²", "١٢")
    (tmp_path / "m" / "7").write_text("a file, not a version")
    assert versions(tmp_path, "m") == [1, 2, 10]


def test_versions_of_missing_model_is_empty(tmp_path):
    assert versions(tmp_path, "absent") == []
    assert versions(tmp_path / "no-repo", "absent") == []


def test_next_version(tmp_path):
    assert next_version(tmp_path, "m") == 1
    make_dirs(tmp_path / "m", "0", "notes")
    assert next_version(tmp_path, "m") == 1
    make_dirs(tmp_path / "m", "3", "12")
    assert next_version(tmp_path, "m") == 13


def test_paths(tmp_path):
    assert model_dir(tmp_path, "m") == tmp_path / "m"
    assert version_dir(str(tmp_path), "m", 4) == tmp_path / "m" / "4"


def test_models_are_folders_with_a_config_or_a_version(tmp_path):
    make_dirs(tmp_path, "with_config", "with_version/2", "only_zero/0", "empty", "other/docs")
    (tmp_path / "with_config" / CONFIG_FILE).write_text('name: "with_config"')
    (tmp_path / "stray.txt").write_text("not a model")
    assert models(tmp_path) == ["with_config", "with_version"]


def test_empty_repository_has_no_models(tmp_path):
    assert models(tmp_path) == []


def test_missing_repository_is_an_error(tmp_path):
    with pytest.raises(RepositoryError, match="does not exist or is not a folder"):
        models(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(RepositoryError, match="does not exist"):
        models(tmp_path / "file")

"""Queue URLs follow SQLAlchemy's convention: sqlite:///relative.db (relative to the working directory),
sqlite:////absolute/path.db; two slashes is an error that says what to write. Only ``serve`` creates a queue."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oodguard.queues.factory import describe_url, open_queue, sqlite_path
from oodguard.serve.settings import Settings, SettingsError
from oodguard.queues.sqlite import SQLiteQueue

from .store_checks import record


def test_three_slashes_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    q = open_queue("sqlite:///sub/q.sqlite")
    assert isinstance(q, SQLiteQueue) and q.path == tmp_path / "sub" / "q.sqlite" and q.path.is_absolute()
    q.close()
    assert (tmp_path / "sub" / "q.sqlite").is_file()
    # the URL the gateway documents: a file next to it, not at the root of the file system
    assert sqlite_path("sqlite:///oodguard-queue.sqlite") == tmp_path / "oodguard-queue.sqlite"
    assert sqlite_path("sqlite:///../x/q.sqlite") == tmp_path.parent / "x" / "q.sqlite"  # normalised


def test_four_slashes_is_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    url = f"sqlite:///{tmp_path / 'abs.sqlite'}"
    assert url.startswith("sqlite:////")
    monkeypatch.chdir(tmp_path / "elsewhere")
    q = open_queue(url)
    assert q.path == tmp_path / "abs.sqlite"
    q.close()
    assert (tmp_path / "abs.sqlite").is_file() and not list((tmp_path / "elsewhere").iterdir())
    assert sqlite_path("sqlite:////var/lib/q.sqlite") == Path("/var/lib/q.sqlite")


@pytest.mark.parametrize("url, says", [
    ("sqlite://q.sqlite", ["two slashes", "sqlite:///q.sqlite", "sqlite:////q.sqlite"]),
    ("sqlite://var/lib/q.sqlite", ["two slashes", "sqlite:///var/lib/q.sqlite", "sqlite:////var/lib/q.sqlite"]),
    ("sqlite://", ["names no file", "sqlite:///queue.sqlite", "sqlite:////absolute/path/queue.sqlite"]),
    ("sqlite:///", ["names no file", "sqlite:///queue.sqlite"]),
    ("sqlite:///q.sqlite?mode=ro", ["no query parameters"]),
    ("mysql://h/db", ["expected sqlite:///PATH", "sqlite:////ABSOLUTE/PATH", "redis://"]),
])
def test_other_forms_are_errors_that_say_what_to_write(tmp_path, monkeypatch, url, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as caught:
        open_queue(url)
    for text in says:
        assert text in str(caught.value)
    assert not list(tmp_path.iterdir())  # nothing created


def test_two_slashes_error_names_the_relative_file_it_would_be(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"for {tmp_path / 'q.sqlite'} \\(relative to the working directory\\)"):
        sqlite_path("sqlite://q.sqlite")


def test_a_missing_file_is_an_error_naming_its_absolute_path_and_is_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        open_queue("sqlite:///sub/x.sqlite", create=False)
    assert str(caught.value) == (f"no queue at {tmp_path / 'sub' / 'x.sqlite'} (from sqlite:///sub/x.sqlite); "
                                 "the gateway creates it on first start")
    assert not (tmp_path / "sub").exists() and not list(tmp_path.iterdir())
    open_queue("sqlite:///sub/x.sqlite").close()  # serve: created
    q = open_queue("sqlite:///sub/x.sqlite", create=False)  # the others: it exists now
    assert q.put([record(0)])[0] and q.stats().size == 1
    q.close()


def test_describe_url_shows_the_resolved_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert describe_url("sqlite:///q.sqlite") == f"sqlite:///{tmp_path / 'q.sqlite'}"
    assert describe_url(f"sqlite:///{tmp_path / 'a.sqlite'}") == f"sqlite:///{tmp_path / 'a.sqlite'}"
    assert describe_url("sqlite://bad") == "sqlite://bad"  # a log line never raises
    assert describe_url("redis://user:secret@h:1/0") == "redis://user:***@h:1/0"


def test_settings_write_queue_path_in_the_new_form_and_refuse_two_slashes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def url(**overrides) -> str:
        return Settings.from_sources({"repository": "r", **overrides}, {}).effective_queue_url

    assert url() == "sqlite:///oodguard-queue.sqlite"
    assert sqlite_path(url()) == tmp_path / "oodguard-queue.sqlite"
    assert url(queue_path="sub/q.sqlite") == "sqlite:///sub/q.sqlite"
    assert url(queue_path="/srv/q.sqlite") == "sqlite:////srv/q.sqlite"
    assert sqlite_path(url(queue_path="/srv/q.sqlite")) == Path("/srv/q.sqlite")
    assert url(queue_url="sqlite:////srv/other.sqlite") == "sqlite:////srv/other.sqlite"
    with pytest.raises(SettingsError, match="OODGUARD_QUEUE_URL.*two slashes.*sqlite:///q.sqlite"):
        Settings.from_sources({"repository": "r"}, {"OODGUARD_QUEUE_URL": "sqlite://q.sqlite"})
    with pytest.raises(SettingsError, match="queue_url.*names no file"):
        Settings.from_sources({"repository": "r", "queue_url": "sqlite://"}, {})


def test_commands_other_than_serve_do_not_create_the_queue(tmp_path, monkeypatch, capsys):
    from oodguard.cli import main

    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.sqlite"
    commands = [["harvest", "--queue", "sqlite:///missing.sqlite", "--strategy", "random", "--budget", "1",
                 "--out", str(tmp_path / "out")],
                ["labels", "import", str(tmp_path / "labels.csv"), "--queue", "sqlite:///missing.sqlite",
                 "--out", str(tmp_path / "d.npz")],
                ["queue", "stats", "--queue", "sqlite:///missing.sqlite"]]
    (tmp_path / "labels.csv").write_text("record_id,label\nx,1\n")
    for command in commands:
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"no queue at {missing} (from sqlite:///missing.sqlite); the gateway creates it on first start" in err
    assert sorted(os.listdir(tmp_path)) == ["labels.csv"]

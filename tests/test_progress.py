"""oodguard.progress: bars on stderr only on a terminal (or with OODGUARD_PROGRESS=1), never on stdout."""

import io
import sys

import pytest

from oodguard import progress


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


@pytest.fixture
def unset(monkeypatch):
    monkeypatch.delenv("OODGUARD_PROGRESS", raising=False)


def use_bars(items=range(5)):
    """A track, a counted bar and a phase, as the long jobs use them; returns what track yielded."""
    seen = list(progress.track(items, desc="walking items", unit="item"))
    with progress.bar(10, "counting things", "thing") as counted:
        counted.update(4)
        counted.update(6)
    with progress.phase("a phase of its own"):
        pass
    return seen


def test_no_bar_when_stderr_is_not_a_terminal(unset, capsys):
    assert not sys.stderr.isatty() and not progress.enabled()
    assert use_bars() == [0, 1, 2, 3, 4]
    assert capsys.readouterr() == ("", "")


def test_forced_on_bars_go_to_stderr_and_name_their_step(monkeypatch, capsys):
    monkeypatch.setenv("OODGUARD_PROGRESS", "1")
    assert progress.enabled()
    assert use_bars() == [0, 1, 2, 3, 4]
    out, err = capsys.readouterr()
    assert out == ""
    assert "walking items" in err and "counting things" in err and "a phase of its own" in err
    assert "/5" in err and "/10" in err  # the counted bars show their totals


def test_a_terminal_gets_bars_unless_forced_off(monkeypatch, unset, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress.enabled()
    use_bars()
    assert "counting things" in terminal.getvalue()
    monkeypatch.setenv("OODGUARD_PROGRESS", "0")
    terminal.seek(0)
    terminal.truncate()
    assert not progress.enabled()
    assert use_bars() == [0, 1, 2, 3, 4]
    assert terminal.getvalue() == ""
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("forced", ["0", "1"])
def test_track_yields_every_item_in_order_also_without_a_length(monkeypatch, forced, capsys):
    monkeypatch.setenv("OODGUARD_PROGRESS", forced)
    items = ["b", "a", "c", "a"]
    assert list(progress.track(items, desc="list")) == items
    assert list(progress.track(iter(items), desc="iterator")) == items  # no len(): a bar without a total
    assert list(progress.track(iter(items), desc="given total", total=4)) == items
    assert list(progress.track([], desc="nothing")) == []
    assert capsys.readouterr().out == ""


def test_a_phase_passes_errors_through(monkeypatch):
    monkeypatch.setenv("OODGUARD_PROGRESS", "1")
    with pytest.raises(KeyError):
        with progress.phase("failing"):
            raise KeyError("x")

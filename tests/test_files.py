"""oodguard.files: outputs appear whole or not at all, and renames that belong together finish together."""

from __future__ import annotations

import os
import signal

import pytest

from oodguard.files import interrupts_deferred, replace_together, staged_file


def test_staged_file_is_beside_the_final_name_and_removed_on_error(tmp_path):
    tmp = staged_file(tmp_path / "out.json", lambda path: path.write_text("{}"))
    assert tmp.parent == tmp_path and tmp.read_text() == "{}" and oct(tmp.stat().st_mode & 0o777) == "0o644"

    def fails(path):
        path.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        staged_file(tmp_path / "other.json", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name]  # the failed one left nothing


def test_a_ctrl_c_inside_the_block_takes_effect_after_it(tmp_path):
    done = []
    # Python's own handler, as from a terminal, even when this run was started with SIGINT ignored (nohup)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)  # delivered now, held back
                done.append("rest of the block")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done == ["rest of the block"]


def test_replace_together_moves_every_pair(tmp_path):
    pairs = []
    for name in ("a", "b"):
        (tmp_path / name).write_text("old")
        pairs.append((staged_file(tmp_path / name, lambda p, n=name: p.write_text(f"new {n}")), tmp_path / name))
    replace_together(pairs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "a").read_text() == "new a" and (tmp_path / "b").read_text() == "new b"

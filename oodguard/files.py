"""Writing outputs so that a crash or Ctrl-C never leaves half of them: a file appears whole or not at all, and a
few renames that belong together finish together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


def staged_file(path: Path, write: Callable[[Path], None], mode: int = 0o644) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path`` (same folder, so a rename is atomic); the finished
    temporary file, which the caller renames into place with ``os.replace`` (removed again on any error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600; a server may read it as another user
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the block with SIGINT held back: a Ctrl-C during it takes effect (KeyboardInterrupt) right after it.
    For a few renames or writes that must finish together. Outside the main thread it does nothing (only the
    main thread receives signals in Python)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, object]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(*caught[0])


def replace_together(pairs: list[tuple[Path, Path]]) -> None:
    """``os.replace(tmp, final)`` for each pair, with Ctrl-C held back until all are done."""
    with interrupts_deferred():
        for tmp, final in pairs:
            os.replace(tmp, final)

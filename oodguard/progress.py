"""Progress bars for the long jobs (train, export phases, evaluate, harvest, labels import), through tqdm.

One place decides how they look and when they show: on a terminal (stderr is a TTY) a bar; elsewhere (a log,
CI, a pipe) nothing, so logs keep their plain lines. ``OODGUARD_PROGRESS=1`` forces bars on, ``0`` off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def enabled() -> bool:
    """Whether bars show: OODGUARD_PROGRESS=1/0 decides when set, else whether stderr is a terminal."""
    forced = os.environ.get("OODGUARD_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", unit: str = "it", **options) -> tqdm:
    """A tqdm bar on stderr (disabled, and silent, when :func:`enabled` is false). Use as a context manager and
    call ``.update(n)``."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(), leave=False,
                dynamic_ncols=True, **options)


def track(items: Iterable[T], desc: str = "", total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items``, with a bar while they are walked."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total=total, desc=desc, unit=unit) as progress:
        for item in items:
            yield item
            progress.update(1)


@contextlib.contextmanager
def phase(desc: str, refresh_s: float = 0.5) -> Iterator[None]:
    """A step with no count of its own: its name and a running clock while it runs (nothing off a terminal).
    tqdm redraws only on an update, so a daemon thread redraws the clock every ``refresh_s`` seconds."""
    with bar(total=None, desc=desc, unit="phase", bar_format="{desc}: {elapsed}") as progress:
        if progress.disable:
            yield
            return
        done = threading.Event()

        def tick() -> None:
            while not done.wait(refresh_s):
                progress.refresh()

        ticker = threading.Thread(target=tick, name=f"progress {desc}", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()

"""Give freed request memory back to the operating system (glibc), so hostile traffic cannot park RSS high.

Large requests leave the resident size high while the gateway idles, although the Python heap is small:
glibc keeps freed blocks of its arenas (gRPC's receive buffers, protobuf arenas, the request bytes, each
allocated on whichever thread handled it) for reuse and returns them only on ``malloc_trim`` (figures:
docs/benchmarks.md, "memory: trimming freed request memory"). ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_ARENA_MAX`` do not help: the large buffers are made of many smaller blocks. :class:`MemoryTrimmer`
calls ``malloc_trim(0)`` on a thread of its own once enough request bytes were released (default 64 MB), then
once a second while large requests keep coming, and once after they stop. Without glibc (e.g. musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time

log = logging.getLogger("oodguard.serve.memory")

#: release this many request bytes before trimming
TRIM_AFTER_BYTES = 64 * 1024 * 1024
#: and wait at least this long between two trims
TRIM_MIN_INTERVAL_S = 1.0


def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class MemoryTrimmer:
    """``released(n)`` after a request's ``n`` bytes are no longer needed; trims in the background."""

    def __init__(self, after_bytes: int = TRIM_AFTER_BYTES, min_interval_s: float = TRIM_MIN_INTERVAL_S):
        self.after_bytes, self.min_interval_s = after_bytes, min_interval_s
        self.trims = 0
        self._trim = _malloc_trim()
        self._pending = 0  # released since the last wake-up
        self._released = 0  # released in all (read by the trim thread)
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        if self._trim is None:
            log.info("no malloc_trim in this C library: freed request memory stays with the allocator")

    def released(self, nbytes: int) -> None:
        """Called on the event loop after a request whose body was ``nbytes`` long has finished."""
        if self._trim is None:
            return
        self._released += nbytes
        self._pending += nbytes
        if self._pending >= self.after_bytes:
            self._pending = 0
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="oodguard-malloc-trim", daemon=True)
                self._thread.start()
            self._wake.set()

    def _run(self) -> None:
        """Trim when woken, then once per ``min_interval_s`` while the traffic goes on releasing at least a
        sixteenth of ``after_bytes`` per interval: a burst gets trimmed during it and once after it ends."""
        while True:
            self._wake.wait()
            self._wake.clear()
            seen = -self.after_bytes
            while not self._stop and self._released - seen >= self.after_bytes // 16:
                seen = self._released
                gc.collect()  # a refused request's body can sit in a reference cycle (exception, traceback, frame)
                self._trim(0)
                self.trims += 1
                time.sleep(self.min_interval_s)
            if self._stop:
                return

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)


__all__ = ["MemoryTrimmer", "TRIM_AFTER_BYTES"]

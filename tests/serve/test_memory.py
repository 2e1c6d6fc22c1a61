"""MemoryTrimmer returns freed memory to the OS (glibc), measured in a fresh subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from oodguard.serve.memory import MemoryTrimmer, _malloc_trim

SCRIPT = textwrap.dedent("""
    import time
    from oodguard.serve.memory import MemoryTrimmer

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    start = rss_mb()
    # 2000 blocks of 100 kB (below glibc's mmap threshold: they live in the heap), each followed by a small
    # survivor, as a request's buffers are followed by bookkeeping that outlives them
    blocks, survivors = [], []
    for i in range(2000):
        blocks.append(bytearray(100_000))
        survivors.append(bytearray(64))
    del blocks
    held = rss_mb() - start
    trimmer = MemoryTrimmer(after_bytes=100 * 2**20, min_interval_s=0.05)
    trimmer.released(50 * 2**20)  # below the threshold: nothing yet
    time.sleep(0.3)
    before = trimmer.trims
    trimmer.released(60 * 2**20)
    time.sleep(0.5)
    print(round(held), round(rss_mb() - start), before, trimmer.trims)
    trimmer.close()
""")


@pytest.mark.skipif(_malloc_trim() is None, reason="this C library has no malloc_trim (not glibc)")
def test_freed_heap_memory_goes_back_to_the_os_after_enough_releases():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    held, after, trims_before, trims_after = (int(v) for v in out.stdout.split())
    assert held > 50, out.stdout  # glibc kept much of the freed 200 MB (93 MB here)
    assert trims_before == 0 and trims_after >= 1
    assert after < held / 3, out.stdout  # given back (0 MB left here)


def test_small_releases_never_start_the_trim_thread():
    trimmer = MemoryTrimmer(after_bytes=10**9)
    for _ in range(1000):
        trimmer.released(1024)
    assert trimmer._thread is None and trimmer.trims == 0
    trimmer.close()

"""Cold set-up time: a fresh clone of a git ref, with empty pip and uv caches, timed through the README's commands.

For each ``--ref`` (a commit, branch or tag of this repository), in one run, one after the other:

* **demo**: ``bash scripts/demo.sh`` from the fresh clone, timed from start to its first answer (the line
  ``gateway serving on ...`` that follows the demo client's two calls); then the gateway is stopped.
* **test set-up**: the environments ``bash scripts/test.sh`` builds before it runs pytest, each set-up script
  timed on its own in a second fresh clone (``setup.sh``, ``setup_triton.sh``, ``setup_label_studio.sh``).
  Debian's redis-server and prometheus are installed system-wide once and are not timed.

Every clone gets its own empty ``PIP_CACHE_DIR`` and ``UV_CACHE_DIR``, so nothing a run downloaded helps the next;
the ratio line compares the first ref with each later one. The machine is shared: run the refs in one call.

    python bench/cold_setup.py --ref BEFORE --ref HEAD [--skip-test-setup] [--port 50071]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_SETUP_SCRIPTS = ("scripts/setup.sh", "scripts/setup_triton.sh", "scripts/setup_label_studio.sh")


def fresh_clone(ref: str, parent: Path, name: str) -> tuple[Path, dict[str, str]]:
    """Clone REPO at ``ref`` into ``parent/name``; return it and an environment with empty caches of its own."""
    work = parent / name
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "checkout", "-q", ref], check=True)
    env = dict(os.environ)
    for var in ("VIRTUAL_ENV", "OODGUARD_LABEL_STUDIO_ENV", "OODGUARD_TRITON_ENV"):
        env.pop(var, None)
    for var in ("PIP_CACHE_DIR", "UV_CACHE_DIR"):
        cache = parent / f"{name}-{var.lower()}"
        cache.mkdir()
        env[var] = str(cache)
    return work, env


def time_demo(work: Path, env: dict[str, str], port: int, log: Path, limit_s: float) -> float:
    """Seconds from ``bash scripts/demo.sh`` to its first answer; the gateway is stopped afterwards."""
    env = dict(env, LISTEN=f"127.0.0.1:{port}")
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if line.startswith("gateway serving on"):
                    return time.monotonic() - start
                if time.monotonic() - start > limit_s:
                    break
            raise RuntimeError(f"demo.sh gave no answer (see {log})")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def time_test_setup(work: Path, env: dict[str, str], log: Path) -> dict[str, float]:
    """Seconds each of the test command's environment set-up scripts takes in ``work``."""
    times = {}
    with open(log, "w") as out:
        for script in TEST_SETUP_SCRIPTS:
            start = time.monotonic()
            subprocess.run(["bash", script], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
            times[script] = time.monotonic() - start
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--ref", action="append", required=True,
                        help="git ref to measure (repeat; the first is the baseline of the ratios)")
    parser.add_argument("--skip-test-setup", action="store_true", help="time the demo only (default: both)")
    parser.add_argument("--skip-demo", action="store_true", help="time the test set-up only (default: both)")
    parser.add_argument("--port", type=int, default=50071, help="port the demo gateways listen on (default 50071)")
    parser.add_argument("--limit", type=float, default=900.0, help="seconds a demo may take (default 900)")
    parser.add_argument("--keep", metavar="DIR", help="clone into DIR and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="oodguard-cold-") as tmp:
        parent = Path(args.keep or tmp)
        parent.mkdir(parents=True, exist_ok=True)
        for i, ref in enumerate(args.ref):
            results[ref] = {}
            if not args.skip_demo:
                work, env = fresh_clone(ref, parent, f"demo-{i}")
                seconds = time_demo(work, env, args.port, parent / f"demo-{i}.log", args.limit)
                results[ref]["demo to first answer"] = seconds
                print(f"{ref}: demo to first answer {seconds:.1f} s", flush=True)
            if not args.skip_test_setup:
                work, env = fresh_clone(ref, parent, f"test-{i}")
                times = time_test_setup(work, env, parent / f"test-{i}.log")
                for script, seconds in times.items():
                    results[ref][script] = seconds
                    print(f"{ref}: {script} {seconds:.1f} s", flush=True)
                results[ref]["test set-up, all"] = sum(times.values())

    base = args.ref[0]
    print(f"\n{'measure':<30}" + "".join(f"{ref[:12]:>14}" for ref in args.ref) + "   ratio (first / each)")
    for measure in results[base]:
        row = [results[ref].get(measure) for ref in args.ref]
        ratios = " ".join(f"{row[0] / r:.2f}x" for r in row[1:] if r)
        print(f"{measure:<30}" + "".join(f"{r:>13.1f}s" if r is not None else f"{'-':>14}" for r in row)
              + f"   {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

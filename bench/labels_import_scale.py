#!/usr/bin/env python
"""How `oodguard labels import` scales: a SQLite queue of N records of the digits demo model, a plain CSV
``record_id,label`` naming every one of them, and the real CLI importing it.

Prints one markdown table: rows, the seconds to fill the queue (not part of the import), the import's wall
seconds and rows per second, its peak resident memory (the child process's ``ru_maxrss``), the sizes of the
queue file and the written .npz, and whether the .npz holds every row. Exit status 0 when the import succeeded
with every row, 1 otherwise.

    python bench/labels_import_scale.py [--rows 1000000] [--repository DIR] [--work DIR]

Every label is one of the model's classes except 1 row in 1000, labeled ``new-digit`` (a new class).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="records in the queue and rows in the CSV")
    parser.add_argument("--repository", type=Path, help="model repository holding model 'digits' version 1 "
                        "(default: `oodguard export --demo digits` into the work folder, about 15 s)")
    parser.add_argument("--work", type=Path, help="folder for the queue, CSV and .npz (default: a temp folder, "
                        "removed at the end)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")
    return args


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OODGUARD_")}
    env["OODGUARD_PROGRESS"] = "0"
    return subprocess.run([sys.executable, "-m", "oodguard.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True)


def fill_queue(path: Path, rows: int, repository: Path) -> tuple[list[str], list[str], float]:
    """``rows`` records of model digits version 1 in a new SQLite queue: (their ids, the model's class names,
    seconds)."""
    from oodguard.calibration import Calibration
    from oodguard.queues.base import NewRecord
    from oodguard.queues.sqlite import SQLiteQueue

    calibration = Calibration.load(repository / "digits" / "1" / "calibration.json")
    classes = list(calibration.class_names)
    c, h, w = (calibration.model["preprocessing"][k] for k in ("channels", "height", "width"))
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((64, c, h, w)).astype(np.float32)
    logits = rng.standard_normal((64, len(classes))).astype(np.float32)
    features = rng.standard_normal((64, 32)).astype(np.float32)
    queue = SQLiteQueue(path, max_size=rows + 1, max_bytes=1 << 50)
    ids: list[str] = []
    started = time.perf_counter()
    try:
        for start in range(0, rows, BATCH):
            n = min(BATCH, rows - start)
            records = [NewRecord("digits", 1, inputs[i % 64], logits[i % 64], features[i % 64], {"fused": 0.5},
                                 {"ood": True}, True) for i in range(n)]
            ids += queue.put(records)
            if start // BATCH % 50 == 0:
                log(f"queue: {start + n}/{rows} records")
    finally:
        queue.close()
    return ids, classes, time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="oodguard-import-scale-") as temp:
        work = (args.work or Path(temp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        repository = args.repository.resolve() if args.repository else work / "repository"
        if not args.repository:
            log("exporting the digits demo (oodguard export --demo digits)")
            done = run_cli("export", "--demo", "digits", "--repository", str(repository), cwd=work)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
        queue_path = work / "queue.sqlite"
        queue_path.unlink(missing_ok=True)
        ids, classes, fill_s = fill_queue(queue_path, args.rows, repository)
        labels_path = work / "labels.csv"
        with open(labels_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["record_id", "label"])
            for i, rid in enumerate(ids):
                writer.writerow([rid, "new-digit" if i % 1000 == 999 else classes[i % len(classes)]])
        out = work / "imported.npz"
        log(f"importing {args.rows} rows")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        done = run_cli("labels", "import", str(labels_path), "--queue", f"sqlite:///{queue_path}", "--repository",
                       str(repository), "--out", str(out), cwd=work)
        seconds = time.perf_counter() - started
        peak_mb = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
        imported = 0
        if done.returncode == 0:
            with np.load(out) as data:
                imported = len(data["labels"])
        ok = done.returncode == 0 and imported == args.rows
        print("| rows | fill queue s | import s | rows/s | import peak RSS MB | queue MB | .npz MB | every row |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {args.rows} | {fill_s:.1f} | {seconds:.1f} | {args.rows / seconds:.0f} | {peak_mb:.0f} | "
              f"{queue_path.stat().st_size / 2**20:.0f} | {out.stat().st_size / 2**20 if out.exists() else 0:.0f} | "
              f"{'yes' if ok else 'NO'} |")
        if done.returncode != 0:
            print(f"labels import exited {done.returncode}: {done.stderr.strip()[-1000:]}")
        else:
            print(done.stdout.strip()[-600:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

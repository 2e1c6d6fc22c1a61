"""What one flagged record costs the query queue to write, and what each of its cheaper parts buys.

Measured in one run, the alternatives interleaved round by round (this machine is shared and noisy; every figure
is the median over ``--rounds``, and a ratio is taken within each round before the median):

* **store**: CPU seconds of the writing thread per record (``time.thread_time``: the figure that barely moves
  with other jobs on the machine) and wall time, for ``SQLiteQueue.put_prepared`` of ``--records-per-put``
  records on a queue already holding ``--prefill`` records, with the product's record ids (UUIDv7 in increasing
  order, :func:`oodguard.queues.base.new_record_ids`) against random uuid4 ids (what the ids were before). Each
  alternative writes its own queue file, prefilled with its own kind of ids.
* **pack**: microseconds per packed array, :func:`oodguard.queues.codec.stored_zlib` against
  ``zlib.compress(data, 0)`` (the same bytes), on a 28x28 float32 input.
* **decision JSON**: microseconds per record for one put's decisions, :func:`oodguard.queues.base.decisions_json`
  (a shared thresholds dict encoded once) against ``json.dumps`` of each.

The records are what the digits demo's gateway queues: a [1, 28, 28] float32 input, 10 logits, 84 features and
11 scores with their thresholds and p-values.

    python bench/queue_write_cost.py [--prefill 50000] [--records-per-put 10] [--rounds 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

from oodguard.queues import sqlite as sqlite_queue
from oodguard.queues.base import NewRecord, decisions_json
from oodguard.queues.codec import pack_array, stored_zlib
from oodguard.queues.sqlite import SQLiteQueue

SCORES = ("sisom", "sisome", "energy", "msp", "maxlogit", "knn", "knn_centred", "rel_mahalanobis", "cluster",
          "gradnorm", "fused", "sisom_ml", "sisome_ml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill", type=int, default=50_000, help="records in each queue before the measured puts "
                   "(default 50000: what a minute of all-flagged load leaves)")
    p.add_argument("--records-per-put", type=int, default=10,
                   help="records per put, one micro-batch (default 10: the mean flagged micro-batch at concurrency 64)")
    p.add_argument("--puts", type=int, default=200, help="measured puts per alternative and round (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--out", type=Path, default=None, help="write report.md and report.json here (default: print only)")
    args = p.parse_args(argv)
    for name in ("prefill", "records_per_put", "puts", "rounds"):
        if getattr(args, name) < (0 if name == "prefill" else 1):
            p.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'prefill' else 1}")
    return args


def make_records(count: int, seed: int = 0) -> list[NewRecord]:
    """``count`` records of one request, as the gateway builds them: one thresholds dict shared by all."""
    rng = np.random.default_rng(seed)
    thresholds = {n: float(v) for n, v in zip(SCORES, rng.random(len(SCORES)))}
    metadata = {"source": "bench"}
    records = []
    for i in range(count):
        scores = {n: float(v) for n, v in zip(SCORES, rng.random(len(SCORES)).astype(np.float32))}
        decision = {"ood": True, "reasons": ["threshold"], "driver": "knn", "crossed": ["fused", "knn"],
                    "deciding": ["fused"], "mode": "any", "thresholds": thresholds,
                    "p_values": {n: float(v) for n, v in zip(SCORES, rng.random(len(SCORES)))}, "item": i}
        records.append(NewRecord(model="digits", version=1, input=rng.random((1, 28, 28), dtype=np.float32),
                                 logits=rng.random(10, dtype=np.float32), features=rng.random(84, dtype=np.float32),
                                 scores=scores, decision=decision, flagged=True, request_id=f"bench-{i}",
                                 metadata=metadata))
    return records


def uuid4_ids(count: int, now: float) -> list[str]:
    """The record ids before UUIDv7: random."""
    return [uuid.uuid4().hex for _ in range(count)]


ID_KINDS = {"uuid7": sqlite_queue.new_record_ids, "uuid4": uuid4_ids}


class StoreCell:
    """One queue file written with one kind of ids (prefilled with them too)."""

    def __init__(self, kind: str, path: Path, prefill: int, records: list[NewRecord]):
        self.kind, self.records = kind, records
        self.queue = SQLiteQueue(path, max_size=prefill + 10_000_000)
        with self._ids():
            for start in range(0, prefill, len(records)):
                self.queue.put(records[:min(len(records), prefill - start)])

    @contextlib.contextmanager
    def _ids(self):
        """The queue module's id function swapped for this cell's kind, for this cell's puts only."""
        saved, sqlite_queue.new_record_ids = sqlite_queue.new_record_ids, ID_KINDS[self.kind]
        try:
            yield
        finally:
            sqlite_queue.new_record_ids = saved

    def measure(self, puts: int) -> tuple[float, float]:
        """(thread CPU us per record, wall us per record) over ``puts`` puts (prepared beforehand)."""
        with self._ids():
            prepared = [self.queue.prepare(self.records) for _ in range(puts)]
        cpu, wall = time.thread_time(), time.perf_counter()
        for batch in prepared:
            self.queue.put_prepared(batch)
        n = puts * len(self.records)
        return 1e6 * (time.thread_time() - cpu) / n, 1e6 * (time.perf_counter() - wall) / n


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - start) / calls


def main(argv=None) -> int:
    args = parse_args(argv)
    records = make_records(args.records_per_put)
    data = pack_array(records[0].input)  # the bytes a packed input frames (header + pixels)
    raw = zlib.decompress(data)
    decisions = [r.decision for r in records]
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)", flush=True)
    rows: dict[str, list[float]] = {k: [] for k in ("uuid7_cpu", "uuid4_cpu", "uuid7_wall", "uuid4_wall", "cpu_ratio",
                                                    "wall_ratio", "stored_us", "zlib_us", "pack_ratio", "shared_us",
                                                    "plain_us", "json_ratio")}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"prefilling two queues with {args.prefill} records each", flush=True)
        cells = {kind: StoreCell(kind, Path(tmp) / f"{kind}.sqlite", args.prefill, records) for kind in ID_KINDS}
        for rnd in range(args.rounds):
            order = list(cells) if rnd % 2 == 0 else list(cells)[::-1]
            got = {kind: cells[kind].measure(args.puts) for kind in order}
            for kind, (cpu, wall) in got.items():
                rows[f"{kind}_cpu"].append(cpu)
                rows[f"{kind}_wall"].append(wall)
            rows["cpu_ratio"].append(got["uuid4"][0] / got["uuid7"][0])
            rows["wall_ratio"].append(got["uuid4"][1] / got["uuid7"][1])
            calls = 20 * args.puts
            stored = per_call_us(lambda: stored_zlib(raw), calls)
            deflate = per_call_us(lambda: zlib.compress(raw, 0), calls)
            rows["stored_us"].append(stored)
            rows["zlib_us"].append(deflate)
            rows["pack_ratio"].append(deflate / stored)
            shared = per_call_us(lambda: decisions_json(decisions), args.puts) / len(decisions)
            plain = per_call_us(lambda: [json.dumps(d) for d in decisions], args.puts) / len(decisions)
            rows["shared_us"].append(shared)
            rows["plain_us"].append(plain)
            rows["json_ratio"].append(plain / shared)
            print(f"round {rnd + 1}/{args.rounds}: store CPU us/record uuid7 {got['uuid7'][0]:.1f}, uuid4 "
                  f"{got['uuid4'][0]:.1f}; pack {stored:.2f} vs {deflate:.2f} us; decision JSON {shared:.2f} vs "
                  f"{plain:.2f} us", flush=True)
        for cell in cells.values():
            cell.queue.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    report = {"prefill": args.prefill, "records_per_put": args.records_per_put, "puts": args.puts,
              "rounds": args.rounds, "medians": med, "per_round": rows, "load_average_after": os.getloadavg()[0]}
    lines = [
        f"# Query-queue write cost (SQLite, {args.prefill} records already queued, {args.records_per_put} records "
        f"per put, {args.puts} puts x {args.rounds} interleaved rounds)", "",
        "| part | now | before | before / now |", "|---|---:|---:|---:|",
        f"| store CPU us/record (writing thread): UUIDv7 increasing ids vs uuid4 | {med['uuid7_cpu']:.1f} | "
        f"{med['uuid4_cpu']:.1f} | {med['cpu_ratio']:.2f}x |",
        f"| store wall us/record (fsync included) | {med['uuid7_wall']:.1f} | {med['uuid4_wall']:.1f} | "
        f"{med['wall_ratio']:.2f}x |",
        f"| pack one input (us): stored_zlib vs zlib.compress(level 0) | {med['stored_us']:.2f} | "
        f"{med['zlib_us']:.2f} | {med['pack_ratio']:.2f}x |",
        f"| decision JSON us/record: shared thresholds vs json.dumps each | {med['shared_us']:.2f} | "
        f"{med['plain_us']:.2f} | {med['json_ratio']:.2f}x |", "",
        f"Load average after: {report['load_average_after']:.2f}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

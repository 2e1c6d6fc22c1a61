"""The active-learning loop across versions, through the product's own path, per strategy and seed.

Per (strategy, seed) one real gateway (`oodguard serve`, embedded ONNX Runtime backend, a SQLite queue, a short
poll interval) serves a model repository; every cycle is what a user types (README, "Harvest and relabeling"):

  0. `oodguard train` of the initial model (default LeNet-5 on MNIST digits 0-7) and `oodguard export` (ONNX +
     calibration) into the repository (once per seed; each strategy gets a copy of that repository);
  1. traffic: `oodguard loadgen --json` with the traffic half of the ID test set (MNIST test digits 0-9, labels
     kept, written once as an .npz) and the unknown set as `--ood-data` (Fashion-MNIST test): every request's
     metadata carries set, dataset, indices and true labels of its items;
  2. measurement: classification accuracy of the served version on the held-out evaluation half of the ID test
     set (its ONNX model through oodguard.evaluation.VersionScorer), old classes (0-7) and new ones (8, 9)
     apart; the flagged share per source (old digits, new digits, unknowns) from the gateway's answers: the
     flagged items are the records it queued (their metadata says what each one is), the items sent per source
     are loadgen's draws re-made from its seed and checked against every queued record's metadata (and the
     flagged totals against loadgen's own id/ood counts);
  3. `oodguard harvest --model M --strategy S --budget B`;
  4. an oracle annotator answers in Label Studio's JSON-MIN export format from the true labels in the records'
     metadata: a class the served version knows → its name; a new digit → "new class" named by the digit; an
     unknown-set image → "not relevant";
  5. `oodguard labels import`; 6. `oodguard train --base <previous run> --data <relabeled.npz> --init-from
     <previous checkpoint>`; 7. `oodguard export` into the served repository; the gateway hot-reloads it (the
     benchmark waits until ModelInfo names the new version), and the next cycle's traffic goes to it.

After the last cycle the final version gets traffic and measurement once more (row ``cycles``). Every step's
wall time is recorded. Output in ``--out``: report.json, report.md (one table per strategy, mean ± std over
seeds), loop.png (accuracy on the new classes and flagged share of the new digits per cycle and strategy), and
``work/`` (logs of every command, harvest folders, exports, relabeled sets, queues). Progress on stderr.

A tiny run without MNIST: ``--id-data digits --unknown-data synthetic:uniform``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodguard.clients.gateway_process import GatewayProcess, environment
from oodguard.datasets import data_root
from oodguard.label_ranges import parse_labels

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = data_root()  # $OODGUARD_DATA, else ../shared/data
MNIST_TRAIN = SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz"
MNIST_TEST = SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz"
FASHION_TEST = SHARED_DATA / "fashion_mnist" / "t10k-images-idx3-ubyte.gz"
DEFAULT_STRATEGIES = "random,sisom-diverse,jsosal,lfosa"
NEW_CLASS, NOT_RELEVANT = "new class", "not relevant"  # Label Studio choices (oodguard.harvest.label_studio)
GROUPS = ("old", "new", "unknown")
TARGETS = {
    "new_class_accuracy_min": 0.90,
    "old_class_accuracy_min": 0.985,
    "new_digits_flagged_max": 0.15,
    "unknown_flagged_min": 0.90,
}
STEP_TIMEOUT_S = 3600


def log(message: str) -> None:
    print(f"[loop {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--id-data", default=str(MNIST_TRAIN), help="training data of the initial model (default: MNIST "
                   "train, %(default)s); 'digits' for a tiny run")
    p.add_argument("--classes", default="0-7", help="classes of the initial model (default %(default)s)")
    p.add_argument("--new-classes", help="labels the oracle names as new classes (default: every traffic label not in "
                   "--classes, e.g. 8,9)")
    p.add_argument("--traffic-data", help="labeled ID test set, split in halves: traffic and evaluation (default: "
                   "MNIST test beside an MNIST --id-data, else --id-data itself)")
    p.add_argument("--unknown-data", default=str(FASHION_TEST), help="unknowns sent as loadgen --ood-data, labeled "
                   "'not relevant' (default: Fashion-MNIST test, %(default)s; synthetic:uniform for a tiny run)")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated (default %(default)s)")
    p.add_argument("--cycles", type=int, default=3, help="harvest/relabel/retrain cycles (default %(default)s)")
    p.add_argument("--budget", type=int, default=200, help="labels per cycle (default %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the initial model (default %(default)s)")
    p.add_argument("--retrain-epochs", type=int, help="epochs of each retraining (default: --epochs)")
    p.add_argument("--shift", type=int, help="train --shift (random-shift augmentation, pixels) of every training "
                   "(default: 0 for the 8x8 'digits', 2 otherwise)")
    p.add_argument("--bank-size", type=int, help="export --bank-size (default: the full bank)")
    p.add_argument("--requests", type=int, default=500, help="loadgen requests per cycle (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="images per request (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="loadgen concurrency (default %(default)s)")
    p.add_argument("--ood-fraction", type=float, default=0.2, help="share of requests drawn from --unknown-data "
                   "(default %(default)s)")
    p.add_argument("--min-new-class-labels", type=int, default=2, help="a new class named by fewer labels (so far) "
                   "is held back until more come (training needs 2 bank samples per class; default %(default)s)")
    p.add_argument("--model", default="loop", help="model name in the repository (default %(default)s)")
    p.add_argument("--poll-interval-s", type=float, default=0.5, help="gateway poll interval (default %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "loop", help="output folder "
                   "(default %(default)s)")
    args = p.parse_args(argv)
    args.classes_list = parse_labels(args.classes)
    args.strategy_list = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.retrain_epochs = args.retrain_epochs or args.epochs
    if args.shift is None:  # 2 px on 28x28 digits; the 8x8 'digits' images are too small to move
        args.shift = 0 if args.id_data == "digits" else 2
    if args.cycles < 1 or args.budget < 1 or args.requests < 1 or not args.strategy_list or not args.seed_list:
        p.error("--cycles, --budget, --requests must be >= 1; give at least one strategy and seed")
    if args.traffic_data is None:
        mnist = args.id_data.endswith("train-images-idx3-ubyte.gz") or args.id_data.endswith("train-images-idx3-ubyte")
        args.traffic_data = args.id_data.replace("train-images", "t10k-images") if mnist else args.id_data
    for spec in (args.id_data, args.traffic_data, args.unknown_data):
        if spec != "digits" and not spec.startswith("synthetic:") and not Path(spec.split("#")[0]).exists():
            p.error(f"{spec} does not exist (MNIST / Fashion-MNIST live in {SHARED_DATA}; for a run without "
                    "them: --id-data digits --unknown-data synthetic:uniform)")
    return args


# -- commands ---------------------------------------------------------------------------------------
def _env() -> dict:
    # only the flags count: the OODGUARD_* settings of the calling shell are left out
    return environment(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))


def oodguard(args: list, log_path: Path) -> tuple[float, str]:
    """Run ``python -m oodguard.cli ARGS`` (the user's path); its output goes to ``log_path``. Returns (wall
    seconds, stdout)."""
    command = [sys.executable, "-m", "oodguard.cli", *map(str, args)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=STEP_TIMEOUT_S)
    seconds = time.perf_counter() - start
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(command)}\n# exit {done.returncode} in {seconds:.2f}s\n--- stdout\n{done.stdout}"
                        f"\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        raise RuntimeError(f"oodguard {args[0]} failed (exit {done.returncode}; log {log_path}):\n"
                           f"{(done.stderr or done.stdout)[-3000:]}")
    return seconds, done.stdout


def start_gateway(repository: Path, queue_path: Path, log_path: Path, poll_interval_s: float) -> GatewayProcess:
    """``oodguard serve`` (embedded backend, SQLite queue) on a free loopback port, not yet waited for."""
    return GatewayProcess(repository, ["--backend", "embedded", "--queue-url", f"sqlite:///{queue_path}",
                                       "--poll-interval-s", poll_interval_s, "--drain-timeout-s", "2",
                                       "--log-level", "WARNING"],
                          work=log_path.parent, log_path=log_path, cwd=ROOT, env=_env(),
                          stop_timeout_s=20).start(wait=False)


def wait_version(gw: GatewayProcess, model: str, version: int, timeout_s: float = 180.0) -> float:
    """Wait until the gateway is SERVING and ModelInfo names ``version`` as the latest of ``model``; seconds."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from oodguard.clients.sdk import NO_RETRY, OODGuardClient

    start = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(gw.target) as channel:
        while time.monotonic() < deadline:
            if gw.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {gw.process.returncode}:\n"
                                   f"{gw.log_path.read_text(errors='replace')[-3000:]}")
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    with OODGuardClient(gw.target, timeout=2.0, retry=NO_RETRY) as client:
                        info = client.model_info(model)
                    latest = {m.name: m.latest_version for m in info.models}.get(model)
                    if latest == version:
                        return time.perf_counter() - start
                    last = f"latest version {latest}"
            except Exception as exc:  # not up yet
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
    raise RuntimeError(f"gateway did not serve {model} v{version} within {timeout_s:.0f}s ({last}):\n"
                       f"{gw.log_path.read_text(errors='replace')[-3000:]}")


# -- data -------------------------------------------------------------------------------------------
@dataclass
class Data:
    traffic_npz: Path
    eval_images: np.ndarray
    eval_labels: np.ndarray
    traffic_labels: np.ndarray
    unknown_count: int
    new_classes: list[int]


def prepare_data(args, data_dir: Path) -> Data:
    """The ID test set with labels, split (seeded) in halves: traffic (an .npz loadgen reads) and evaluation
    (never sent, never labeled)."""
    from oodguard.datasets import load_dataset
    from oodguard.evaluation import resolve_dataset
    from oodguard.preprocess import Preprocessing

    data = load_dataset(args.traffic_data)
    if data.labels is None:
        raise ValueError(f"{args.traffic_data}: the traffic set needs labels (the oracle reads them)")
    order = np.random.default_rng(12345).permutation(len(data.images))
    half = len(order) // 2
    traffic, evaluation = order[:half], order[half:]
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "traffic.npz"
    np.savez_compressed(path, images=data.images[traffic], labels=data.labels[traffic].astype(np.int64))
    known = set(args.classes_list)
    new = parse_labels(args.new_classes) if args.new_classes else sorted(set(int(v) for v in data.labels) - known)
    # only its length matters here (loadgen draws indices below it); synthetic sets: any size gives the count
    unknown = resolve_dataset(args.unknown_data, Preprocessing(1, 28, 28, (0.0,), (1.0,)), seed=0)
    log(f"traffic {path}: {half} images of {args.traffic_data}; evaluation: {len(evaluation)}; new classes {new}; "
        f"unknowns {args.unknown_data} ({len(unknown.images)})")
    return Data(path, data.images[evaluation], data.labels[evaluation].astype(np.int64),
                data.labels[traffic].astype(np.int64), len(unknown.images), new)


def loadgen_draws(seed: int, requests: int, ood_fraction: float, batch_size: int, n_id: int, n_ood: int):
    """The (set, indices) of each request `oodguard loadgen` sends with this seed (its draw order: per request
    the set, then the indices); checked against the queued records' metadata before use."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(requests):
        source = "ood" if ood_fraction > 0 and rng.random() < ood_fraction else "id"
        draws.append((source, rng.integers(0, n_id if source == "id" else n_ood, size=batch_size)))
    return draws


def item_truth(record) -> tuple[str, int | None]:
    """(set, true label or None) of a queued record, from its request's metadata."""
    meta = record.metadata
    item = int(record.decision.get("item", 0))
    labels = meta.get("labels", "")
    label = labels.split(",")[item] if labels else ""
    return meta.get("set", ""), (int(label) if label not in ("", None) else None)


def group_of(source: str, label: int | None, known: set[int], new: set[int]) -> str:
    if source == "id" and label in known:
        return "old"
    if source == "id" and label in new:
        return "new"
    return "unknown"


# -- measurement ------------------------------------------------------------------------------------
def accuracy(version_dir: Path, data: Data, known: list[int]) -> dict:
    from oodguard.datasets import Dataset
    from oodguard.evaluation import VersionScorer

    scorer = VersionScorer(version_dir)
    scored = scorer.score("eval", Dataset(data.eval_images, data.eval_labels, None, "eval"))
    names = scorer.calibration.class_names
    predicted = np.asarray([names[i] for i in np.argmax(scored.logits, axis=1)])
    truth = np.asarray([str(v) for v in data.eval_labels])
    correct = predicted == truth
    old = np.isin(data.eval_labels, known)
    new = np.isin(data.eval_labels, data.new_classes)
    per_new = {str(c): float(correct[data.eval_labels == c].mean()) for c in data.new_classes
               if np.any(data.eval_labels == c)}
    thresholds = scorer.calibration.thresholds  # the gateway's default decision: fused, else its fallback sisome
    threshold = thresholds.get("fused") or thresholds.get("sisome")
    band = None if threshold is None else [1 - threshold.achieved_tpr_ci95[1], 1 - threshold.achieved_tpr_ci95[0]]
    return {"old": float(correct[old].mean()) if old.any() else None,
            "new": float(correct[new].mean()) if new.any() else None,
            "per_new_class": per_new, "n_old": int(old.sum()), "n_new": int(new.sum()),
            "class_names": list(names), "false_flag_band": band}


def read_queue(queue_path: Path, read):
    """``read(queue)`` on the gateway's existing SQLite queue (opened read-write, never created), closed after."""
    from oodguard.queues.sqlite import SQLiteQueue

    queue = SQLiteQueue(queue_path, create=False)
    try:
        return read(queue)
    finally:
        queue.close()


def flagged_shares(queue_path: Path, model: str, version: int, loadgen_seed: int, report: dict, data: Data,
                   args) -> dict:
    """Flagged share per group for the traffic of this cycle (request ids ``loadgen-<seed>-<n>``)."""
    prefix = f"loadgen-{loadgen_seed}-"
    records = [r for r in read_queue(queue_path, lambda q: q.select(state="pending", model=model, version=version,
                                                                     flagged=True))
               if r.request_id.startswith(prefix)]
    known, new = set(args.classes_list), set(data.new_classes)
    draws = loadgen_draws(loadgen_seed, args.requests, args.ood_fraction, args.batch_size, len(data.traffic_labels),
                          data.unknown_count)
    mismatches = 0
    flagged = {g: 0 for g in GROUPS}
    for r in records:
        n = int(r.request_id[len(prefix):])
        source, picks = draws[n] if n < len(draws) else ("?", np.array([]))
        if r.metadata.get("set") != source or r.metadata.get("indices") != ",".join(map(str, picks.tolist())):
            mismatches += 1
        s, label = item_truth(r)
        flagged[group_of(s, label, known, new)] += 1
    sent = {g: 0 for g in GROUPS}
    verified = mismatches == 0 and not report["errors"] and report["requests"] == args.requests
    if verified:
        for source, picks in draws:
            for i in picks:
                label = int(data.traffic_labels[i]) if source == "id" else None
                sent[group_of(source, label, known, new)] += 1
    else:  # estimate: loadgen's item counts, the ID part split by the traffic set's label shares
        id_items = report["by_source"].get("id", {}).get("items", 0)
        share_new = float(np.isin(data.traffic_labels, list(new)).mean())
        sent = {"old": round(id_items * (1 - share_new)), "new": round(id_items * share_new),
                "unknown": report["by_source"].get("ood", {}).get("items", 0)}
    answers = {s: v["flagged"] for s, v in report["by_source"].items()}
    consistent = (flagged["old"] + flagged["new"] == answers.get("id", 0)) and flagged["unknown"] == answers.get("ood", 0)
    return {"flagged": flagged, "sent": sent,
            "share": {g: (flagged[g] / sent[g] if sent[g] else None) for g in GROUPS},
            "draws_verified": verified, "draw_mismatches": mismatches, "queue_matches_answers": consistent,
            "answers_by_source": report["by_source"]}


# -- the oracle -------------------------------------------------------------------------------------
def oracle_export(harvest_dir: Path, queue_path: Path, repository: Path, args, data: Data) -> dict:
    """Label Studio JSON-MIN rows for the harvested records, from the true labels in their metadata."""
    labels_doc = json.loads((harvest_dir / "labels.json").read_text())
    known_names = set(labels_doc["known_classes"])
    ids = [json.loads(line)["record_id"] for line in (harvest_dir / "manifest.jsonl").read_text().splitlines()
           if line.strip()]
    records = read_queue(queue_path, lambda q: q.get(ids))
    # the annotator answers with the harvest's choices (labels.json: the classes of the version harvested for)
    rows, counts = [], {"known": 0, "new_class": 0, "not_relevant": 0}
    by_group = {g: 0 for g in GROUPS}
    new = set(data.new_classes)
    for r in records:
        source, label = item_truth(r)
        by_group[group_of(source, label, set(args.classes_list), new)] += 1
        if source == "id" and label is not None and str(label) in known_names:
            rows.append({"record_id": r.id, "label": str(label), "new_class": ""})
            counts["known"] += 1
        elif source == "id" and label in new:
            rows.append({"record_id": r.id, "label": NEW_CLASS, "new_class": str(label)})
            counts["new_class"] += 1
        else:
            rows.append({"record_id": r.id, "label": NOT_RELEVANT, "new_class": ""})
            counts["not_relevant"] += 1
    return {"labels": len(rows), "answers": counts, "harvested_by_group": by_group, "rows": rows,
            "known_classes": sorted(known_names)}


def hold_back(rows: list[dict], minimum: int, known: set[str] = frozenset()) -> tuple[list[dict], list[dict]]:
    """(rows to import now, rows held back): a new class (not among ``known``, the served version's classes)
    named by fewer than ``minimum`` rows waits for more labels (a later cycle's export carries them), since
    training needs at least 2 bank samples of a class."""
    counts: dict[str, int] = {}
    for row in rows:
        if row["label"] == NEW_CLASS and row["new_class"] not in known:
            counts[row["new_class"]] = counts.get(row["new_class"], 0) + 1
    few = {name for name, n in counts.items() if n < minimum}
    return ([r for r in rows if not (r["label"] == NEW_CLASS and r["new_class"] in few)],
            [r for r in rows if r["label"] == NEW_CLASS and r["new_class"] in few])


# -- one (strategy, seed) ---------------------------------------------------------------------------
def initial_model(args, seed: int, work: Path) -> dict:
    run_dir, repo = work / f"seed{seed}" / "run0", work / f"seed{seed}" / "repository-v1"
    if repo.exists():
        shutil.rmtree(repo)
    log(f"seed {seed}: training the initial model on {args.id_data} classes {args.classes}")
    train_s, _ = oodguard(["train", "--backbone", "lenet5", "--data", args.id_data, "--classes", args.classes,
                           "--epochs", args.epochs, "--shift", args.shift, "--seed", seed, "--out", run_dir], run_dir / "train.log")
    log(f"seed {seed}: exporting v1 ({train_s:.1f}s training)")
    export_s, _ = oodguard(["export", "--checkpoint", run_dir / "checkpoint.pt", "--repository", repo, "--model",
                            args.model, "--seed", seed, *(["--bank-size", args.bank_size] if args.bank_size else [])],
                           run_dir / "export.log")
    log(f"seed {seed}: v1 exported in {export_s:.1f}s")
    return {"run": run_dir, "repository": repo, "train_s": train_s, "export_s": export_s}


def run_loop(args, strategy: str, seed: int, initial: dict, data: Data, work: Path) -> dict:
    home = work / f"{strategy}-seed{seed}"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    repository = home / "repository"
    shutil.copytree(initial["repository"], repository)
    queue_path = home / "queue.sqlite"
    start_all = time.perf_counter()
    gw = start_gateway(repository, queue_path, home / "gateway.log", args.poll_interval_s)
    rows = []
    run_dir = initial["run"]
    version = 1
    spent = 0
    held: list[dict] = []
    try:
        # the gateway start: until it serves, then until ModelInfo names v1
        startup_s = gw.wait_ready(timeout_s=180) + wait_version(gw, args.model, version)
        log(f"{strategy} seed {seed}: gateway SERVING v1 on {gw.target} ({startup_s:.1f}s)")
        reload_s = None
        for cycle in range(args.cycles + 1):
            steps: dict[str, float] = {}
            if cycle == 0:
                steps.update(initial_train=initial["train_s"], initial_export=initial["export_s"],
                             gateway_start=startup_s)
            else:
                steps["reload"] = reload_s
            tag = f"{strategy} seed {seed} cycle {cycle} (v{version})"
            loadgen_seed = 1000 * (seed + 1) + cycle
            t, out = oodguard(["loadgen", "--target", gw.target, "--model", args.model, "--data", data.traffic_npz,
                               "--ood-data", args.unknown_data, "--ood-fraction", args.ood_fraction,
                               "--requests", args.requests, "--duration", 3600, "--batch-size", args.batch_size,
                               "--concurrency", args.concurrency, "--seed", loadgen_seed, "--timeout", 30, "--json"],
                              home / f"cycle{cycle}" / "loadgen.log")
            steps["traffic"] = t
            report = json.loads(out)
            t0 = time.perf_counter()
            acc = accuracy(repository / args.model / str(version), data, args.classes_list)
            steps["evaluate"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            flags = flagged_shares(queue_path, args.model, version, loadgen_seed, report, data, args)
            steps["flag_count"] = time.perf_counter() - t0
            share = flags["share"]
            log(f"{tag}: accuracy old {_pct(acc['old'])} new {_pct(acc['new'])}; flagged old {_pct(share['old'])} "
                f"new {_pct(share['new'])} unknown {_pct(share['unknown'])}; traffic {t:.1f}s "
                f"({report['items_per_s']:.0f} items/s, errors {report['errors'] or 'none'})")
            row = {"cycle": cycle, "version": version, "classes": acc["class_names"], "accuracy": acc,
                   "flagged": flags, "traffic": {k: report[k] for k in ("requests", "ok", "errors", "items",
                                                                      "items_per_s", "latency_ms", "versions")},
                   "labels_spent": 0, "labels_spent_total": spent, "steps_s": steps}
            rows.append(row)
            if cycle == args.cycles:
                break
            cdir = home / f"cycle{cycle}"
            harvest_dir = cdir / "harvest"
            t, _ = oodguard(["harvest", "--queue", f"sqlite:///{queue_path}", "--repository", repository, "--model",
                             args.model, "--strategy", strategy, "--budget", args.budget, "--seed", seed, "--out",
                             harvest_dir], cdir / "harvest.log")
            steps["harvest"] = t
            t0 = time.perf_counter()
            oracle = oracle_export(harvest_dir, queue_path, repository, args, data)
            rows_now, held = hold_back(held + oracle.pop("rows"), args.min_new_class_labels,
                                       set(oracle.pop("known_classes")))
            (cdir / "export-min.json").write_text(json.dumps(rows_now, indent=1) + "\n")
            steps["annotate"] = time.perf_counter() - t0
            spent += oracle["labels"]
            oracle.update(imported_rows=len(rows_now), held_back=len(held))
            row.update(labels_spent=oracle["labels"], labels_spent_total=spent, oracle=oracle)
            log(f"{tag}: harvested {oracle['labels']} ({oracle['harvested_by_group']}); oracle {oracle['answers']}"
                + (f"; {len(held)} label(s) of a new class with < {args.min_new_class_labels} held back" if held else ""))
            if not any(r["label"] != NOT_RELEVANT for r in rows_now):
                log(f"{tag}: nothing but 'not relevant' to import: nothing to train on, the model stays")
                row["retrained"] = False
                reload_s = 0.0
                continue
            relabeled = cdir / "relabeled.npz"
            t, out = oodguard(["labels", "import", cdir / "export-min.json", "--queue", f"sqlite:///{queue_path}",
                               "--repository", repository, "--out", relabeled], cdir / "labels-import.log")
            steps["labels_import"] = t
            row["labels_import"] = out.strip()
            next_run = home / f"run{cycle + 1}"
            t, _ = oodguard(["train", "--base", run_dir, "--data", relabeled, "--init-from", run_dir / "checkpoint.pt",
                             "--epochs", args.retrain_epochs, "--shift", args.shift, "--seed", seed,
                             "--out", next_run], cdir / "train.log")
            steps["train"] = t
            t, _ = oodguard(["export", "--checkpoint", next_run / "checkpoint.pt", "--repository", repository,
                             "--model", args.model, "--seed", seed,
                             *(["--bank-size", args.bank_size] if args.bank_size else [])], cdir / "export.log")
            steps["export"] = t
            run_dir, version = next_run, version + 1
            if not (repository / args.model / str(version) / "model.onnx").exists():
                raise RuntimeError(f"export did not write version {version} into {repository / args.model}")
            reload_s = wait_version(gw, args.model, version)
            row["retrained"] = True
            log(f"{tag}: retrained {steps['train']:.1f}s, exported v{version} {steps['export']:.1f}s, "
                f"hot-reloaded in {reload_s:.1f}s")
    finally:
        gw.stop()
    return {"strategy": strategy, "seed": seed, "cycles": rows, "wall_s": time.perf_counter() - start_all,
            "work": str(home)}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


# -- aggregation and report -------------------------------------------------------------------------
def _stat(values) -> dict | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


METRICS = {
    "accuracy_old": lambda r: r["accuracy"]["old"],
    "accuracy_new": lambda r: r["accuracy"]["new"],
    "flagged_old": lambda r: r["flagged"]["share"]["old"],
    "flagged_new": lambda r: r["flagged"]["share"]["new"],
    "flagged_unknown": lambda r: r["flagged"]["share"]["unknown"],
    "labels_spent": lambda r: r["labels_spent"],
    "new_digit_labels": lambda r: (r.get("oracle") or {}).get("harvested_by_group", {}).get("new"),
    "not_relevant_labels": lambda r: (r.get("oracle") or {}).get("answers", {}).get("not_relevant"),
    "classes": lambda r: len(r["classes"]),
}
STEPS = ("traffic", "evaluate", "harvest", "annotate", "labels_import", "train", "export", "reload")


def aggregate(runs: list[dict], cycles: int) -> dict:
    out = {}
    for strategy in dict.fromkeys(r["strategy"] for r in runs):
        mine = [r for r in runs if r["strategy"] == strategy]
        rows = []
        for c in range(cycles + 1):
            at = [r["cycles"][c] for r in mine if len(r["cycles"]) > c]
            row = {"cycle": c, **{k: _stat([f(x) for x in at]) for k, f in METRICS.items()}}
            row["steps_s"] = {s: _stat([x["steps_s"].get(s) for x in at]) for s in STEPS}
            bands = [x["accuracy"]["false_flag_band"] for x in at if x["accuracy"]["false_flag_band"]]
            row["false_flag_band"] = [float(np.mean([b[0] for b in bands])), float(np.mean([b[1] for b in bands]))] \
                if bands else None
            rows.append(row)
        out[strategy] = {"cycles": rows, "wall_s": _stat([r["wall_s"] for r in mine])}
    return out


def targets(summary: dict, runs: list[dict], cycles: int) -> dict:
    def final(strategy, key):
        s = summary[strategy]["cycles"][cycles][key]
        return s["mean"] if s else None

    best = max(summary, key=lambda s: (final(s, "accuracy_new") or 0.0))
    first = summary[best]["cycles"][0]
    last = summary[best]["cycles"][cycles]
    band = last["false_flag_band"]
    checks = {
        "new_class_accuracy": {"value": final(best, "accuracy_new"), "target": f">= {TARGETS['new_class_accuracy_min']}",
                               "met": (final(best, "accuracy_new") or 0) >= TARGETS["new_class_accuracy_min"]},
        "old_class_accuracy": {"value": final(best, "accuracy_old"), "target": f">= {TARGETS['old_class_accuracy_min']}",
                               "met": (final(best, "accuracy_old") or 0) >= TARGETS["old_class_accuracy_min"]},
        "new_digits_flagged": {"value": final(best, "flagged_new"),
                               "start": first["flagged_new"]["mean"] if first["flagged_new"] else None,
                               "target": f"from ~0.75 to <= {TARGETS['new_digits_flagged_max']}",
                               "met": (final(best, "flagged_new") if final(best, "flagged_new") is not None else 1)
                               <= TARGETS["new_digits_flagged_max"]},
        "unknown_flagged": {"value": final(best, "flagged_unknown"), "target": f">= {TARGETS['unknown_flagged_min']}",
                            "met": (final(best, "flagged_unknown") or 0) >= TARGETS["unknown_flagged_min"]},
        "old_false_flag_rate": {"value": final(best, "flagged_old"), "band": band,
                                "target": "within the calibrated band (1 - Clopper-Pearson 95% interval of the "
                                          "achieved TPR of the deciding score, fused or sisome; at most its upper end)",
                                "met": band is not None and final(best, "flagged_old") is not None
                                and final(best, "flagged_old") <= band[1]},
    }
    return {"best_strategy": best, "after_cycles": cycles, "checks": checks,
            "all_met": all(c["met"] for c in checks.values())}


def _fmt(s: dict | None, pct: bool = True, digits: int = 1) -> str:
    if s is None:
        return "-"
    scale = 100 if pct else 1
    text = f"{scale * s['mean']:.{digits}f}"
    return text + (f" ± {scale * s['std']:.{digits}f}" if s["n"] > 1 else "")


def write_markdown(report: dict, path: Path) -> None:
    cfg = report["config"]
    lines = ["# Active-learning loop benchmark", "",
             f"Initial model: LeNet-5 on `{cfg['id_data']}` classes {cfg['classes']}; traffic: half of "
             f"`{cfg['traffic_data']}` (labels in the metadata) + `{cfg['unknown_data']}` as unknowns "
             f"(ood fraction {cfg['ood_fraction']}), {cfg['requests']} requests x {cfg['batch_size']} images per cycle; "
             f"accuracy on the other half (never sent). Budget {cfg['budget']} labels per cycle, {cfg['cycles']} cycles, "
             f"seeds {cfg['seeds']}; epochs {cfg['epochs']} (retraining {cfg['retrain_epochs']}). Values: mean ± std over "
             "seeds, in %; step times in s. Cycle c: version c+1 serving (after c retrainings); its labels are "
             "harvested from its own traffic (and leftovers).", ""]
    t = report["targets"]
    lines += [f"## Targets (best strategy by new-class accuracy after {t['after_cycles']} cycles: "
              f"**{t['best_strategy']}**)", "", "| target | value | met |", "|---|---|---|"]
    for name, c in t["checks"].items():
        value = "-" if c["value"] is None else f"{100 * c['value']:.1f}%"
        extra = ""
        if name == "new_digits_flagged" and c.get("start") is not None:
            extra = f" (cycle 0: {100 * c['start']:.1f}%)"
        if name == "old_false_flag_rate" and c.get("band"):
            extra = f" (band {100 * c['band'][0]:.1f}-{100 * c['band'][1]:.1f}%)"
        lines.append(f"| {name}: {c['target']} | {value}{extra} | {'yes' if c['met'] else 'no'} |")
    lines += ["", f"All met: **{'yes' if t['all_met'] else 'no'}**. Total wall time: {report['wall_s']:.1f} s.", ""]
    for strategy, s in report["summary"].items():
        lines += [f"## {strategy} (wall {_fmt(s['wall_s'], False)} s per seed)", "",
                  "| cycle | classes | acc old | acc new | flagged old | flagged new | flagged unknown | labels | "
                  "new-digit labels | not relevant | traffic s | harvest s | import s | train s | export s | reload s |",
                  "|" + "---|" * 16]
        for r in s["cycles"]:
            st = r["steps_s"]
            lines.append("| " + " | ".join([
                str(r["cycle"]), _fmt(r["classes"], False, 0), _fmt(r["accuracy_old"], digits=2),
                _fmt(r["accuracy_new"]), _fmt(r["flagged_old"]), _fmt(r["flagged_new"]), _fmt(r["flagged_unknown"]),
                _fmt(r["labels_spent"], False, 0), _fmt(r["new_digit_labels"], False, 0),
                _fmt(r["not_relevant_labels"], False, 0),
                *(_fmt(st[k], False) for k in ("traffic", "harvest", "labels_import", "train", "export", "reload"))])
                + " |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> str:
    summary = report["summary"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pillow(summary, path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for strategy, s in summary.items():
        for ax, key in zip(axes, ("accuracy_new", "flagged_new")):
            pts = [(r["cycle"], r[key]) for r in s["cycles"] if r[key]]
            ax.errorbar([c for c, _ in pts], [100 * v["mean"] for _, v in pts], yerr=[100 * v["std"] for _, v in pts],
                        marker="o", capsize=3, label=strategy)
    axes[0].set(title="accuracy on the new classes", xlabel="cycle", ylabel="%", ylim=(-2, 102))
    axes[1].set(title="flagged share of the new digits", xlabel="cycle", ylabel="%", ylim=(-2, 102))
    axes[0].axhline(100 * TARGETS["new_class_accuracy_min"], color="grey", ls=":")
    axes[1].axhline(100 * TARGETS["new_digits_flagged_max"], color="grey", ls=":")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _plot_pillow(summary: dict, path: Path) -> str:
    from PIL import Image, ImageDraw

    w, h, pad = 900, 380, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for panel, (key, title) in enumerate((("accuracy_new", "accuracy on new classes (%)"),
                                          ("flagged_new", "flagged share of new digits (%)"))):
        x0 = panel * w // 2 + pad
        x1, y0, y1 = x0 + w // 2 - 2 * pad, pad, h - pad
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 10), title, fill="black")
        for i, (strategy, s) in enumerate(summary.items()):
            n = max(len(s["cycles"]) - 1, 1)
            pts = [(x0 + (x1 - x0) * r["cycle"] / n, y1 - (y1 - y0) * r[key]["mean"]) for r in s["cycles"] if r[key]]
            color = colors[i % len(colors)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            draw.text((x0 + 5, y0 + 5 + 12 * i), strategy, fill=color)
    img.save(path)
    return "pillow"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = args.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log(f"strategies {args.strategy_list}, seeds {args.seed_list}, {args.cycles} cycles, budget {args.budget}; "
        f"output in {out}")
    data = prepare_data(args, work / "data")
    runs = []
    for seed in args.seed_list:
        initial = initial_model(args, seed, work)
        for strategy in args.strategy_list:
            runs.append(run_loop(args, strategy, seed, initial, data, work))
            log(f"{strategy} seed {seed}: done in {runs[-1]['wall_s']:.1f}s")
    summary = aggregate(runs, args.cycles)
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "new_classes": data.new_classes,
        "summary": summary,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
    }
    report["targets"] = targets(summary, runs, args.cycles)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    write_markdown(report, out / "report.md")
    report["plot"] = plot(report, out / "loop.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    log(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'loop.png'} ({report['plot']}); total "
        f"{report['wall_s']:.1f}s; targets {'met' if report['targets']['all_met'] else 'not all met'}")
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`oodguard harvest`: pick a label budget from the query queue and export it for relabeling.

Steps: choose the model (``--model``, required when several are queued); read its pending records and build
the pool at its newest version (features, logits, scores as queued; records of older versions re-scored or
excluded, :mod:`oodguard.harvest.versions`); with label exports of earlier harvests (``--labels``), the
features of the records labeled so far, known and unknown (:mod:`oodguard.harvest.labeled`); run the strategy; claim the chosen ids atomically (a concurrent harvest that claimed some first makes this one
re-select among what is left, so two harvests never send the same record); write
``<out>/images/<id>.png``, ``<out>/manifest.jsonl`` and ``<out>/tasks.json`` (Label Studio import
format) into a temporary folder renamed into place; then mark the records as sent. On any failure the
claimed records are released back to pending, and nothing half-written is left at ``<out>``.
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from oodguard import progress as bars

from .output_folder import ExportOptions, write_export
from .labeled import LabeledSet, labeled_set
from .strategies import Context, Pool, get_strategy
from .versions import CalibrationCache, PoolPlan, choose_model, plan_pool

MAX_ROUNDS = 5


@dataclass
class HarvestResult:
    out_dir: Path
    ids: list[str]
    pool_size: int
    lost_to_others: int
    plan: PoolPlan


def context_for(plan: PoolPlan, calibrations: CalibrationCache, params: dict, labeled: LabeledSet | None = None) -> Context:
    """Known classes of the pool's version; held-out ID scores (ALOE's threshold, open-quota's gate) from its
    calibration file: the sorted calibration scores *are* held-out labeled ID scores; the labeled known and
    unknown records' features (:mod:`oodguard.harvest.labeled`) when label files were given."""
    calibration = calibrations.get(plan.model, plan.version)
    id_scores = {name: t.sorted_scores for name, t in calibration.thresholds.items()}
    context = Context(known_classes=len(calibration.class_names), id_scores=id_scores, params=params)
    if labeled is not None:
        context.labeled_features, context.labeled_labels = labeled.features, labeled.labels
        context.unknown_features = labeled.unknown_features
    return context


def deduplicate(records: list) -> tuple[list, dict[str, list[str]]]:
    """The records with distinct inputs (the first of each, in queue order) and, per kept record id, the ids of
    the later records whose stored input is byte-identical (SHA-256 of dtype, shape and bytes): repeated traffic
    (a camera resending a frame, a load generator) would otherwise spend the label budget on one image."""
    first: dict[bytes, str] = {}
    distinct, duplicates = [], {}
    for record in bars.track(records, desc="find repeated inputs", unit="rec"):
        data = np.ascontiguousarray(record.input)
        key = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode() + data.tobytes()).digest()
        if key in first:
            duplicates.setdefault(first[key], []).append(record.id)
        else:
            first[key] = record.id
            distinct.append(record)
    return distinct, duplicates


def run_harvest(queue, strategy: str, budget: int, out_dir: Path, repository: Path, seed: int = 0,
                params: dict | None = None, progress: Callable[[str], None] = print, model: str | None = None,
                stale: str = "rescore", dry_run: bool = False, export: ExportOptions = ExportOptions(),
                labels: Sequence[Path] = ()) -> HarvestResult:
    """Harvest ``budget`` records of one model (``model``, or the only one queued) at its newest version in
    ``repository`` (stale records re-scored or excluded, :func:`plan_pool`). ``dry_run`` selects and writes
    the output folder but claims and marks nothing (two strategies can be compared on one pool). ``labels``:
    label exports of earlier harvests; their records (still in the queue) give the strategies the labeled
    known and unknown features (:mod:`oodguard.harvest.labeled`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; give a new --out folder")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    chooser = get_strategy(strategy)
    model = choose_model(queue.summary(), model)
    calibrations = CalibrationCache(repository)
    with bars.phase(f"read the pending records of {model} from the queue"):
        pending = queue.select(state="pending", model=model)
    with bars.phase(f"build the pool of {len(pending)} records (stale ones re-scored at the newest version)"):
        plan = plan_pool(pending, model, repository, calibrations, stale)
    progress(plan.describe())
    if not plan.records:
        raise ValueError(f"no pending record of model {model!r} is left to harvest at version {plan.version} "
                         f"({len(plan.excluded)} excluded: {', '.join(sorted(set(plan.excluded.values())))})")
    labeled = None
    if labels:
        class_names = calibrations.get(model, plan.version).class_names
        with bars.phase(f"read the labeled records of {len(labels)} label file(s)"):
            labeled = labeled_set(queue, labels, model, repository, calibrations, class_names, stale)
        progress(labeled.describe())
    context = context_for(plan, calibrations, params or {}, labeled)
    by_id = {r.id: r for r in plan.records}
    distinct, duplicates = deduplicate(plan.records)
    if duplicates:
        progress(f"{sum(map(len, duplicates.values()))} pending record(s) repeat the input of another: selecting among "
                 f"{len(distinct)} distinct inputs (a selected input takes its repeats along)")
    reasons: dict[str, str] = {}
    claimed: list[str] = []
    repeats: list[str] = []  # claimed with the input they repeat
    lost = 0
    pool = Pool.from_records(distinct)
    try:
        for _ in range(MAX_ROUNDS):
            wanted = budget - len(claimed)
            if wanted <= 0 or len(pool) == 0:
                break
            with bars.phase(f"{strategy}: select {wanted} of {len(pool)}"):
                selection = chooser.select(pool, wanted, seed, context)
            chosen = [str(i) for i in selection.ids(pool)]
            progress(f"{strategy}: selected {len(chosen)} of {len(pool)}" + ("" if dry_run else "; claiming"))
            got = chosen if dry_run else queue.claim_ids(chosen)
            claimed.extend(got)
            along = [d for i in got for d in duplicates.get(i, [])]
            repeats.extend(along if dry_run else queue.claim_ids(along))
            lost += len(chosen) - len(got)
            taken = set(got)
            reasons.update({i: r for i, r in zip(chosen, selection.reasons) if i in taken})
            keep = ~np.isin(pool.ids, chosen)  # claimed now, or by another harvest
            pool = pool.subset(np.flatnonzero(keep))
        extra = {i: {"queued_version": v, "rescored": True} for i, v in plan.rescored.items() if i in by_id}
        taken_repeats = set(repeats)
        for i in claimed:
            same = [d for d in duplicates.get(i, []) if d in taken_repeats]
            if same:
                extra.setdefault(i, {}).update(duplicates=len(same), duplicate_ids=same)
        write_export([by_id[i] for i in claimed], reasons, calibrations, out_dir, strategy, progress, export, extra)
        if not dry_run:
            queue.mark_sent(claimed + repeats)
    except BaseException:
        if not dry_run:
            queue.release(claimed + repeats)
        raise
    progress(f"{'dry run: selected' if dry_run else 'harvested'} {len(claimed)} records into {out_dir}"
             + (f" (and {len(repeats)} repeat(s) of their inputs, marked with them)" if repeats else "")
             + (f" ({lost} lost to a concurrent harvest)" if lost else "")
             + (" (nothing claimed or marked sent)" if dry_run else ""))
    return HarvestResult(out_dir, claimed, len(plan.records), lost, plan)

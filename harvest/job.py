"""`oodguard harvest`: pick a label budget from the query queue and export it for relabeling.

Steps: read the pending records; build the pool (features, logits, scores — no re-inference); run the
strategy; claim the chosen ids atomically (a concurrent harvest that claimed some first makes this one
re-select among what is left, so two harvests never send the same record); write
``<out>/images/<id>.png``, ``<out>/manifest.jsonl`` and ``<out>/tasks.json`` (Label Studio import
format) into a temporary folder renamed into place; then mark the records as sent. On any failure the
claimed records are released back to pending, and nothing half-written is left at ``<out>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .export import write_export
from .strategies import Context, Pool, get_strategy
from .versions import CalibrationCache

MAX_ROUNDS = 5


@dataclass
class HarvestResult:
    out_dir: Path
    ids: list[str]
    pool_size: int
    lost_to_others: int


def context_for(records, calibrations: CalibrationCache, params: dict) -> Context:
    """Known classes from the newest version in the pool; held-out ID scores (ALOE's threshold) from its
    calibration file: the sorted calibration scores *are* held-out labeled ID scores."""
    model, version = max(((r.model, r.version) for r in records), key=lambda mv: mv[1])
    calibration = calibrations.get(model, version)
    id_scores = {name: t.sorted_scores for name, t in calibration.thresholds.items()}
    return Context(known_classes=len(calibration.class_names), id_scores=id_scores, params=params)


def run_harvest(queue, strategy: str, budget: int, out_dir: Path, repository: Path, seed: int = 0,
                params: dict | None = None, progress: Callable[[str], None] = print) -> HarvestResult:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; give a new --out folder")
    chooser = get_strategy(strategy)
    records = queue.select(state="pending")
    progress(f"pool: {len(records)} pending records")
    if not records:
        raise ValueError("the queue holds no pending records to harvest")
    calibrations = CalibrationCache(repository)
    context = context_for(records, calibrations, params or {})
    by_id = {r.id: r for r in records}
    reasons: dict[str, str] = {}
    claimed: list[str] = []
    lost = 0
    pool = Pool.from_records(records)
    try:
        for _ in range(MAX_ROUNDS):
            wanted = budget - len(claimed)
            if wanted <= 0 or len(pool) == 0:
                break
            selection = chooser.select(pool, wanted, seed, context)
            chosen = [str(i) for i in selection.ids(pool)]
            progress(f"{strategy}: selected {len(chosen)} of {len(pool)}; claiming")
            got = queue.claim_ids(chosen)
            claimed.extend(got)
            lost += len(chosen) - len(got)
            reasons.update({i: r for i, r in zip(chosen, selection.reasons) if i in set(got)})
            keep = ~np.isin(pool.ids, chosen)  # claimed now, or by another harvest
            pool = pool.subset(np.flatnonzero(keep))
        write_export([by_id[i] for i in claimed], reasons, calibrations, out_dir, strategy, progress)
        queue.mark_sent(claimed)
    except BaseException:
        queue.release(claimed)
        raise
    progress(f"harvested {len(claimed)} records into {out_dir}" + (f" ({lost} lost to a concurrent harvest)" if lost else ""))
    return HarvestResult(out_dir, claimed, len(records), lost)

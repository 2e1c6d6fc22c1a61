"""The actions of `oodguard queue`, each ``action(queue, args) -> exit code`` (:data:`ACTIONS`), and how they
pick records: the filters of ``args`` (model, version, state, time, ``--score``) or record ids.

``stats``, ``list``, ``show`` and ``sheet`` only read; ``release`` and ``purge`` change records. What they
print is :mod:`.queue_format`'s, the contact sheet's drawing :mod:`.queue_sheet`'s.
"""

from __future__ import annotations

import json

import numpy as np

from oodguard.queues.base import STATES

from .queue_format import (by_state, counts_text, deciding_score, details_text, format_time, iso_time, kind,
                           predicted_class, record_details, record_line, table)
from .queue_sheet import write_sheet


# -- picking records ----------------------------------------------------------------------------------------------
def flagged_by(record, name: str) -> bool:
    """Whether ``name`` flagged the record: one of its decision's deciding scores, and crossed where the
    decision records the crossed scores."""
    decision = record.decision or {}
    crossed = decision.get("crossed")
    return name in (decision.get("deciding") or []) and (crossed is None or name in crossed)


def score_names(record) -> set[str]:
    """The score names a record knows: those it stores a value of and its decision's deciding ones."""
    return set(record.scores) | {str(s) for s in (record.decision or {}).get("deciding") or []}


def has_filter(args) -> bool:
    return any(getattr(args, name, None) is not None for name in ("model", "version", "since", "until", "score"))


def select_records(queue, args, state: str, limit: int | None) -> tuple[list, bool]:
    """The records in ``state`` matching the filters of ``args``, oldest first: at most ``limit`` (None: all),
    and whether more match. A ``--score`` that none of the records the other filters match knows (see
    :func:`score_names`) is a ValueError listing the names they do know: a typo must not read as "no record"."""
    query = dict(state=state, model=args.model, version=args.version, since=args.since, until=args.until)
    if not args.score:
        records = queue.select(limit=None if limit is None else limit + 1, **query)
    else:  # the score filter reads the decision: read oldest first, in growing pages, until enough match
        page = None if limit is None else max(4 * (limit + 1), 256)
        while True:
            batch = queue.select(limit=page, **query)
            records = [r for r in batch if flagged_by(r, args.score)]
            if page is None or len(batch) < page or len(records) > limit:
                break
            page *= 4
        if not records:  # then every record the other filters match was read: `batch` holds them all
            known = set().union(*map(score_names, batch))
            if batch and args.score not in known:
                raise ValueError(f"--score {args.score!r}: no score of that name in the {len(batch)} matching "
                                 f"{state} record(s); their scores: {', '.join(sorted(known))}")
    if limit is None:
        return records, False
    return records[:limit], len(records) > limit


def get_records(queue, ids: list[str]) -> list:
    """The records with these ids, in that order; ValueError naming the ids the queue does not hold."""
    ids = list(dict.fromkeys(ids))
    found = {r.id: r for r in queue.get(ids)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ValueError(f"no record with id {', '.join(repr(i) for i in missing)} in the queue "
                         "(`oodguard queue list` prints the ids)")
    return [found[i] for i in ids]


# -- reading ------------------------------------------------------------------------------------------------------
def stats(queue, args) -> int:
    groups = sorted(queue.summary(), key=lambda g: (g.model, g.version, STATES.index(g.state), not g.flagged))
    s = queue.stats()
    totals = {"records": s.pending + s.claimed + s.sent, "pending": s.pending, "claimed": s.claimed, "sent": s.sent,
              "flagged_unharvested": s.flagged, "sampled_unharvested": s.sampled, "bytes_unharvested": s.bytes,
              "accepted": s.accepted, "rejected": s.rejected, "evicted": s.evicted}
    if args.json:
        print(json.dumps({"groups": [{"model": g.model, "version": g.version, "state": g.state,
                                      "kind": kind(g.flagged), "flagged": g.flagged, "count": g.count,
                                      "oldest": iso_time(g.oldest), "newest": iso_time(g.newest),
                                      "oldest_time": g.oldest, "newest_time": g.newest}
                                     for g in groups], "totals": totals}, indent=1))
        return 0
    if groups:
        print(table(["MODEL", "VERSION", "STATE", "KIND", "RECORDS", "OLDEST (UTC)", "NEWEST (UTC)"],
                    [[g.model, g.version, g.state, kind(g.flagged), g.count, format_time(g.oldest),
                      format_time(g.newest)] for g in groups], right={1, 4}))
    else:
        print("the queue holds no records")
    print(f"total: {totals['records']} record(s): {s.pending} pending, {s.claimed} claimed, {s.sent} sent; "
          f"unharvested: {s.flagged} flagged, {s.sampled} sampled, {s.bytes} bytes stored")
    print(f"counters: {s.accepted} accepted, {s.rejected} rejected (queue full), {s.evicted} evicted (to make room)")
    return 0


def list_records(queue, args) -> int:
    records, more = select_records(queue, args, args.state, args.limit)
    if args.json:
        for r in records:
            score = deciding_score(r, args.score)
            print(json.dumps({"id": r.id, "time": iso_time(r.time), "model": r.model, "version": r.version,
                              "state": r.state, "flagged": r.flagged, "score": score and score[0],
                              "score_value": score and score[1], "predicted_class": predicted_class(r)}))
        return 0
    if not records:
        print(f"no {args.state} record matches")
        return 0
    print(table(["ID", "TIME (UTC)", "MODEL", "VERSION", "STATE", "KIND", "SCORE", "CLASS"],
                [record_line(r, args.score) for r in records], right={3, 7}))
    print(f"{len(records)} record(s)" + (f"; more match (raise --limit {args.limit})" if more else ""))
    return 0


def show(queue, args) -> int:
    if args.ids:
        if has_filter(args):
            raise ValueError("give record ids or filters, not both")
        records = get_records(queue, args.ids)
    else:
        records, _ = select_records(queue, args, args.state, args.limit)
    details = [record_details(r) for r in records]
    if args.json:
        print(json.dumps(details, indent=1))
        return 0
    if not details:
        print(f"no {args.state} record matches")
    for d in details:
        print(details_text(d))
    return 0


def sheet(queue, args) -> int:
    records, _ = select_records(queue, args, args.state, None)
    if not records:
        raise ValueError(f"no {args.state} record matches the filters: nothing to draw")
    total = len(records)
    if total > args.limit:
        keep = np.sort(np.random.default_rng(args.seed).choice(total, args.limit, replace=False))
        records = [records[i] for i in keep]
    write_sheet(records, total, args)
    return 0


# -- changes ------------------------------------------------------------------------------------------------------
def release(queue, args) -> int:
    if args.ids:
        if has_filter(args) or args.all:
            raise ValueError("give record ids or filters (or --all), not both")
        records = get_records(queue, args.ids)
    elif has_filter(args) or args.all:
        records, _ = select_records(queue, args, "claimed", None)
    else:
        raise ValueError("give record ids, a filter (--model, --version, --since, --until, --score) or --all")
    claimed = [r.id for r in records if r.state == "claimed"]
    others = [r.state for r in records if r.state != "claimed"]
    moved = queue.release(claimed) if claimed else 0
    print(f"released {moved} claimed record(s) back to pending"
          + (f"; {len(others)} given record(s) were not claimed ({counts_text(by_state(others))})" if others else "")
          + (f"; {len(claimed) - moved} were no longer claimed" if moved < len(claimed) else ""))
    return 0


def purge(queue, args) -> int:
    if args.model is None and args.version is None and args.state is None and args.older_than is None and not args.all:
        raise ValueError("purge needs a filter (--model, --version, --state, --older-than) or --all")
    states = list(STATES) if args.state is None else [args.state]
    ids: list[str] = []
    if args.older_than is None and not args.yes:  # counting needs no record: the summary has the numbers
        doomed: dict[str, int] = {}
        for g in queue.summary():
            if (g.state in states and (args.model is None or g.model == args.model)
                    and (args.version is None or g.version == args.version)):
                doomed[g.state] = doomed.get(g.state, 0) + g.count
    else:
        records = [r for state in states for r in queue.select(
            limit=None, state=state, model=args.model, version=args.version, until=args.older_than)]
        doomed, ids = by_state(r.state for r in records), [r.id for r in records]
    total = sum(doomed.values())
    if not total:
        print("no record matches: nothing to delete")
        return 0
    if not args.yes:
        print(f"would delete {total} record(s) ({counts_text(doomed)}); nothing deleted: run again with --yes "
              "to delete them")
        return 1
    deleted = queue.delete(ids)
    print(f"deleted {deleted} record(s) ({counts_text(doomed)})"
          + (f"; {total - deleted} were gone already" if deleted < total else ""))
    return 0


#: `oodguard queue ACTION` -> its function
ACTIONS = {"stats": stats, "list": list_records, "show": show, "sheet": sheet, "release": release, "purge": purge}

__all__ = ["ACTIONS", "flagged_by", "score_names", "select_records", "get_records"]

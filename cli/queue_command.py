"""`oodguard queue`: look into the active-learning query queue, and tidy it.

- ``stats``: record counts by model / version / state / flagged-or-sampled with the oldest and newest record
  time of each group (:meth:`QueryQueue.summary`: no array is read), then the queue's totals and counters.
- ``list`` / ``show``: records matching the filters, oldest first (one line each / everything but the arrays).
- ``sheet``: a PNG contact sheet of a random sample of the matching records: each tile is the record's model
  input turned back into pixels with its version's preprocessing (from the model repository's
  calibration.json), captioned with the end of its id (what tells the sheet's records apart; the ids'
  starts are their queueing time) and the deciding score. It shows what was queued, nothing more.
- ``release``: claimed records back to pending (what a killed harvest left claimed).
- ``purge``: delete records (any state); refuses without ``--yes`` and says how many it would delete.

``stats``, ``list``, ``show`` and ``sheet`` only read: they claim nothing and change nothing. Every action
opens an existing queue (``--queue URL``, as ``harvest`` does); none creates one. Times are shown in UTC.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path

#: the record states of :mod:`oodguard.queues.base` (not imported here: building the parser imports no numpy)
STATES = ("pending", "claimed", "sent")

#: contact sheet tiles: the image box (``--tile-size``) plus this margin on each side and the caption below it
TILE_PAD = 4
CAPTION_HEIGHT = 26

DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*(s|sec|m|min|h|d|w)")
UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TIME_HELP = ("an ISO time (2024-05-01T12:00, UTC unless it carries an offset) or a time ago (90s, 30m, 2h, 3d, 1w)")


# -- argument types -------------------------------------------------------------------------------------
def parse_time(text: str) -> float:
    """``--since`` / ``--until`` / ``--older-than``: seconds since the epoch from an ISO time or a time ago."""
    ago = DURATION.fullmatch(text.strip().lower())
    if ago:
        return time.time() - float(ago[1]) * UNITS[ago[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: give {TIME_HELP}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _version(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number") from None


def format_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


# -- the parser ---------------------------------------------------------------------------------------------
def add_queue_command(sub) -> None:
    """``oodguard queue ACTION``: the parsers (``sub``: the subparsers of ``oodguard``)."""
    queue = sub.add_parser(
        "queue", help="look into the query queue (counts, records, a contact sheet); release or purge records",
        description="Look into the active-learning query queue and tidy it. stats, list, show and sheet only read "
        "(they claim and change nothing); release and purge change records. Every action opens an existing queue "
        "and never creates one. Times are UTC.")
    actions = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")

    stats = actions.add_parser(
        "stats", help="record counts by model, version, state and flagged/sampled, oldest and newest time",
        description="Count the queue's records by model, version, state (pending: waiting for a harvest; claimed: "
        "taken by a harvest in progress; sent: harvested) and kind (flagged OOD, or sampled from the unflagged "
        "traffic), with the oldest and newest record time of each group; then the totals and the queue's counters. "
        "Reads no arrays.")
    _add_queue_url(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of the table (default: the table)")

    listing = actions.add_parser(
        "list", help="one line per matching record, oldest first",
        description="One line per matching record, oldest first: id, time, model, version, state, kind, the "
        "deciding score's value and the predicted class index (argmax of the logits).")
    _add_queue_url(listing)
    _add_filters(listing, limit=20, limit_help="at most this many records, the oldest first")
    listing.add_argument("--json", action="store_true", help="print one JSON object per line (default: a table)")

    show = actions.add_parser(
        "show", help="everything about records but their arrays",
        description="Everything stored with each record but the arrays (of those, dtype and shape): scores, "
        "decision, request id, metadata, predicted class. Give record ids, or filters to show the matching records.")
    _add_queue_url(show)
    show.add_argument("ids", nargs="*", metavar="ID", help="record ids, as `oodguard queue list` prints them "
                      "(default: the records matching the filters)")
    _add_filters(show, limit=20, limit_help="without ids: at most this many records, the oldest first")
    show.add_argument("--json", action="store_true", help="print JSON (default: readable text)")

    sheet = actions.add_parser(
        "sheet", help="a PNG contact sheet of a sample of matching records",
        description="Draw a random sample of the matching records as a PNG contact sheet: each tile is the "
        "record's model input turned back into pixels with its version's preprocessing (from calibration.json in "
        "the model repository; normalisation undone, resizing not), captioned with the end of its id (the last 8 "
        "characters, more where 8 do not tell the sheet's records apart) and its deciding score. Writes the tiles' "
        "full ids, in reading order, to FILE.png.json.")
    _add_queue_url(sheet)
    sheet.add_argument("--out", type=Path, required=True, metavar="FILE.png", help="the PNG file to write")
    _add_filters(sheet, limit=64, limit_help="tiles: a random sample of this many matching records (all if fewer)")
    sheet.add_argument("--seed", type=int, default=0, help="seed of the sample (default %(default)s)")
    sheet.add_argument("--repository", type=Path, default=Path("model_repository"),
                       help="model repository holding each version's calibration.json (default %(default)s)")
    sheet.add_argument("--tile-size", type=_positive_int, default=96, metavar="PX",
                       help="each image scaled to fit a PX x PX box, pixels kept sharp (default %(default)s)")
    sheet.add_argument("--columns", type=_positive_int, default=8, help="tiles per row (default %(default)s)")

    release = actions.add_parser(
        "release", help="claimed records back to pending (what a killed harvest left claimed)",
        description="Move claimed records back to pending, so that the next harvest can select them: the records "
        "given by id, or every claimed record matching the filters (--all: every claimed record). A harvest that is "
        "still running loses the records it claimed.")
    _add_queue_url(release)
    release.add_argument("ids", nargs="*", metavar="ID", help="record ids (default: the claimed records matching "
                         "the filters)")
    _add_filters(release, state=False, limit=None)
    release.add_argument("--all", action="store_true", help="without ids or filters: release every claimed record "
                         "(default: refuse)")

    purge = actions.add_parser(
        "purge", help="delete records by model, version, state or age (needs --yes)",
        description="Delete the matching records, whatever their state unless --state says. Without --yes "
        "nothing is deleted: it says how many records it would delete. Deleted records are gone (they count as "
        "neither evicted nor sent).")
    _add_queue_url(purge)
    purge.add_argument("--model", help="only records of this model (default: every model)")
    purge.add_argument("--version", type=_version, metavar="N",
                       help="only records of this model version (default: every version)")
    purge.add_argument("--state", choices=STATES, help="only records in this state (default: every state)")
    purge.add_argument("--older-than", type=parse_time, metavar="TIME",
                       help=f"only records queued before TIME: {TIME_HELP}; 3d = older than three days "
                            "(default: any age)")
    purge.add_argument("--all", action="store_true", help="without another filter: every record (default: refuse)")
    purge.add_argument("--yes", action="store_true", help="really delete (default: only say how many would go)")


def _add_queue_url(parser) -> None:
    parser.add_argument("--queue", required=True, metavar="URL",
                        help="queue URL: sqlite:///RELATIVE/PATH (relative to the working directory), "
                             "sqlite:////ABSOLUTE/PATH or redis://HOST:PORT/DB")


def _add_filters(parser, *, limit: int | None, limit_help: str = "", state: bool = True) -> None:
    parser.add_argument("--model", help="only records of this model (default: every model)")
    parser.add_argument("--version", type=_version, metavar="N",
                        help="only records of this model version (default: every version)")
    if state:
        parser.add_argument("--state", choices=STATES, default="pending",
                            help="only records in this state: pending (waiting for a harvest), claimed (taken by a "
                                 "harvest in progress) or sent (harvested); default %(default)s")
    parser.add_argument("--since", type=parse_time, metavar="TIME",
                        help=f"only records queued at or after TIME: {TIME_HELP} (default: no lower bound)")
    parser.add_argument("--until", type=parse_time, metavar="TIME",
                        help=f"only records queued before TIME: {TIME_HELP} (default: no upper bound)")
    parser.add_argument("--score", metavar="NAME",
                        help="only records flagged by this score: NAME is one of the decision's deciding scores and, "
                             "where the decision lists the crossed scores, crossed its threshold; a NAME that none of "
                             "the records matching the other filters has is an error listing theirs (default: any "
                             "record)")
    if limit is not None:
        parser.add_argument("--limit", type=_positive_int, default=limit, metavar="N",
                            help=f"{limit_help} (default %(default)s)")


# -- running -------------------------------------------------------------------------------------------------
def run_queue(args: argparse.Namespace) -> int:
    from oodguard.queues.factory import open_existing
    from oodguard.queues.base import QueueError

    try:
        with open_existing(args.queue) as queue:
            return ACTIONS[args.queue_command](queue, args)
    except QueueError as exc:
        raise ValueError(str(exc)) from exc


def flagged_by(record, name: str) -> bool:
    """Whether ``name`` flagged the record: one of its decision's deciding scores, and crossed where the
    decision records the crossed scores."""
    decision = record.decision or {}
    crossed = decision.get("crossed")
    return name in (decision.get("deciding") or []) and (crossed is None or name in crossed)


def deciding_score(record, name: str | None = None) -> tuple[str, float] | None:
    """(name, value) of the score that decided: ``name``, else the first deciding score that crossed its
    threshold (the first deciding score if none did); None when the record holds no such score."""
    if name is None:
        decision = record.decision or {}
        deciding = [str(s) for s in decision.get("deciding") or []]
        crossed = decision.get("crossed")
        hits = [s for s in deciding if crossed is None or s in crossed]
        name = next((s for s in hits + deciding if s in record.scores), None)
    if name is None or name not in record.scores:
        return None
    return name, float(record.scores[name])


def _score_text(record, name: str | None = None) -> str:
    score = deciding_score(record, name)
    return "-" if score is None else f"{score[0]}={score[1]:.4g}"


def _predicted(record) -> int | None:
    import numpy as np

    logits = np.asarray(record.logits).reshape(-1)
    return int(np.argmax(logits)) if logits.size else None


def _has_filter(args) -> bool:
    return any(getattr(args, name, None) is not None for name in ("model", "version", "since", "until", "score"))


def score_names(record) -> set[str]:
    """The score names a record knows: those it stores a value of and its decision's deciding ones."""
    return set(record.scores) | {str(s) for s in (record.decision or {}).get("deciding") or []}


def _select(queue, args, state: str, limit: int | None) -> tuple[list, bool]:
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


def _table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(headers))]
    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))

    return "\n".join(line(row).rstrip() for row in cells)


def _kind(flagged: bool) -> str:
    return "flagged" if flagged else "sampled"


def _stats(queue, args) -> int:
    groups = sorted(queue.summary(), key=lambda g: (g.model, g.version, STATES.index(g.state), not g.flagged))
    s = queue.stats()
    totals = {"records": s.pending + s.claimed + s.sent, "pending": s.pending, "claimed": s.claimed, "sent": s.sent,
              "flagged_unharvested": s.flagged, "sampled_unharvested": s.sampled, "bytes_unharvested": s.bytes,
              "accepted": s.accepted, "rejected": s.rejected, "evicted": s.evicted}
    if args.json:
        print(json.dumps({"groups": [{"model": g.model, "version": g.version, "state": g.state,
                                      "kind": _kind(g.flagged), "flagged": g.flagged, "count": g.count,
                                      "oldest": iso_time(g.oldest), "newest": iso_time(g.newest),
                                      "oldest_time": g.oldest, "newest_time": g.newest}
                                     for g in groups], "totals": totals}, indent=1))
        return 0
    if groups:
        print(_table(["MODEL", "VERSION", "STATE", "KIND", "RECORDS", "OLDEST (UTC)", "NEWEST (UTC)"],
                     [[g.model, g.version, g.state, _kind(g.flagged), g.count, format_time(g.oldest),
                       format_time(g.newest)] for g in groups], right={1, 4}))
    else:
        print("the queue holds no records")
    print(f"total: {totals['records']} record(s): {s.pending} pending, {s.claimed} claimed, {s.sent} sent; "
          f"unharvested: {s.flagged} flagged, {s.sampled} sampled, {s.bytes} bytes stored")
    print(f"counters: {s.accepted} accepted, {s.rejected} rejected (queue full), {s.evicted} evicted (to make room)")
    return 0


def _line(record, score: str | None) -> list:
    predicted = _predicted(record)
    return [record.id, format_time(record.time), record.model, record.version, record.state, _kind(record.flagged),
            _score_text(record, score), "-" if predicted is None else predicted]


def _list(queue, args) -> int:
    records, more = _select(queue, args, args.state, args.limit)
    if args.json:
        for r in records:
            score = deciding_score(r, args.score)
            print(json.dumps({"id": r.id, "time": iso_time(r.time), "model": r.model, "version": r.version,
                              "state": r.state, "flagged": r.flagged, "score": score and score[0],
                              "score_value": score and score[1], "predicted_class": _predicted(r)}))
        return 0
    if not records:
        print(f"no {args.state} record matches")
        return 0
    print(_table(["ID", "TIME (UTC)", "MODEL", "VERSION", "STATE", "KIND", "SCORE", "CLASS"],
                 [_line(r, args.score) for r in records], right={3, 7}))
    print(f"{len(records)} record(s)" + (f"; more match (raise --limit {args.limit})" if more else ""))
    return 0


def _get(queue, ids: list[str]) -> list:
    """The records with these ids, in that order; ValueError naming the ids the queue does not hold."""
    ids = list(dict.fromkeys(ids))
    found = {r.id: r for r in queue.get(ids)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ValueError(f"no record with id {', '.join(repr(i) for i in missing)} in the queue "
                         "(`oodguard queue list` prints the ids)")
    return [found[i] for i in ids]


def record_details(r) -> dict:
    """Everything about a record but its arrays (dtype and shape of those)."""
    import numpy as np

    return {"id": r.id, "model": r.model, "version": r.version, "state": r.state, "flagged": r.flagged,
            "kind": _kind(r.flagged), "seq": r.seq, "time": iso_time(r.time), "time_s": r.time,
            "request_id": r.request_id, "metadata": r.metadata, "predicted_class": _predicted(r), "scores": r.scores,
            "decision": r.decision,
            "arrays": {name: {"dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a))}
                       for name, a in (("input", r.input), ("logits", r.logits), ("features", r.features))}}


def _show(queue, args) -> int:
    if args.ids:
        if _has_filter(args):
            raise ValueError("give record ids or filters, not both")
        records = _get(queue, args.ids)
    else:
        records, _ = _select(queue, args, args.state, args.limit)
    details = [record_details(r) for r in records]
    if args.json:
        print(json.dumps(details, indent=1))
        return 0
    if not details:
        print(f"no {args.state} record matches")
    for d in details:
        arrays = ", ".join(f"{name} {a['dtype']} {tuple(a['shape'])}" for name, a in d["arrays"].items())
        print(f"record {d['id']}\n"
              f"  model {d['model']}, version {d['version']}, state {d['state']}, {d['kind']}, seq {d['seq']}\n"
              f"  time {format_time(d['time_s'])} UTC\n"
              f"  request id {d['request_id'] or '-'}\n"
              f"  metadata {json.dumps(d['metadata'])}\n"
              f"  predicted class {'-' if d['predicted_class'] is None else d['predicted_class']}\n"
              f"  scores {', '.join(f'{k}={v:.6g}' for k, v in d['scores'].items()) or '-'}\n"
              f"  decision {json.dumps(d['decision'])}\n"
              f"  arrays {arrays}")
    return 0


# -- the contact sheet -------------------------------------------------------------------------------------------
def tile_shape(tile_size: int) -> tuple[int, int]:
    """(width, height) of one contact sheet tile for ``--tile-size``: the image box, a margin, the caption."""
    return tile_size + 2 * TILE_PAD, tile_size + 2 * TILE_PAD + CAPTION_HEIGHT


def short_ids(ids: list[str], least: int = 8) -> list[str]:
    """Captions for these record ids: the shortest common length of their ends, at least ``least`` characters,
    that tells all of them apart. Ends, not starts: ids are UUIDv7 (:func:`oodguard.queues.base.new_record_ids`),
    whose first 12 hex digits are the millisecond they were queued and the next 4 its fraction, so the records of
    one request share their first 16 digits; the last 15 digits are random (and uuid4 ids, random throughout,
    differ at their ends too)."""
    longest = max((len(i) for i in ids), default=0)
    length = min(least, longest)
    while len({i[-length:] for i in ids}) < len(set(ids)) and length < longest:
        length += 1
    return [i[-length:] for i in ids]


def _tile(pixels, caption: list[str], tile_size: int, font):
    from PIL import Image, ImageDraw

    image = Image.fromarray(pixels).convert("RGB")
    scale = tile_size / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)
    tile = Image.new("RGB", tile_shape(tile_size), (255, 255, 255))
    tile.paste(image, (TILE_PAD + (tile_size - size[0]) // 2, TILE_PAD + (tile_size - size[1]) // 2))
    draw = ImageDraw.Draw(tile)
    for n, line in enumerate(caption):  # drawn on the tile: a caption too long for it is cut at its edge
        draw.text((TILE_PAD, TILE_PAD + tile_size + 2 + n * (CAPTION_HEIGHT // 2)), line, fill=(0, 0, 0), font=font)
    return tile


def _sheet(queue, args) -> int:
    import numpy as np
    from PIL import Image, ImageFont

    from oodguard.harvest.versions import CalibrationCache
    from oodguard.preprocess import Preprocessing

    records, _ = _select(queue, args, args.state, None)
    if not records:
        raise ValueError(f"no {args.state} record matches the filters: nothing to draw")
    total = len(records)
    if total > args.limit:
        keep = np.sort(np.random.default_rng(args.seed).choice(total, args.limit, replace=False))
        records = [records[i] for i in keep]
    calibrations = CalibrationCache(args.repository)
    missing = sorted({(r.model, r.version) for r in records if not calibrations.has(r.model, r.version)})
    if missing:
        raise ValueError(f"the repository {args.repository} holds no calibration.json for "
                         f"{', '.join(f'{m} version {v}' for m, v in missing)} (the preprocessing that turns their "
                         "inputs back into pixels); give --repository, or leave them out with --model / --version")
    preprocessing = {}
    font = ImageFont.load_default()
    tiles = []
    captions = short_ids([r.id for r in records])
    for r, caption in zip(records, captions):
        key = (r.model, r.version)
        if key not in preprocessing:
            preprocessing[key] = Preprocessing.from_dict(calibrations.get(*key).model["preprocessing"])
        try:
            pixels = preprocessing[key].invert(r.input)
        except ValueError as exc:
            raise ValueError(f"record {r.id}: its input {tuple(np.shape(r.input))} does not fit the preprocessing "
                             f"of {r.model} version {r.version}: {exc}") from exc
        tiles.append(_tile(pixels, [caption, _score_text(r, args.score)], args.tile_size, font))
    columns = min(args.columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    width, height = tile_shape(args.tile_size)
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for n, tile in enumerate(tiles):
        sheet.paste(tile, ((n % columns) * width, (n // columns) * height))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, format="PNG")
    legend = args.out.with_name(args.out.name + ".json")  # captions show the ends of the ids: the full ones
    legend.write_text(json.dumps([{"tile": n, "id": r.id, "caption": caption, "model": r.model, "version": r.version,
                                   "score": _score_text(r, args.score)}
                                  for n, (r, caption) in enumerate(zip(records, captions), 1)], indent=1))
    print(f"wrote {args.out}: {len(tiles)} tile(s), {columns} x {rows} ({sheet.width}x{sheet.height} px), "
          f"a sample of {total} matching {args.state} record(s) (seed {args.seed}); tile ids in {legend}")
    return 0


# -- changes ------------------------------------------------------------------------------------------------------
def _counts(by_state: dict[str, int]) -> str:
    return ", ".join(f"{by_state[s]} {s}" for s in STATES if by_state.get(s))


def _by_state(states) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in states:
        out[state] = out.get(state, 0) + 1
    return out


def _release(queue, args) -> int:
    if args.ids:
        if _has_filter(args) or args.all:
            raise ValueError("give record ids or filters (or --all), not both")
        records = _get(queue, args.ids)
    elif _has_filter(args) or args.all:
        records, _ = _select(queue, args, "claimed", None)
    else:
        raise ValueError("give record ids, a filter (--model, --version, --since, --until, --score) or --all")
    claimed = [r.id for r in records if r.state == "claimed"]
    others = [r.state for r in records if r.state != "claimed"]
    moved = queue.release(claimed) if claimed else 0
    print(f"released {moved} claimed record(s) back to pending"
          + (f"; {len(others)} given record(s) were not claimed ({_counts(_by_state(others))})" if others else "")
          + (f"; {len(claimed) - moved} were no longer claimed" if moved < len(claimed) else ""))
    return 0


def _purge(queue, args) -> int:
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
        doomed, ids = _by_state(r.state for r in records), [r.id for r in records]
    total = sum(doomed.values())
    if not total:
        print("no record matches: nothing to delete")
        return 0
    if not args.yes:
        print(f"would delete {total} record(s) ({_counts(doomed)}); nothing deleted: run again with --yes "
              "to delete them")
        return 1
    deleted = queue.delete(ids)
    print(f"deleted {deleted} record(s) ({_counts(doomed)})"
          + (f"; {total - deleted} were gone already" if deleted < total else ""))
    return 0


ACTIONS = {"stats": _stats, "list": _list, "show": _show, "sheet": _sheet, "release": _release, "purge": _purge}

__all__ = ["add_queue_command", "run_queue", "parse_time", "tile_shape", "flagged_by", "deciding_score", "STATES"]

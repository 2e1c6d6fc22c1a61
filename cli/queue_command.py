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

This module holds the parser (building it imports no numpy) and the dispatch; the actions are
:mod:`.queue_actions`, what they print :mod:`.queue_format`, the contact sheet's drawing :mod:`.queue_sheet`.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import datetime, timezone
from pathlib import Path

#: the record states of :mod:`oodguard.queues.base` (not imported here: building the parser imports no numpy)
STATES = ("pending", "claimed", "sent")

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
    from oodguard.queues.base import QueueError
    from oodguard.queues.factory import open_existing

    from .queue_actions import ACTIONS

    try:
        with open_existing(args.queue) as queue:
            return ACTIONS[args.queue_command](queue, args)
    except QueueError as exc:
        raise ValueError(str(exc)) from exc


__all__ = ["add_queue_command", "run_queue", "parse_time", "STATES"]

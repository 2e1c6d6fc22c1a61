"""`oodguard queue`: stats / list / show / sheet read without claiming; release and purge change records.

The queue: 15 digits records of the exported demo model (tests/harvest/queue_fixture.py, queued now) and three
of a model "other" the repository does not hold (versions 3 and 4, queued days and an hour ago)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pytest
from harvest.queue_fixture import filled_queue
from PIL import Image

from oodguard.cli import build_parser, main
from oodguard.preprocess import Preprocessing
from oodguard.cli.queue_command import STATES, parse_time
from oodguard.cli.queue_sheet import TILE_PAD, short_ids, tile_shape
from oodguard.queues.base import STATES as QUEUE_STATES
from oodguard.queues.base import NewRecord, new_record_ids

DAY = 86400.0


def other(version: int, flagged: bool, t: float, crossed: list[str], logits=(0.0, 2.0, 1.0)) -> NewRecord:
    return NewRecord(model="other", version=version, input=np.zeros((3, 4, 4), np.float32),
                     logits=np.asarray(logits, np.float32), features=np.ones(5, np.float32),
                     scores={"energy": 7.5, "sisome": 0.25}, flagged=flagged, time=t,
                     decision={"ood": bool(crossed), "crossed": crossed, "deciding": ["energy", "sisome"]},
                     request_id=f"other-{version}", metadata={"camera": "2"})


@pytest.fixture
def filled(digits_export, tmp_path):
    """(queue URL, the open queue, record ids by name, repository, digits version)."""
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=5)
    now = time.time()
    o1, o2, o3 = queue.put([other(3, True, now - 5 * DAY, ["energy"]), other(3, False, now - 5 * DAY + 60, []),
                            other(4, True, now - 3600, ["sisome"], logits=(3.0, 0.0, 1.0))])
    ids = {"o1": o1, "o2": o2, "o3": o3, "digits": [r.id for r in queue.select(model="digits")]}
    yield f"sqlite:///{tmp_path / 'q.sqlite'}", queue, ids, repository, digits_export[1].version
    queue.close()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["queue", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def stats_json(capsys, url) -> dict:
    code, out, _ = run(capsys, "stats", "--queue", url, "--json")
    assert code == 0
    return json.loads(out)


def table_rows(out: str) -> list[list[str]]:
    """The rows of a printed table (header and footer lines left out)."""
    lines = out.splitlines()
    return [line.split() for line in lines[1:] if line and not line.startswith(("total:", "counters:"))
            and "record(s)" not in line]


def test_the_states_are_the_queue_s():
    assert STATES == QUEUE_STATES


def test_stats_counts_groups_with_times(filled, capsys):
    url, queue, ids, _, v = filled
    queue.claim_ids(ids["digits"][:2])
    queue.mark_sent(ids["digits"][:1])
    code, out, _ = run(capsys, "stats", "--queue", url)
    assert code == 0
    rows = {tuple(r[:4]): int(r[4]) for r in table_rows(out)}
    assert rows == {("digits", str(v), "pending", "flagged"): 13, ("digits", str(v), "claimed", "flagged"): 1,
                    ("digits", str(v), "sent", "flagged"): 1, ("other", "3", "pending", "flagged"): 1,
                    ("other", "3", "pending", "sampled"): 1, ("other", "4", "pending", "flagged"): 1}
    assert list(rows)[:3] == [("digits", str(v), s, "flagged") for s in ("pending", "claimed", "sent")]
    assert "total: 18 record(s): 16 pending, 1 claimed, 1 sent; unharvested: 16 flagged, 1 sampled" in out
    assert "counters: 18 accepted, 0 rejected (queue full), 0 evicted (to make room)" in out
    data = stats_json(capsys, url)
    groups = {(g["model"], g["version"], g["state"], g["kind"]): g for g in data["groups"]}
    o3 = queue.get([ids["o3"]])[0]
    assert groups[("other", 4, "pending", "flagged")]["count"] == 1
    assert groups[("other", 4, "pending", "flagged")]["oldest_time"] == o3.time
    assert groups[("other", 3, "pending", "flagged")]["newest"].endswith("Z")
    assert (data["totals"]["records"], data["totals"]["pending"], data["totals"]["sent"]) == (18, 16, 1)


def test_list_filters_and_prints_one_line_per_record(filled, capsys):
    url, queue, ids, _, v = filled
    code, out, _ = run(capsys, "list", "--queue", url, "--model", "other")
    assert code == 0
    rows = table_rows(out)
    assert [r[0] for r in rows] == [ids["o1"], ids["o2"], ids["o3"]]
    # id, date, time, model, version, state, kind, deciding score, predicted class
    assert rows[0][3:] == ["other", "3", "pending", "flagged", "energy=7.5", "1"]
    assert rows[1][3:] == ["other", "3", "pending", "sampled", "energy=7.5", "1"]  # none crossed: the first deciding
    assert rows[2][3:] == ["other", "4", "pending", "flagged", "sisome=0.25", "0"]
    assert out.splitlines()[0].split() == ["ID", "TIME", "(UTC)", "MODEL", "VERSION", "STATE", "KIND", "SCORE", "CLASS"]
    assert out.splitlines()[-1] == "3 record(s)"

    def listed(*flags) -> list[str]:
        code, out, _ = run(capsys, "list", "--queue", url, *flags)
        assert code == 0
        return [r[0] for r in table_rows(out)]

    assert listed("--model", "other", "--score", "energy") == [ids["o1"]]
    assert listed("--model", "other", "--score", "sisome") == [ids["o3"]]
    assert listed("--model", "other", "--version", "4") == [ids["o3"]]
    assert listed("--since", "2d") == ids["digits"] + [ids["o3"]]  # oldest first by insertion
    assert listed("--until", "2d") == [ids["o1"], ids["o2"]]
    assert listed("--model", "other", "--since", "5d", "--until", "2h") == [ids["o2"]]  # o1 at 5 days exactly
    assert listed("--model", "digits", "--score", "sisome", "--limit", "3") == ids["digits"][:3]
    assert listed("--model", "digits", "--version", str(v + 1)) == []
    code, out, _ = run(capsys, "list", "--queue", url, "--limit", "4")
    assert len(table_rows(out)) == 4 and out.splitlines()[-1] == "4 record(s); more match (raise --limit 4)"
    code, out, _ = run(capsys, "list", "--queue", url, "--model", "digits", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["id"] for d in lines] == ids["digits"] and {d["score"] for d in lines} == {"sisome"}
    records = {r.id: r for r in queue.get(ids["digits"])}
    assert all(d["score_value"] == records[d["id"]].scores["sisome"] for d in lines)
    assert all(d["predicted_class"] == int(np.argmax(records[d["id"]].logits)) for d in lines)
    queue.claim_ids(ids["digits"][:2])
    assert listed("--state", "claimed") == ids["digits"][:2]
    assert listed("--state", "sent") == []


def test_show_prints_everything_but_the_arrays(filled, capsys):
    url, queue, ids, _, v = filled
    code, out, _ = run(capsys, "show", "--queue", url, ids["o1"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"record {ids['o1']}"
    assert lines[1].startswith("  model other, version 3, state pending, flagged, seq 16")
    assert "  request id other-3" in lines and '  metadata {"camera": "2"}' in lines
    assert "  predicted class 1" in lines and "  scores energy=7.5, sisome=0.25" in lines
    assert '"crossed": ["energy"]' in out
    assert "  arrays input float32 (3, 4, 4), logits float32 (3,), features float32 (5,)" in lines
    code, out, _ = run(capsys, "show", "--queue", url, "--json", ids["o3"], ids["digits"][0])
    shown = json.loads(out)
    assert [d["id"] for d in shown] == [ids["o3"], ids["digits"][0]]
    assert shown[1]["arrays"]["input"] == {"dtype": "float32", "shape": [1, 28, 28]}
    assert shown[1]["decision"]["deciding"] == ["sisome"] and shown[1]["metadata"]["kind"] == "known"
    code, out, _ = run(capsys, "show", "--queue", url, "--model", "other", "--limit", "2")
    assert out.count("\nrecord ") + out.startswith("record ") == 2


def test_reading_claims_and_changes_nothing(filled, capsys, tmp_path):
    url, queue, ids, repository, v = filled
    before = stats_json(capsys, url)
    assert run(capsys, "list", "--queue", url)[0] == 0
    assert run(capsys, "show", "--queue", url, *ids["digits"][:3])[0] == 0
    assert run(capsys, "sheet", "--queue", url, "--model", "digits", "--out", str(tmp_path / "s.png"),
               "--repository", str(repository))[0] == 0
    assert stats_json(capsys, url) == before
    assert queue.stats().claimed == 0 and queue.stats().pending == 18


def test_sheet_draws_the_inputs_undone_with_captions(filled, capsys, tmp_path):
    url, queue, ids, repository, v = filled
    out_png = tmp_path / "sheets" / "digits.png"
    code, out, _ = run(capsys, "sheet", "--queue", url, "--model", "digits", "--limit", "6", "--columns", "4",
                       "--seed", "3", "--out", str(out_png), "--repository", str(repository))
    assert code == 0
    width, height = tile_shape(96)
    image = Image.open(out_png)
    assert image.format == "PNG" and image.size == (4 * width, 2 * height)  # 6 tiles: 4 + 2
    assert out.strip() == (f"wrote {out_png}: 6 tile(s), 4 x 2 ({4 * width}x{2 * height} px), a sample of 15 "
                           f"matching pending record(s) (seed 3); tile ids in {out_png}.json")
    legend = json.loads((tmp_path / "sheets" / "digits.png.json").read_text())
    assert [t["tile"] for t in legend] == [1, 2, 3, 4, 5, 6]
    shown = [t["id"] for t in legend]
    assert len(shown) == len(set(shown)) == 6 and set(shown) <= set(ids["digits"])
    # tile 1: the record's input turned back into pixels (28x28, scaled x96/28 with sharp pixels) and nothing else
    record = queue.get(shown[:1])[0]
    calibration = digits_export_calibration(repository, v)
    pixels = Preprocessing.from_dict(calibration.model["preprocessing"]).invert(record.input)
    expected = np.asarray(Image.fromarray(pixels).convert("RGB").resize((96, 96), Image.Resampling.NEAREST))
    tile = np.asarray(image.convert("RGB"))[TILE_PAD:TILE_PAD + 96, TILE_PAD:TILE_PAD + 96]
    np.testing.assert_array_equal(tile, expected)
    caption = np.asarray(image.convert("L"))[TILE_PAD + 96:height, :width]
    assert caption.min() < 128  # some text was drawn below the image
    # the same seed draws the same sample; a limit above the matches draws them all
    run(capsys, "sheet", "--queue", url, "--model", "digits", "--limit", "6", "--columns", "4", "--seed", "3",
        "--out", str(tmp_path / "again.png"), "--repository", str(repository))
    assert (tmp_path / "again.png").read_bytes() == out_png.read_bytes()
    code, out, _ = run(capsys, "sheet", "--queue", url, "--model", "digits", "--tile-size", "28", "--out",
                       str(tmp_path / "all.png"), "--repository", str(repository))
    width, height = tile_shape(28)
    assert Image.open(tmp_path / "all.png").size == (8 * width, 2 * height) and "15 tile(s), 8 x 2" in out


def test_sheet_captions_tell_the_records_of_one_put_apart(filled, capsys, tmp_path):
    """The digits records were queued five per put: their UUIDv7 ids share the first 16 hex digits (the time), so
    captions are the ids' ends, pairwise distinct and short."""
    url, queue, ids, repository, v = filled
    assert len({i[:16] for i in ids["digits"]}) == 3  # three puts
    code, _, _ = run(capsys, "sheet", "--queue", url, "--model", "digits", "--out", str(tmp_path / "s.png"),
                     "--repository", str(repository))
    legend = json.loads((tmp_path / "s.png.json").read_text())
    captions = [t["caption"] for t in legend]
    assert code == 0 and len(legend) == 15
    assert len(set(captions)) == 15 and all(8 <= len(c) <= 12 for c in captions)
    assert all(t["id"].endswith(t["caption"]) for t in legend)


def test_short_ids_are_the_shortest_distinct_ends():
    ids = new_record_ids(64, time.time())
    assert len({i[:16] for i in ids}) == 1  # one put: the first 16 hex digits alike, the old captions all equal
    captions = short_ids(ids)
    assert len(set(captions)) == 64 and all(i.endswith(c) for i, c in zip(ids, captions))
    assert all(8 <= len(c) <= 12 for c in captions) and len({len(c) for c in captions}) == 1
    # ends alike in their last 8 and 9 characters: 10 tell them apart
    assert short_ids(["0" * 22 + "1a2b3c4d5e", "0" * 22 + "2a2b3c4d5e", "f" * 32]) == [
        "1a2b3c4d5e", "2a2b3c4d5e", "f" * 10]
    assert short_ids(["abc", "xyz"]) == ["abc", "xyz"] and short_ids([]) == []


def test_an_unknown_score_is_an_error_listing_the_records_scores(filled, capsys, tmp_path):
    url, queue, ids, repository, v = filled
    code, out, err = run(capsys, "list", "--queue", url, "--model", "other", "--score", "bogus")
    assert code == 2 and out == ""
    assert err == ("oodguard queue: error: --score 'bogus': no score of that name in the 3 matching pending "
                   "record(s); their scores: energy, sisome\n")
    digits_scores = sorted(queue.get(ids["digits"][:1])[0].scores)
    assert "fused" in digits_scores and len(digits_scores) >= 8
    code, _, err = run(capsys, "list", "--queue", url, "--model", "digits", "--score", "sisom_typo", "--json")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.endswith(f"their scores: {', '.join(digits_scores)}\n")
    for action in (["sheet", "--out", str(tmp_path / "s.png"), "--repository", str(repository)], ["release"]):
        if action == ["release"]:
            queue.claim_ids(ids["digits"][:2])
        code, _, err = run(capsys, *action, "--queue", url, "--model", "digits", "--score", "bogus")
        assert code == 2 and "--score 'bogus': no score of that name" in err
    assert not (tmp_path / "s.png").exists() and queue.stats().claimed == 2
    # a score the records have that flagged none of them is no error: no record matches
    code, out, _ = run(capsys, "list", "--queue", url, "--model", "other", "--version", "4", "--score", "energy")
    assert code == 0 and out == "no pending record matches\n"
    code, out, _ = run(capsys, "list", "--queue", url, "--model", "nope", "--score", "bogus")
    assert code == 0 and out == "no pending record matches\n"


def digits_export_calibration(repository, version):
    from oodguard.harvest.versions import CalibrationCache

    return CalibrationCache(repository).get("digits", version)


def test_sheet_errors(filled, capsys, tmp_path):
    url, queue, ids, repository, v = filled
    code, _, err = run(capsys, "sheet", "--queue", url, "--out", str(tmp_path / "s.png"), "--repository", str(repository))
    assert code == 2 and "no calibration.json for other version 3, other version 4" in err
    code, _, err = run(capsys, "sheet", "--queue", url, "--model", "nope", "--out", str(tmp_path / "s.png"))
    assert code == 2 and "no pending record matches the filters" in err
    assert not (tmp_path / "s.png").exists()


def test_bad_input_is_a_clear_error(filled, capsys):
    url, queue, ids, _, _ = filled
    with pytest.raises(SystemExit) as caught:
        main(["queue", "list", "--queue", url, "--state", "lost"])
    assert caught.value.code == 2 and "invalid choice: 'lost'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["queue", "list", "--queue", url, "--since", "yesterday"])
    assert "'yesterday' is not a time: give an ISO time" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["queue", "list", "--queue", url, "--limit", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    code, _, err = run(capsys, "show", "--queue", url, "no-such-id", ids["o1"])
    assert code == 2 and "no record with id 'no-such-id' in the queue" in err
    code, _, err = run(capsys, "show", "--queue", url, ids["o1"], "--model", "other")
    assert code == 2 and "ids or filters, not both" in err


def test_times_read_iso_and_ago():
    assert parse_time("2024-05-01T12:00:00Z") == parse_time("2024-05-01T12:00") == 1714564800.0
    assert parse_time("2024-05-01T14:00+02:00") == 1714564800.0
    assert abs(parse_time("2h") - (time.time() - 7200)) < 5 and abs(parse_time("3d") - (time.time() - 3 * DAY)) < 5
    assert abs(parse_time("30m") - (time.time() - 1800)) < 5


def test_release_moves_claimed_records_back(filled, capsys):
    url, queue, ids, _, _ = filled
    digits = ids["digits"]
    assert queue.claim_ids(digits[:3] + [ids["o3"]]) == digits[:3] + [ids["o3"]]
    queue.mark_sent(digits[3:4])
    code, out, _ = run(capsys, "release", "--queue", url, digits[0], digits[3], ids["o1"])
    assert code == 0 and out.strip() == "released 1 claimed record(s) back to pending; 2 given record(s) were not " \
                                        "claimed (1 pending, 1 sent)"
    assert queue.stats().claimed == 3
    code, out, _ = run(capsys, "release", "--queue", url, "--model", "digits")
    assert code == 0 and out.strip() == "released 2 claimed record(s) back to pending"
    assert [r.id for r in queue.select(state="claimed")] == [ids["o3"]]
    code, _, err = run(capsys, "release", "--queue", url)
    assert code == 2 and "give record ids, a filter" in err and queue.stats().claimed == 1
    code, _, err = run(capsys, "release", "--queue", url, "no-such-id")
    assert code == 2 and "no record with id 'no-such-id'" in err
    code, out, _ = run(capsys, "release", "--queue", url, "--all")
    assert code == 0 and "released 1 claimed" in out and queue.stats().claimed == 0


def test_purge_refuses_without_yes_and_says_how_many(filled, capsys):
    url, queue, ids, _, v = filled
    queue.mark_sent(ids["digits"][:4])
    before = stats_json(capsys, url)
    code, out, _ = run(capsys, "purge", "--queue", url, "--model", "other")
    assert code == 1 and out.strip() == ("would delete 3 record(s) (3 pending); nothing deleted: run again with --yes "
                                         "to delete them")
    code, out, _ = run(capsys, "purge", "--queue", url, "--model", "other", "--older-than", "2d")
    assert code == 1 and "would delete 2 record(s) (2 pending)" in out
    code, out, _ = run(capsys, "purge", "--queue", url, "--state", "sent")
    assert code == 1 and "would delete 4 record(s) (4 sent)" in out
    code, _, err = run(capsys, "purge", "--queue", url, "--yes")
    assert code == 2 and "purge needs a filter" in err
    assert stats_json(capsys, url) == before
    code, out, _ = run(capsys, "purge", "--queue", url, "--model", "other", "--older-than", "2d", "--yes")
    assert code == 0 and out.strip() == "deleted 2 record(s) (2 pending)"
    assert [r.id for r in queue.select(model="other")] == [ids["o3"]]
    code, out, _ = run(capsys, "purge", "--queue", url, "--model", "digits", "--version", str(v), "--yes")
    assert code == 0 and out.strip() == "deleted 15 record(s) (11 pending, 4 sent)"
    s = queue.stats()
    assert (s.pending, s.sent, s.evicted, s.accepted) == (1, 0, 0, 18)
    code, out, _ = run(capsys, "purge", "--queue", url, "--state", "sent", "--yes")
    assert code == 0 and out.strip() == "no record matches: nothing to delete"


def test_every_option_explains_itself_with_its_default(capsys):
    def subcommands(parser) -> dict:
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    actions = subcommands(subcommands(build_parser())["queue"])
    assert set(actions) == {"stats", "list", "show", "sheet", "release", "purge"}
    for name, sub in actions.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            if not action.required:
                assert "default" in action.help, (name, action.dest, action.help)
    with pytest.raises(SystemExit) as caught:
        main(["queue", "sheet", "--help"])
    out = capsys.readouterr().out
    assert caught.value.code == 0
    assert "(default 64)" in out and "(default model_repository)" in out and "(default 0)" in out


def test_the_commands_work_on_a_redis_queue(digits_export, redis_server, tmp_path, capsys):
    from oodguard.queues.redis_streams import RedisQueue

    queue, truth, repository = filled_queue(digits_export, None, per_kind=3,
                                            queue=RedisQueue(redis_server.url, tmp_path / "spool"))
    queue.put([other(3, True, time.time() - 5 * DAY, ["energy"])])
    url = redis_server.url
    data = stats_json(capsys, url)
    assert [(g["model"], g["state"], g["count"]) for g in data["groups"]] == [("digits", "pending", 9),
                                                                               ("other", "pending", 1)]
    code, out, _ = run(capsys, "list", "--queue", url, "--model", "other")
    assert code == 0 and table_rows(out)[0][3:] == ["other", "3", "pending", "flagged", "energy=7.5", "1"]
    code, out, _ = run(capsys, "sheet", "--queue", url, "--model", "digits", "--limit", "4", "--out",
                       str(tmp_path / "s.png"), "--repository", str(repository))
    assert code == 0 and Image.open(tmp_path / "s.png").size == (4 * tile_shape(96)[0], tile_shape(96)[1])
    code, out, _ = run(capsys, "purge", "--queue", url, "--model", "digits", "--yes")
    assert code == 0 and out.strip() == "deleted 9 record(s) (9 pending)"
    assert queue.stats().pending == 1 and queue.stats().bytes > 0
    queue.close()

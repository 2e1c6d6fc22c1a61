import json
import threading

import numpy as np
import pytest

from oodguard.harvest.output_folder import safe_file_name
from oodguard.harvest.job import run_harvest
from oodguard.queues.sqlite import SQLiteQueue

from .queue_fixture import filled_queue, queue_images


def quiet(line):
    pass


def test_harvest_writes_images_manifest_and_label_studio_tasks(digits_export, tmp_path):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite")
    result = run_harvest(queue, "sisom", 12, tmp_path / "out", repository, seed=0, progress=quiet)
    assert len(result.ids) == 12 and len(set(result.ids)) == 12
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [m["record_id"] for m in manifest] == result.ids
    assert all((tmp_path / "out" / m["image"]).exists() for m in manifest)
    assert all(m["why"] and m["predicted_name"] in [str(c) for c in range(8)] for m in manifest)
    tasks = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert [t["data"]["record_id"] for t in tasks] == result.ids
    for task, m in zip(tasks, manifest):
        # Label Studio's convention: a confidence in [0, 1] (the class probability); the OOD score stays in data
        assert task["data"]["ood_score"] == pytest.approx(m["scores"]["sisome"])
        assert 0 <= task["predictions"][0]["score"] <= 1
        assert task["predictions"][0]["result"][0]["value"]["choices"] == [m["predicted_name"]]
    # sisom top-B takes the highest SISOMe scores of the pool: noise and unknown digits, no known digit
    assert sum(truth[i] == "known" for i in result.ids) == 0
    assert queue.stats().sent == 12


def test_exported_image_is_the_queued_input_undone(digits_export, tmp_path):
    from PIL import Image

    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=5)
    result = run_harvest(queue, "random", 3, tmp_path / "out", repository, progress=quiet)
    record = queue.get(result.ids[:1])[0]
    image = np.asarray(Image.open(tmp_path / "out" / "images" / f"{safe_file_name(record.id)}.png"))
    assert image.shape == (28, 28) and image.dtype == np.uint8
    prep = digits_export[1].calibration.model["preprocessing"]
    reconstructed = (image / 255.0 - prep["mean"][0]) / prep["std"][0]
    np.testing.assert_allclose(reconstructed, record.input[0], atol=1.0 / 255 / prep["std"][0])


def test_no_record_is_harvested_twice_also_by_concurrent_harvests(digits_export, tmp_path):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=30)
    first = run_harvest(queue, "entropy", 10, tmp_path / "a", repository, progress=quiet)
    results = {}

    def harvest(name):
        own = SQLiteQueue(tmp_path / "q.sqlite")  # a second process would open its own connection
        results[name] = run_harvest(own, "sisom", 15, tmp_path / name, repository, progress=quiet)

    threads = [threading.Thread(target=harvest, args=(n,)) for n in ("b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = first.ids + results["b"].ids + results["c"].ids
    assert len(ids) == len(set(ids)) == 40
    assert results["b"].lost_to_others + results["c"].lost_to_others >= 0
    assert queue.stats().sent == 40


def test_failed_export_releases_the_claims(digits_export, tmp_path, monkeypatch):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=5)
    import oodguard.harvest.job as job

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(job, "write_export", broken)
    with pytest.raises(OSError, match="disk full"):
        run_harvest(queue, "random", 4, tmp_path / "out", repository, progress=quiet)
    stats = queue.stats()
    assert (stats.claimed, stats.sent, stats.pending) == (0, 0, 15)
    assert not (tmp_path / "out").exists()


def test_bad_requests(digits_export, tmp_path):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=2)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        run_harvest(queue, "random", 1, tmp_path / "used", repository, progress=quiet)
    with pytest.raises(ValueError, match="unknown strategy"):
        run_harvest(queue, "best", 1, tmp_path / "o", repository, progress=quiet)
    empty = SQLiteQueue(tmp_path / "empty.sqlite")
    with pytest.raises(ValueError, match="no pending records"):
        run_harvest(empty, "random", 1, tmp_path / "o2", repository, progress=quiet)


def test_repeated_inputs_are_selected_once_and_marked_with_it(digits_export, tmp_path):
    """Repeated traffic: 20 distinct noise images, each queued 5 times. A budget of 10 picks 10 distinct inputs;
    each takes its 4 repeats along (listed in the manifest, marked sent), so no label is spent twice."""
    from oodguard.evaluation import uniform_noise

    _, result, repository, _ = digits_export
    queue = SQLiteQueue(tmp_path / "q.sqlite")
    images = uniform_noise(20, (8, 8), seed=9).images
    ids = queue_images(queue, result.version_dir, np.concatenate([images] * 5), "noise")
    lines: list[str] = []
    harvested = run_harvest(queue, "random", 10, tmp_path / "out", repository, progress=lines.append)
    assert any("80 pending record(s) repeat the input of another: selecting among 20 distinct" in line for line in lines)
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 10 and all(m["duplicates"] == 4 for m in manifest)
    position = {record_id: i for i, record_id in enumerate(ids)}
    distinct = {position[m["record_id"]] % 20 for m in manifest}
    assert len(distinct) == 10  # ten different images
    for m in manifest:  # the repeats are the same image, queued later
        assert {position[d] % 20 for d in m["duplicate_ids"]} == {position[m["record_id"]] % 20}
    assert queue.stats().sent == 50 and len(harvested.ids) == 10
    again = run_harvest(queue, "random", 100, tmp_path / "again", repository, progress=quiet)
    assert len(again.ids) == 10  # the other ten distinct inputs are left, each once


def test_file_names_never_come_from_raw_ids():
    assert safe_file_name("../../etc/passwd") == "______etc_passwd"
    assert safe_file_name("") == "record"


def test_concurrent_harvests_against_redis_never_share_a_record(digits_export, tmp_path, redis_server):
    from oodguard.queues.factory import open_queue

    def connect(name):
        return open_queue(f"{redis_server.url}?spool={tmp_path / name}.spool")

    queue, truth, repository = filled_queue(digits_export, None, per_kind=20, queue=connect("filler"))
    results = {}

    def harvest(name):
        own = connect(name)
        try:
            results[name] = run_harvest(own, "sisom", 25, tmp_path / name, repository, progress=quiet)
        finally:
            own.close()

    threads = [threading.Thread(target=harvest, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = results["a"].ids + results["b"].ids
    assert len(ids) == len(set(ids)) == 50
    assert queue.stats().sent == 50 and queue.stats().pending == 10
    queue.close()


def test_harvest_command_on_a_queue_url(digits_export, tmp_path, capsys):
    from oodguard.cli import main

    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=5)
    queue.close()
    code = main(["harvest", "--queue", f"sqlite:///{tmp_path / 'q.sqlite'}", "--strategy", "entropy", "--budget", "4",
                 "--out", str(tmp_path / "out"), "--repository", str(repository)])
    assert code == 0 and "harvested 4 records" in capsys.readouterr().out
    assert len((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()) == 4
    assert SQLiteQueue(tmp_path / "q.sqlite").stats().sent == 4
    assert main(["harvest", "--queue", f"sqlite:///{tmp_path / 'q.sqlite'}", "--strategy", "best", "--budget", "1",
                 "--out", str(tmp_path / "o2"), "--repository", str(repository)]) == 2
    assert "unknown strategy 'best'" in capsys.readouterr().err


def test_label_files_give_the_strategy_the_labeled_unknowns(digits_export, tmp_path):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=20)
    first = run_harvest(queue, "random", 20, tmp_path / "round1", repository, seed=0, progress=quiet)
    labels = tmp_path / "labels.csv"  # the oracle: known digits by their predicted class, the rest unknown
    rows = {r.id: r for r in queue.get(first.ids)}
    labels.write_text("record_id,label\n" + "".join(
        f"{i},{int(np.argmax(rows[i].logits)) if truth[i] == 'known' else 'unknown'}\n" for i in first.ids))
    lines = []
    second = run_harvest(queue, "lfosa", 10, tmp_path / "round2", repository, seed=0, progress=lines.append,
                         labels=[labels])
    n_known = sum(truth[i] == "known" for i in first.ids)
    assert f"labels: {n_known} known and {20 - n_known} unknown labeled records from 1 file(s)" in lines
    why = [json.loads(line)["why"] for line in (tmp_path / "round2" / "manifest.jsonl").read_text().splitlines()]
    assert len(second.ids) == 10 and all(f"(K+1)-way head on {n_known} labeled known" in w for w in why)


def test_harvest_shows_its_phases_on_stderr_only_when_bars_are_on(digits_export, tmp_path, capsys, monkeypatch):
    from oodguard.cli import main

    queue, _, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=5)
    queue.close()

    def harvest(out):  # a dry run: the second harvest sees the same pool
        assert main(["harvest", "--queue", f"sqlite:///{tmp_path / 'q.sqlite'}", "--strategy", "entropy", "--budget",
                     "4", "--out", str(tmp_path / out), "--repository", str(repository), "--dry-run"]) == 0
        captured = capsys.readouterr()
        return captured.out.replace(str(tmp_path / out), "OUT"), captured.err

    monkeypatch.delenv("OODGUARD_PROGRESS", raising=False)  # not a terminal: no bar
    plain_out, plain_err = harvest("plain")
    assert plain_err == "" and "dry run: selected 4 records into OUT" in plain_out
    monkeypatch.setenv("OODGUARD_PROGRESS", "1")
    out, err = harvest("bars")
    assert out == plain_out  # stdout is the same, line for line
    for phase in ("read the pending records of digits from the queue", "build the pool of 15 records",
                  "find repeated inputs", "entropy: select 4 of 15", "write images and tasks"):
        assert phase in err
    assert "0/4" in err and "img" in err  # the images are counted (a bar starts at 0/total)
    manifests = [(tmp_path / out / "manifest.jsonl").read_text() for out in ("plain", "bars")]
    assert manifests[0] == manifests[1]

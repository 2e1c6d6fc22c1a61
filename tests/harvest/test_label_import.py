import json

import numpy as np
import pytest

from oodguard.cli import main
from oodguard.datasets import load_dataset
from oodguard.harvest.job import run_harvest
from oodguard.harvest.label_studio import read_export
from oodguard.harvest.label_import import import_labels, read_labels

from .queue_fixture import filled_queue


def test_label_studio_export_and_csv_are_read(tmp_path):
    export = [
        {"data": {"record_id": "a"}, "annotations": [{"result": [{"type": "choices", "value": {"choices": ["3"]}}]}]},
        {"data": {"record_id": "b"}, "annotations": [{"was_cancelled": True, "result": [
            {"type": "choices", "value": {"choices": ["4"]}}]}]},
        {"data": {"record_id": "c"}, "annotations": []},
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    assert read_labels(tmp_path / "export.json") == {"a": "3"}
    (tmp_path / "labels.csv").write_text("record_id,label\na,3\nb,shoe\n")
    assert read_labels(tmp_path / "labels.csv") == {"a": "3", "b": "shoe"}
    (tmp_path / "bad.csv").write_text("a,3,extra\n")
    with pytest.raises(ValueError, match="record_id,label"):
        read_labels(tmp_path / "bad.csv")


@pytest.mark.parametrize("policy, expected_new", [("new-classes", ["8", "9", "noise"]), ("unknown", ["unknown"])])
def test_import_joins_the_queue_and_extends_the_classes(digits_export, tmp_path, policy, expected_new):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=10)
    harvested = run_harvest(queue, "random", 30, tmp_path / "out", repository, progress=lambda line: None)
    records = {r.id: r for r in queue.get(harvested.ids)}
    lines = ["record_id,label"]
    for record_id in harvested.ids:
        kind = truth[record_id]
        index = int(records[record_id].request_id.split("-")[1])
        label = {"known": str(int(np.argmax(records[record_id].logits))), "unknown": "8" if index % 2 else "9",
                 "noise": "noise"}[kind]
        lines.append(f"{record_id},{label}")
    lines.append("not-in-queue,3")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    summary = import_labels(tmp_path / "labels.csv", queue, repository, tmp_path / "data.npz", policy)
    assert summary.n == 30 and summary.missing_ids == ["not-in-queue"]
    assert summary.new_classes == expected_new  # in sorted order, not the CSV's order of first appearance
    assert "new classes, appended in sorted order: " + ", ".join(
        f"{name} → index {8 + i} ({n} image{'' if n == 1 else 's'})"
        for i, (name, n) in enumerate((name, summary.new_class_counts[name]) for name in expected_new)
    ) in summary.describe()
    data = load_dataset(str(tmp_path / "data.npz"))
    assert data.images.shape == (30, 28, 28) and data.images.dtype == np.uint8
    assert data.class_names == [str(c) for c in range(8)] + summary.new_classes
    assert set(data.labels.tolist()) <= set(range(len(data.class_names)))


def test_labels_import_command_and_train_accept_the_dataset(digits_export, tmp_path, capsys):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=20)
    harvested = run_harvest(queue, "random", 60, tmp_path / "out", repository, progress=lambda line: None)
    (tmp_path / "labels.csv").write_text("".join(f"{i},{truth[i]}\n" for i in harvested.ids))
    queue.close()
    assert main(["labels", "import", str(tmp_path / "labels.csv"), "--queue", f"sqlite:///{tmp_path / 'q.sqlite'}",
                 "--repository", str(repository), "--out", str(tmp_path / "data.npz")]) == 0
    assert "60 labeled images" in capsys.readouterr().out
    # the harvest alone lacks images of some known classes: train refuses it, naming them, and --base helps
    assert main(["train", "--data", str(tmp_path / "data.npz"), "--epochs", "1", "--out", str(tmp_path / "alone")]) == 2
    assert "fewer than 2 training images" in capsys.readouterr().err
    assert main(["train", "--base", str(digits_export[3].parent), "--data", str(tmp_path / "data.npz"), "--epochs", "1",
                 "--out", str(tmp_path / "retrain")]) == 0
    record = json.loads((tmp_path / "retrain" / "training.json").read_text())
    assert record["class_names"][-3:] == ["known", "noise", "unknown"]  # appended in sorted order


# --- every export shape, and what is wrong with an export -------------------------------------------------

def ls_task(record_id, *annotations, task_id=1):
    return {"id": task_id, "data": {"record_id": record_id, "image": "/data/local-files/?d=x.png"},
            "annotations": list(annotations)}


def ls_annotation(label, new_class=None, annotation_id=1, updated="2026-01-01T00:00:00Z", cancelled=False):
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    if new_class is not None:
        result.append({"from_name": "new_class", "to_name": "image", "type": "textarea", "value": {"text": [new_class]}})
    return {"id": annotation_id, "result": result, "was_cancelled": cancelled, "updated_at": updated}


def test_the_format_is_detected(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([ls_task("a", ls_annotation("3"))]))
    (tmp_path / "b.json").write_text(json.dumps([{"record_id": "a", "label": "3", "id": 1},
                                                 {"record_id": "b", "label": {"choices": ["new class"]}, "new_class": "x"}]))
    (tmp_path / "c.csv").write_text('annotation_id,id,image,label,new_class,ood_score,record_id\n'
                                    '1,1,/i.png,3,,1.5,a\n2,2,/j.png,"{""choices"": [""new class""]}",x,2.5,b\n')
    (tmp_path / "d.txt").write_text("a,3\nb,x\n")
    found = {name: read_export(tmp_path / name) for name in ("a.json", "b.json", "c.csv", "d.txt")}
    assert {n: e.format for n, e in found.items()} == {
        "a.json": "Label Studio JSON", "b.json": "Label Studio JSON-MIN", "c.csv": "Label Studio CSV",
        "d.txt": "plain CSV record_id,label"}
    assert read_labels(tmp_path / "b.json") == read_labels(tmp_path / "c.csv") == {"a": "3", "b": "x"}


def test_the_most_recent_non_cancelled_annotation_counts(tmp_path):
    (tmp_path / "e.json").write_text(json.dumps([
        ls_task("a", ls_annotation("1", annotation_id=1, updated="2026-01-01T10:00:00Z"),
                ls_annotation("2", annotation_id=2, updated="2026-01-02T10:00:00Z"),
                ls_annotation("3", annotation_id=3, updated="2026-01-03T10:00:00Z", cancelled=True)),
        ls_task("b", ls_annotation("4", cancelled=True), task_id=2)]))
    export = read_export(tmp_path / "e.json")
    assert {i: e.label for i, e in export.entries.items()} == {"a": "2"}
    assert (export.unlabeled, export.cancelled) == (1, 1)
    rows = [{"record_id": "a", "label": "5", "annotation_id": 7, "updated_at": "2026-01-02T00:00:00Z"},
            {"record_id": "a", "label": "6", "annotation_id": 8, "updated_at": "2026-01-03T00:00:00Z"},
            {"record_id": "a", "label": "4", "annotation_id": 6, "updated_at": "2026-01-01T00:00:00Z"}]
    (tmp_path / "min.json").write_text(json.dumps(rows))
    assert read_labels(tmp_path / "min.json") == {"a": "6"}


@pytest.mark.parametrize("text", ["", "  \n", "[]", "record_id,label\n",
                                  "annotation_id,id,label,new_class,record_id\n"])
def test_an_empty_export_is_a_clear_error(tmp_path, text):
    (tmp_path / "export.json").write_text(text)
    with pytest.raises(ValueError, match="the export is empty"):
        import_labels(tmp_path / "export.json", None, tmp_path, tmp_path / "data.npz")


def test_an_export_without_a_label_is_a_clear_error(tmp_path):
    (tmp_path / "export.json").write_text(json.dumps([ls_task("a", ls_annotation("3", cancelled=True)),
                                                      ls_task("b", task_id=2)]))
    with pytest.raises(ValueError, match=r"no labels found: 2 task\(s\)/row\(s\), none with a label \(1 only cancelled\)"):
        import_labels(tmp_path / "export.json", None, tmp_path, tmp_path / "data.npz")


def test_a_label_studio_csv_without_a_label_column_has_no_labels(tmp_path):
    (tmp_path / "export.csv").write_text("id,image,record_id\n1,/i.png,a\n")
    with pytest.raises(ValueError, match=r"\(Label Studio CSV\): no labels found: 1 task"):
        import_labels(tmp_path / "export.csv", None, tmp_path, tmp_path / "data.npz")


def test_several_choices_and_tasks_of_no_harvest_are_errors(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([{"record_id": "a", "label": {"choices": ["1", "2"]}}]))
    with pytest.raises(ValueError, match=r"several choices \['1', '2'\]"):
        read_export(tmp_path / "m.json")
    (tmp_path / "t.json").write_text(json.dumps([{"id": 5, "data": {"image": "x"}, "annotations": []}]))
    with pytest.raises(ValueError, match="task 5 has no data.record_id"):
        read_export(tmp_path / "t.json")


@pytest.fixture
def small_queue(digits_export, tmp_path):
    """9 queued digits records (version 1: classes '0'..'7') and the repository; ids in queue order."""
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=3)
    ids = [r.id for r in queue.select(state="pending")]
    yield queue, ids, repository
    queue.close()


def test_a_label_outside_the_configured_choices_is_an_error(small_queue, tmp_path):
    queue, ids, repository = small_queue
    (tmp_path / "export.json").write_text(json.dumps([{"record_id": ids[0], "label": "3"},
                                                      {"record_id": ids[1], "label": "giraffe"}]))
    with pytest.raises(ValueError, match=rf"record {ids[1]}\): label 'giraffe' is not one of the choices "
                                         r"\['0', '1', '2', '3', '4', '5', '6', '7', 'new class', 'not relevant'\]"):
        import_labels(tmp_path / "export.json", queue, repository, tmp_path / "data.npz")
    assert not (tmp_path / "data.npz").exists()
    # a plain CSV has no configured choices: the same label is a new class there
    (tmp_path / "labels.csv").write_text(f"{ids[0]},3\n{ids[1]},giraffe\n")
    assert import_labels(tmp_path / "labels.csv", queue, repository, tmp_path / "data.npz").new_classes == ["giraffe"]


def test_new_class_without_a_name_is_an_error_naming_the_record(small_queue, tmp_path):
    queue, ids, repository = small_queue
    (tmp_path / "export.json").write_text(json.dumps([ls_task(ids[0], ls_annotation("new class", "")),
                                                      ls_task(ids[1], ls_annotation("new class", "shoe"), task_id=2)]))
    with pytest.raises(ValueError, match=rf"task 1 \(record {ids[0]}, annotation 1\): 'new class' without a name"):
        import_labels(tmp_path / "export.json", queue, repository, tmp_path / "data.npz")


def test_new_classes_not_relevant_and_the_unknown_policy(small_queue, tmp_path):
    queue, ids, repository = small_queue
    rows = [{"record_id": ids[0], "label": "3"}, {"record_id": ids[1], "label": "new class", "new_class": " shoe "},
            {"record_id": ids[2], "label": "not relevant"}, {"record_id": ids[3], "label": "new class", "new_class": "2"},
            {"record_id": ids[4], "label": "new class", "new_class": "hat"}]
    (tmp_path / "export.json").write_text(json.dumps(rows))
    summary = import_labels(tmp_path / "export.json", queue, repository, tmp_path / "data.npz")
    assert (summary.format, summary.n, summary.not_relevant, summary.new_classes) == (
        "Label Studio JSON-MIN", 4, 1, ["hat", "shoe"])  # sorted: 'shoe' came first in the export
    assert summary.class_names == [str(c) for c in range(8)] + ["hat", "shoe"]
    assert "1 'not relevant' left out" in summary.describe()
    assert "new classes, appended in sorted order: hat → index 8 (1 image), shoe → index 9 (1 image)" in summary.describe()
    data = np.load(tmp_path / "data.npz")
    names = list(data["class_names"])
    assert dict(zip(data["record_ids"], (names[i] for i in data["labels"]))) == {
        ids[0]: "3", ids[1]: "shoe", ids[3]: "2", ids[4]: "hat"}  # a 'new class' named like a known one is that one
    summary = import_labels(tmp_path / "export.json", queue, repository, tmp_path / "unknown.npz", "unknown")
    assert summary.new_classes == ["unknown"] and summary.class_names[-1] == "unknown"


def test_record_ids_not_in_the_queue_are_reported_or_refused(small_queue, tmp_path):
    queue, ids, repository = small_queue
    tasks = [ls_task(ids[0], ls_annotation("3"))] + [ls_task(f"gone-{n}", ls_annotation("1"), task_id=n + 2)
                                                     for n in range(7)]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    summary = import_labels(tmp_path / "export.json", queue, repository, tmp_path / "data.npz")
    assert summary.n == 1 and summary.missing_ids == [f"gone-{n}" for n in range(7)]
    assert "7 labeled id(s) not in the queue were skipped (first: gone-0, gone-1, gone-2, gone-3, gone-4)" in summary.describe()
    with pytest.raises(ValueError, match=r"7 labeled record id\(s\) are not in the queue: gone-0, .* \(7 in all\)"):
        import_labels(tmp_path / "export.json", queue, repository, tmp_path / "strict.npz", strict=True)
    (tmp_path / "none.json").write_text(json.dumps(tasks[1:]))
    with pytest.raises(ValueError, match="none of the 7 labeled record ids is in the queue"):
        import_labels(tmp_path / "none.json", queue, repository, tmp_path / "none.npz")


def test_a_stale_record_may_take_a_class_of_the_version_it_was_harvested_for(digits_two_versions, tmp_path):
    """A v1 record (classes 0-7) re-scored and harvested for v2 (classes 0-8) was offered '8' in the harvest's
    label config: importing '8' for it is a known class, not an error."""
    import json

    from oodguard.datasets import load_dataset
    from oodguard.harvest.label_import import import_labels
    from oodguard.queues.sqlite import SQLiteQueue

    from .queue_fixture import queue_images

    repository, _, _ = digits_two_versions
    digits = load_dataset("digits")
    queue = SQLiteQueue(tmp_path / "q.sqlite")
    ids = queue_images(queue, repository / "digits" / "1", digits.select_classes([8]).images[:2], "v1")
    export = tmp_path / "min.json"
    export.write_text(json.dumps([{"id": 1, "record_id": ids[0], "label": "8"},
                                  {"id": 2, "record_id": ids[1], "label": "nine"}]))
    with pytest.raises(ValueError, match=r"label 'nine' is not one of the choices \['0', .*'8', 'new class'"):
        import_labels(export, queue, repository, tmp_path / "out.npz")
    export.write_text(json.dumps([{"id": 1, "record_id": ids[0], "label": "8"}]))
    summary = import_labels(export, queue, repository, tmp_path / "out.npz")
    assert summary.class_names == [str(c) for c in range(9)] and summary.new_classes == []
    assert np.load(tmp_path / "out.npz")["labels"].tolist() == [8]
    queue.close()


def test_not_relevant_images_go_to_their_own_npz_for_outlier_training(small_queue, tmp_path):
    """``--not-relevant-out``: the images labeled 'not relevant' (as queued, turned back into uint8 images like the
    labeled ones) with their record ids; none of them in the dataset; an empty file when there are none."""
    queue, ids, repository = small_queue
    rows = [{"record_id": ids[0], "label": "3"}, {"record_id": ids[1], "label": "not relevant"},
            {"record_id": ids[2], "label": "not relevant"}, {"record_id": ids[3], "label": "5"}]
    (tmp_path / "export.json").write_text(json.dumps(rows))
    summary = import_labels(tmp_path / "export.json", queue, repository, tmp_path / "data.npz",
                            not_relevant_out=tmp_path / "outliers.npz")
    assert summary.n == 2 and summary.not_relevant == 2 and summary.not_relevant_path == tmp_path / "outliers.npz"
    assert f"2 'not relevant' images written to {tmp_path / 'outliers.npz'}" in summary.describe()
    outliers, data = np.load(tmp_path / "outliers.npz"), np.load(tmp_path / "data.npz")
    assert list(outliers["record_ids"]) == [ids[1], ids[2]] and set(data["record_ids"]) == {ids[0], ids[3]}
    assert outliers["images"].dtype == np.uint8 and outliers["images"].shape[1:] == data["images"].shape[1:]
    assert "labels" not in outliers.files
    # the same image as a labeled import of that record would write
    (tmp_path / "one.csv").write_text(f"{ids[1]},3\n")
    assert np.array_equal(np.load(import_labels(tmp_path / "one.csv", queue, repository, tmp_path / "one.npz")
                                  .out_path)["images"][0], outliers["images"][0])
    rows[1]["label"] = rows[2]["label"] = "4"
    (tmp_path / "export2.json").write_text(json.dumps(rows))
    summary = import_labels(tmp_path / "export2.json", queue, repository, tmp_path / "data2.npz",
                            not_relevant_out=tmp_path / "none.npz")
    assert summary.not_relevant == 0 and summary.not_relevant_path == tmp_path / "none.npz"
    empty = np.load(tmp_path / "none.npz")  # written all the same: a scripted retrain finds it (and adds nothing)
    assert empty["images"].shape == (0, *data["images"].shape[1:]) and len(empty["record_ids"]) == 0


def test_labels_import_reads_in_chunks_and_shows_progress_only_when_asked(digits_export, tmp_path, capsys,
                                                                          monkeypatch):
    """More labeled ids than one read takes (READ_CHUNK): every one is joined; with OODGUARD_PROGRESS=1 the
    phases show as bars on stderr, without it stderr stays empty; stdout is the same either way."""
    from oodguard.harvest import label_import

    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=10)
    harvested = run_harvest(queue, "random", 30, tmp_path / "out", repository, progress=lambda line: None)
    (tmp_path / "labels.csv").write_text("".join(f"{i},{truth[i]}\n" for i in harvested.ids))
    queue.close()
    monkeypatch.setattr(label_import, "READ_CHUNK", 7)  # 30 ids: five reads
    argv = ["labels", "import", str(tmp_path / "labels.csv"), "--queue", f"sqlite:///{tmp_path / 'q.sqlite'}",
            "--repository", str(repository), "--out"]
    outputs = []
    for progress in ("0", "1"):
        monkeypatch.setenv("OODGUARD_PROGRESS", progress)
        assert main(argv + [str(tmp_path / f"data-{progress}.npz")]) == 0
        outputs.append(capsys.readouterr())
    assert "30 labeled images" in outputs[0].out
    assert outputs[0].out.replace("data-0", "data-1") == outputs[1].out
    assert outputs[0].err == "" and "labels import: read records" in outputs[1].err
    assert "labels import: join labels" in outputs[1].err
    assert len(load_dataset(str(tmp_path / "data-1.npz")).labels) == 30


def test_an_export_naming_records_of_two_models_is_refused_unless_one_is_picked(digits_export, tmp_path, capsys):
    """A plain CSV naming records of two models would have become one dataset under the second model's class
    names: refused, naming both; --model picks one, and only its records are imported."""
    import shutil

    from .queue_fixture import queue_images

    _, result, repository, _ = digits_export
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    shutil.copytree(repo / "digits", repo / "other")
    queue, _, _ = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=4)
    other = queue_images(queue, repo / "other" / str(result.version), load_dataset("digits").images[:5], "other",
                         model="other")
    digits_ids = [r.id for r in queue.select() if r.model == "digits"]
    queue.close()
    (tmp_path / "labels.csv").write_text("".join(f"{i},3\n" for i in digits_ids + other))
    argv = ["labels", "import", str(tmp_path / "labels.csv"), "--queue", f"sqlite:///{tmp_path / 'q.sqlite'}",
            "--repository", str(repo), "--out", str(tmp_path / "data.npz")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the labeled records are of 2 models ({'digits': 12, 'other': 5}); a dataset is of one model: give " \
           "--model NAME" in err and not (tmp_path / "data.npz").exists()
    assert main(argv + ["--model", "other"]) == 0
    assert "5 labeled images" in capsys.readouterr().out
    assert sorted(np.load(tmp_path / "data.npz")["record_ids"].tolist()) == sorted(other)
    assert main(argv + ["--model", "nope"]) == 2
    assert "no labeled record of model 'nope'" in capsys.readouterr().err


def test_new_class_names_are_bounded_in_length_and_count(digits_export, tmp_path, monkeypatch):
    from oodguard.harvest import label_import

    queue, _, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=2)
    ids = [r.id for r in queue.select()]
    (tmp_path / "long.csv").write_text(f"{ids[0]},{'x' * 200}\n{ids[1]},3\n")
    with pytest.raises(ValueError, match="1 new class name\\(s\\) longer than 128 characters .*200 characters"):
        import_labels(tmp_path / "long.csv", queue, repository, tmp_path / "data.npz")
    (tmp_path / "huge.csv").write_text(f"{ids[1]},3\n{ids[0]},{'x' * 1_000_000}\n")  # past the csv module's field limit
    with pytest.raises(ValueError, match="line 2: not a readable CSV row \\(field larger than field limit"):
        import_labels(tmp_path / "huge.csv", queue, repository, tmp_path / "data.npz")
    monkeypatch.setattr(label_import, "MAX_NEW_CLASSES", 2)
    (tmp_path / "many.csv").write_text("".join(f"{i},new{n}\n" for n, i in enumerate(ids[:3])))
    with pytest.raises(ValueError, match="3 new classes in one import, more than 2"):
        import_labels(tmp_path / "many.csv", queue, repository, tmp_path / "data.npz")
    assert not (tmp_path / "data.npz").exists()


@pytest.mark.parametrize("text, message", [
    ("[" * 200_000 + "]" * 200_000, "JSON nested too deeply"),
    ('[{"id": 1, "data": ["not", "an", "object"], "annotations": []}]', "has no data.record_id"),
    ('[{"id": 1, "data": {"record_id": "a"}, "annotations": {"not": "a list"}}]', "'annotations' is not a list"),
    ('[{"id": 1, "data": {"record_id": "a"}, "annotations": [{"id": 2, "result": ["x"]}]}]',
     "an annotation's 'result' is not a list of objects"),
    ('[{"id": 1, "data": {"record_id": "a"}, "annotations": [{"id": 2, "result": [{"type": "choices", '
     '"value": ["x"]}]}]}]', "a result's 'value' is not an object"),
])
def test_malformed_label_studio_json_is_a_one_line_error(tmp_path, text, message):
    (tmp_path / "export.json").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_export(tmp_path / "export.json")
    assert "\n" not in str(info.value)


def test_conflicting_labels_of_one_record_are_reported_and_refused_with_strict(digits_export, tmp_path):
    """A plain CSV labeling one record twice differently, and a JSON task whose two live annotations disagree:
    the most recent label is kept and the summary says so; --strict refuses."""
    queue, _, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=2)
    ids = [r.id for r in queue.select()]
    (tmp_path / "labels.csv").write_text(f"{ids[0]},3\n{ids[1]},4\n{ids[0]},5\n")
    summary = import_labels(tmp_path / "labels.csv", queue, repository, tmp_path / "data.npz")
    assert summary.conflicts == [ids[0]] and summary.n == 2
    assert f"1 record(s) labeled differently by several annotations or rows: the most recent label kept" in summary.describe()
    assert dict(zip(np.load(tmp_path / "data.npz")["record_ids"].tolist(),
                    np.load(tmp_path / "data.npz")["labels"].tolist()))[ids[0]] == 5  # the last row wins
    with pytest.raises(ValueError, match=f"1 record\\(s\\) labeled differently .*{ids[0]}"):
        import_labels(tmp_path / "labels.csv", queue, repository, tmp_path / "strict.npz", strict=True)
    assert not (tmp_path / "strict.npz").exists()

    def annotation(n, label, when):
        return {"id": n, "updated_at": when, "result": [{"type": "choices", "from_name": "label",
                                                         "value": {"choices": [label]}}]}
    task = {"id": 1, "data": {"record_id": ids[2]}, "annotations": [annotation(1, "3", "2026-01-01"),
                                                                     annotation(2, "6", "2026-02-01")]}
    (tmp_path / "export.json").write_text(json.dumps([task]))
    export = read_export(tmp_path / "export.json")
    assert export.conflicts == [ids[2]] and export.entries[ids[2]].label == "6"

"""The loop, twice, through the real gateway: v1 serves; traffic with unknowns is queued; harvest → a real Label
Studio (project from the harvest's label config, tasks imported, annotations through its API, export) →
``labels import``; v2 with an added class is exported into the same repository and hot-reloaded; traffic goes
on; the second harvest works on a queue holding v1 and v2 records (re-scored and excluded variants), and the
second model sharing the queue is never mixed in. Embedded backend; SQLite and Redis queues."""

from __future__ import annotations

import json
import shutil
import time

import grpc
import numpy as np
import pytest

from gateway_fixtures import GatewayThread
from oodguard.cli import main
from oodguard.datasets import load_dataset
from oodguard.evaluation import uniform_noise
from oodguard.harvest.output_folder import ExportOptions
from oodguard.harvest.job import run_harvest
from oodguard.harvest.label_studio import NEW_CLASS, NOT_RELEVANT
from oodguard.harvest.label_import import import_labels
from oodguard.serve.settings import Settings
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

quiet = lambda line: None  # noqa: E731


def send(stub, images: np.ndarray, labels: list[str], model: str = "digits", batch: int = 8) -> list:
    """Predict ``images`` in batches; every request's metadata names each item's true label."""
    items = []
    for start in range(0, len(images), batch):
        part = np.ascontiguousarray(images[start:start + batch])
        request = pb.PredictRequest(model=model, tensor=pb.Tensor(dtype="uint8", shape=list(part.shape), data=part.tobytes()),
                                    metadata={"labels": ",".join(labels[start:start + batch])})
        items.extend(stub.Predict(request, timeout=30).predictions)
    return items


def truth_of(record) -> str:
    return record.metadata["labels"].split(",")[record.decision["item"]]


def annotation_for(truth: str, known: list[str]) -> dict:
    """What our annotator answers: a known class by name; digit 8 is the new class '8'; 9 and noise are not
    relevant."""
    if truth in known:
        return {"label": truth}
    if truth == "8":
        return {"label": NEW_CLASS, "new_class": "8"}
    return {"label": NOT_RELEVANT}


def wait_for_version(stub, version: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = stub.ModelInfo(pb.ModelInfoRequest(model="digits"), timeout=10)
        if info.models and info.models[0].latest_version == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"version {version} was not hot-reloaded within {timeout_s} s")


def relabel_in_label_studio(label_studio, harvest_dir, queue, known: list[str], export_type: str, tmp_path,
                            monkeypatch, via_cli: bool = False):
    """Create a project from the harvest's config, import its tasks, annotate every task like our annotator,
    export in ``export_type`` (``via_cli``: push and pull with `oodguard labels push/pull`, as the README does);
    returns (the export file, the annotations sent by record id)."""
    path = tmp_path / f"export-{harvest_dir.name}-{export_type}.{'csv' if export_type == 'CSV' else 'json'}"
    if via_cli:
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
        assert main(["labels", "push", str(harvest_dir), "--label-studio", label_studio.url,
                     "--local-files-root", str(label_studio.document_root)]) == 0
        project = max(p["id"] for p in label_studio.api("GET", "/api/projects")["results"])
    else:
        project = label_studio.create_project(f"harvest {harvest_dir.name}",
                                              (harvest_dir / "label_config.xml").read_text())
        label_studio.import_tasks(project, json.loads((harvest_dir / "tasks.json").read_text()))
    tasks = label_studio.tasks(project)
    assert len(tasks) == len(json.loads((harvest_dir / "tasks.json").read_text()))
    # Label Studio serves the task images (local files below its document root)
    assert label_studio.get_bytes(tasks[0]["data"]["image"])[:8] == b"\x89PNG\r\n\x1a\n"
    records = {r.id: r for r in queue.get([t["data"]["record_id"] for t in tasks])}
    sent = {}
    for t in tasks:
        answer = annotation_for(truth_of(records[t["data"]["record_id"]]), known)
        label_studio.annotate(t["id"], answer)
        sent[t["data"]["record_id"]] = answer
    if via_cli:
        assert main(["labels", "pull", "--label-studio", label_studio.url, "--project", str(project),
                     "--format", export_type, "--out", str(path)]) == 0
    else:
        path.write_bytes(label_studio.export(project, export_type))
    return path, sent


def expected_dataset(sent: dict) -> dict[str, str]:
    """record id → label in the imported dataset (not-relevant records are left out)."""
    return {rid: (a["new_class"] if a["label"] == NEW_CLASS else a["label"])
            for rid, a in sent.items() if a["label"] != NOT_RELEVANT}


def imported(npz_path) -> dict[str, str]:
    data = np.load(npz_path)
    names = list(data["class_names"])
    return {str(rid): str(names[int(label)]) for rid, label in zip(data["record_ids"], data["labels"])}


@pytest.mark.parametrize("queue_kind", ["sqlite", "redis"])
def test_the_loop_twice_through_the_real_gateway(queue_kind, digits_export, digits_two_versions, label_studio, redis_server,
                                                 tmp_path, request, monkeypatch):
    _, _, v2_checkpoint = digits_two_versions
    repo = tmp_path / "repo"
    shutil.copytree(digits_export[2], repo)  # version 1 of 'digits' (digits 0-7) ...
    shutil.copytree(repo / "digits", repo / "other")  # ... and a second model sharing the gateway and the queue
    queue_url = f"sqlite:///{tmp_path / 'queue.sqlite'}" if queue_kind == "sqlite" else redis_server.url
    gateway = GatewayThread(Settings(repository=repo, listen="127.0.0.1:0", queue_url=queue_url, poll_interval_s=0.2,
                                     queue_spool_path=tmp_path / "spool", default_model="digits"))
    request.addfinalizer(lambda: gateway.stop(1.0))
    queue = gateway.gateway.queue
    digits = load_dataset("digits")
    labels = digits.labels.astype(str)
    rng = np.random.default_rng(0)
    known_v1 = [str(c) for c in range(8)]
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)

        # -- turn 1: v1 serves known digits, unknown 8s and 9s, and noise ----------------------------------
        pick = rng.permutation(len(digits.images))[:400]
        noise = uniform_noise(40, (8, 8), seed=1).images
        items = send(stub, np.concatenate([digits.images[pick], noise]), list(labels[pick]) + ["noise"] * 40)
        send(stub, digits.images[pick[:40]], list(labels[pick[:40]]), model="other")
        assert {p.version for p in items} == {1}
        flagged = [p for p in items if p.decision.ood]
        assert len(flagged) > 60 and all(p.queue_status == pb.QUEUED for p in flagged)

        with pytest.raises(ValueError, match="several models: digits .*other .*name one with --model"):
            run_harvest(queue, "random", 10, tmp_path / "h0", repo, progress=quiet)
        root = label_studio.document_root / queue_kind  # the server is shared by the test session
        h1 = run_harvest(queue, "sisom-diverse", 30, root / "h1", repo, model="digits", progress=quiet,
                         export=ExportOptions(local_files_root=label_studio.document_root))
        assert len(h1.ids) == 30 and h1.plan.version == 1
        assert {r.model for r in queue.get(h1.ids)} == {"digits"}
        export_path, sent = relabel_in_label_studio(label_studio, root / "h1", queue, known_v1, "JSON", tmp_path,
                                                    monkeypatch, via_cli=True)
        summary = import_labels(export_path, queue, repo, tmp_path / "relabeled-1.npz",
                                not_relevant_out=tmp_path / "outliers-1.npz")
        assert imported(summary.out_path) == expected_dataset(sent)
        # the 'not relevant' records (9s and noise) come back as images for `oodguard train --outlier-data`
        not_relevant = sorted(rid for rid, a in sent.items() if a["label"] == NOT_RELEVANT)
        assert not_relevant and sorted(np.load(tmp_path / "outliers-1.npz")["record_ids"]) == not_relevant

        # -- v2 (digits 0-8: class '8' added) exported into the same repository, hot-reloaded --------------
        from oodguard.export.pipeline import export_model
        from oodguard.export.spec import spec_from_training

        assert export_model(spec_from_training(v2_checkpoint, repo, "digits"), progress=quiet).version == 2
        wait_for_version(stub, 2)
        pick2 = rng.permutation(len(digits.images))[:300]
        items = send(stub, np.concatenate([digits.images[pick2], noise]), list(labels[pick2]) + ["noise"] * 40)
        assert {p.version for p in items} == {2} and {p.class_name for p in items} <= set(map(str, range(9)))

    # -- turn 2: a queue holding v1 and v2 records (and 'other') ------------------------------------------
    pending = queue.summary()
    assert {(row.model, row.version) for row in pending if row.state == "pending"} == {("digits", 1), ("digits", 2),
                                                                                         ("other", 1)}
    # re-scored: v1 leftovers join the pool with v2's outputs (9 logits, v2's class names)
    dry = run_harvest(queue, "entropy", 40, tmp_path / "h2-rescore", repo, model="digits", dry_run=True, progress=quiet)
    assert dry.plan.version == 2 and dry.plan.rescored and not dry.plan.excluded
    lines = [json.loads(line) for line in (tmp_path / "h2-rescore" / "manifest.jsonl").read_text().splitlines()]
    assert all(line["version"] == 2 for line in lines)
    assert {line.get("queued_version", 2) for line in lines} <= {1, 2}
    assert queue.summary() == pending  # a dry run claims nothing
    # excluded: only v2 records, relabeled for real
    h2 = run_harvest(queue, "sisom-diverse", 30, root / "h2", repo, model="digits", stale="exclude", progress=quiet,
                     export=ExportOptions(local_files_root=label_studio.document_root))
    assert len(h2.ids) == 30 and {r.version for r in queue.get(h2.ids)} == {2}
    assert set(h2.plan.excluded) and not set(h2.plan.excluded) & set(h2.ids)
    known_v2 = known_v1 + ["8"]
    config = (root / "h2" / "label_config.xml").read_text()
    assert '<Choice value="8"' in config  # v2's classes
    for export_type in ("JSON_MIN", "CSV"):
        export_path, sent = relabel_in_label_studio(label_studio, root / "h2", queue, known_v2, export_type, tmp_path,
                                                    monkeypatch)
        summary = import_labels(export_path, queue, repo, tmp_path / f"relabeled-2-{export_type}.npz")
        assert imported(summary.out_path) == expected_dataset(sent)
        # old and new records keep their class names: '8' is a known class of v2, no longer a new one
        assert "8" in summary.class_names and "8" not in summary.new_classes
    # the second model was never mixed in, and is still there to harvest on its own
    other = run_harvest(queue, "random", 100, tmp_path / "h-other", repo, model="other", progress=quiet)
    assert {r.model for r in queue.get(other.ids)} == {"other"} and len(other.ids) > 0

"""A queue holding records of two versions (v2 added a class) and of two models: the pool is one model at
its newest version, stale records re-scored with it (or excluded), never mixed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oodguard.datasets import load_dataset
from oodguard.harvest.job import run_harvest
from oodguard.harvest.versions import CalibrationCache, plan_pool
from oodguard.onnx_runner import OnnxModel
from oodguard.queues.sqlite import SQLiteQueue

from .queue_fixture import queue_images


@pytest.fixture
def mixed_queue(digits_two_versions, tmp_path):
    """12 digits queued by v1, 8 by v2, and 5 of another model 'other' (served as v1 of a copy)."""
    import shutil

    repository, _, _ = digits_two_versions
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    shutil.copytree(repo / "digits", repo / "other")
    digits = load_dataset("digits")
    queue = SQLiteQueue(tmp_path / "q.sqlite")
    v1 = queue_images(queue, repo / "digits" / "1", digits.images[:12], "v1")
    v2 = queue_images(queue, repo / "digits" / "2", digits.images[12:20], "v2")
    other = queue_images(queue, repo / "other" / "1", digits.images[20:25], "other", model="other")
    yield queue, repo, v1, v2, other
    queue.close()


def test_stale_records_are_rescored_with_the_newest_version(mixed_queue, digits_export):
    queue, repo, v1, v2, other = mixed_queue
    records = queue.select(state="pending", model="digits")
    assert {r.logits.shape for r in records} == {(8,), (9,)}  # what broke every strategy before
    plan = plan_pool(records, "digits", repo, CalibrationCache(repo))
    assert (plan.model, plan.version, len(plan.records)) == ("digits", 2, 20)
    assert set(plan.rescored) == set(v1) and not plan.excluded
    assert {r.logits.shape for r in plan.records} == {(9,)} and {r.version for r in plan.records} == {2}
    # the re-scored values are v2's outputs on the queued inputs (same preprocessing: inputs unchanged)
    rescored = [r for r in plan.records if r.id in plan.rescored]
    direct = OnnxModel(repo / "digits" / "2" / "model.onnx").run(np.stack([r.input for r in rescored]))
    np.testing.assert_allclose(np.stack([r.logits for r in rescored]), direct["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([r.scores["sisome"] for r in rescored], direct["sisome"], rtol=1e-5, atol=1e-5)
    assert "20 pending records of model 'digits' at version 2 (12 re-scored from version(s) [1])" in plan.describe()


def test_exclude_keeps_only_the_newest_version(mixed_queue):
    queue, repo, v1, v2, other = mixed_queue
    plan = plan_pool(queue.select(state="pending", model="digits"), "digits", repo, CalibrationCache(repo), "exclude")
    assert sorted(r.id for r in plan.records) == sorted(v2)
    assert set(plan.excluded) == set(v1) and set(plan.excluded.values()) == {"queued by version 1 (--stale exclude)"}


def test_records_of_a_version_gone_from_the_repository_are_excluded(mixed_queue):
    import shutil

    queue, repo, v1, v2, other = mixed_queue
    shutil.rmtree(repo / "digits" / "1")
    plan = plan_pool(queue.select(state="pending", model="digits"), "digits", repo, CalibrationCache(repo))
    assert sorted(r.id for r in plan.records) == sorted(v2)
    assert set(plan.excluded.values()) == {"queued by version 1, no longer in the repository"}


def test_harvest_needs_a_model_when_several_are_queued_and_never_mixes_them(mixed_queue, tmp_path):
    queue, repo, v1, v2, other = mixed_queue
    with pytest.raises(ValueError, match=r"several models: digits \(20 pending\), other \(5 pending\); name one with --model"):
        run_harvest(queue, "random", 5, tmp_path / "out0", repo, progress=lambda line: None)
    with pytest.raises(ValueError, match=r"no pending records of model 'nope' \(models with pending records: digits"):
        run_harvest(queue, "random", 5, tmp_path / "out0", repo, model="nope", progress=lambda line: None)
    result = run_harvest(queue, "entropy", 30, tmp_path / "out1", repo, model="other", progress=lambda line: None)
    assert sorted(result.ids) == sorted(other)  # all of 'other', nothing of 'digits'
    result = run_harvest(queue, "margin", 15, tmp_path / "out2", repo, model="digits", progress=lambda line: None)
    assert len(result.ids) == 15 and set(result.ids) <= set(v1) | set(v2)
    lines = [json.loads(line) for line in (tmp_path / "out2" / "manifest.jsonl").read_text().splitlines()]
    names = CalibrationCache(repo).get("digits", 2).class_names
    assert len(names) == 9
    for line in lines:
        assert line["version"] == 2 and line["predicted_name"] == names[line["predicted_class"]]
        assert line.get("rescored", False) == (line["record_id"] in v1)
        assert line.get("queued_version", 2) == (1 if line["record_id"] in v1 else 2)


def test_dry_run_writes_the_selection_but_claims_nothing(mixed_queue, tmp_path):
    queue, repo, v1, v2, other = mixed_queue
    before = queue.summary()
    a = run_harvest(queue, "random", 6, tmp_path / "a", repo, model="digits", seed=1, dry_run=True, progress=lambda l: None)
    b = run_harvest(queue, "entropy", 6, tmp_path / "b", repo, model="digits", dry_run=True, progress=lambda l: None)
    assert queue.summary() == before  # nothing claimed or sent
    assert len(a.ids) == len(b.ids) == 6
    assert len((tmp_path / "a" / "manifest.jsonl").read_text().splitlines()) == 6
    real = run_harvest(queue, "random", 6, tmp_path / "c", repo, model="digits", seed=1, progress=lambda l: None)
    assert real.ids == a.ids  # the same selection, now claimed and sent
    assert queue.stats().sent == 6

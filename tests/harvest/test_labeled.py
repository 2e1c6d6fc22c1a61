import json

import numpy as np

from oodguard.harvest.labeled import labeled_set, resolve
from oodguard.harvest.versions import CalibrationCache

from .queue_fixture import filled_queue

NAMES = [str(c) for c in range(8)]


def test_labels_resolve_to_known_indices_or_unknown():
    assert resolve("3", "", True, NAMES) == 3
    assert resolve("not relevant", "", True, NAMES) == -1
    assert resolve("new class", "2", True, NAMES) == 2  # a new class named like a known one is that one
    assert resolve("new class", "shoe", True, NAMES) == -1
    assert resolve("shoe", "", False, NAMES) == -1 and resolve("5", "", False, NAMES) == 5  # plain CSV


def test_labeled_records_come_back_with_their_queued_features(digits_export, tmp_path):
    queue, truth, repository = filled_queue(digits_export, tmp_path / "q.sqlite", per_kind=6)
    records = queue.select()
    ids = [r.id for r in records]
    # a JSON-MIN export of one round and a plain CSV of a later one (which relabels ids[0])
    (tmp_path / "round1.json").write_text(json.dumps([
        {"record_id": ids[0], "label": "3"}, {"record_id": ids[1], "label": "not relevant"},
        {"record_id": ids[2], "label": "new class", "new_class": "shoe"}, {"record_id": "gone", "label": "1"}]))
    (tmp_path / "round2.csv").write_text(f"record_id,label\n{ids[0]},5\n{ids[3]},unknown\n{ids[4]},7\n")
    queue.mark_sent(queue.claim_ids(ids[:5]))  # harvested records stay in the queue as sent
    cal = CalibrationCache(repository)
    labeled = labeled_set(queue, [tmp_path / "round1.json", tmp_path / "round2.csv"], "digits", repository, cal, NAMES)
    assert labeled.labels.tolist() == [5, 7] and labeled.missing == 1 and labeled.files == 2
    by_id = {r.id: r for r in records}
    np.testing.assert_array_equal(labeled.features, np.stack([by_id[ids[0]].features, by_id[ids[4]].features]))
    np.testing.assert_array_equal(labeled.unknown_features, np.stack([by_id[i].features for i in ids[1:4]]))
    assert labeled.describe() == ("labels: 2 known and 3 unknown labeled records from 2 file(s); 1 labeled id(s) "
                                  "no longer in the queue")

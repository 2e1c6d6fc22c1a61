"""queues/base.py: the record ids every queue hands out, and which records of a put form one request."""

import dataclasses
import time
import uuid

from oodguard.queues.base import new_record_ids, request_runs


def test_record_ids_are_uuid7_hex_carrying_their_time():
    now = time.time()
    ids = new_record_ids(50, now)
    assert len(set(ids)) == 50
    for rid in ids:
        assert len(rid) == 32 and rid == rid.lower() and int(rid, 16) >= 0
        u = uuid.UUID(rid)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert u.int >> 80 == int(now * 1000)  # the first 48 bits: unix milliseconds
    assert new_record_ids(0, now) == []


def test_record_ids_increase_within_a_batch_and_from_batch_to_batch():
    """What keeps the SQLite id index appending: a batch comes sorted, and a later clock gives larger ids (the
    12 bits below the millisecond are its fraction, ~0.24 us steps)."""
    now = 1_800_000_000.0
    first = new_record_ids(200, now)
    assert first == sorted(first)
    later = new_record_ids(200, now + 1e-6)
    assert min(later) > max(first)
    assert min(new_record_ids(5, now + 0.002)) > max(later)
    # the same instant twice: distinct ids (62 random bits), sharing the 64-bit time-and-version prefix
    again = new_record_ids(200, now)
    assert not set(again) & set(first) and {rid[:16] for rid in again + first} == {first[0][:16]}


def test_decisions_json_encodes_shared_thresholds_once_and_equals_plain_json(monkeypatch):
    import json

    from oodguard.queues import base as q

    shared = {"fused": 0.5, "energy": -3.25, "knn": float("inf")}
    other = {"fused": 0.75}
    decisions = [{"ood": True, "reasons": ["threshold"], "thresholds": shared, "p_values": {"fused": 0.001}, "item": 0},
                 {"ood": False, "thresholds": shared, "item": 1},
                 {"thresholds": shared},
                 {"ood": True, "thresholds": other},
                 {"ood": True, "thresholds": {}},
                 {"ood": False}, {}]
    encoded = []
    real = json.dumps
    monkeypatch.setattr(q.json, "dumps", lambda obj, **kw: encoded.append(obj) or real(obj, **kw))
    out = q.decisions_json(decisions)
    assert [json.loads(text) for text in out] == decisions  # the same objects (Infinity included)
    assert sum(obj is shared for obj in encoded) == 1 and sum(obj is other for obj in encoded) == 1


def test_request_runs_are_the_requests_of_a_put_that_may_be_retries():
    from .store_checks import retried

    records = (retried("a") + retried("a") + retried("", items=(0,)) + retried("b", items=(0, 1))
               + retried("b", items=(0,), model="cifar") + [dataclasses.replace(retried("c")[0], decision={})])
    runs = [(r.start, r.stop, r.model, r.request_id, r.items) for r in request_runs(records)]
    assert runs == [(0, 3, "digits", "a", (0, 2, 5)), (3, 6, "digits", "a", (0, 2, 5)),  # a copy: a repeated item
                    (7, 9, "digits", "b", (0, 1)), (9, 10, "cifar", "b", (0,)), (10, 11, "digits", "c", (None,))]
    assert request_runs([]) == []

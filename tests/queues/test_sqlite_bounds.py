"""The SQLite queue's bounds: records (reject, evict-oldest) and bytes, the request rows shared by a request's
records and deleted with the last of them, the byte counter against the rows, and the lines dropped records
leave."""

import sqlite3

from oodguard.queues.base import CLAIMED
from oodguard.queues.sqlite import SQLiteQueue

from .store_checks import (ALIKE_BYTES, alike, assert_one_request_read_back, big_request, check_byte_bound_evict,
                           check_byte_bound_reject, check_drop_lines, own_bytes, record, requests_left)


def test_reject_policy_counts_and_keeps_the_oldest(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_size=5, full_policy="reject")
    first = q.put([record(i) for i in range(4)])
    second = q.put([record(i) for i in range(4, 7)])
    assert all(first) and second[0] is not None and second[1:] == [None, None]
    s = q.stats()
    assert (s.size, s.accepted, s.rejected, s.evicted) == (5, 5, 2, 0)
    # harvested (sent) records do not count towards the bound
    assert q.mark_sent(first[:2]) == 2
    assert all(q.put([record(8), record(9)]))
    s = q.stats()
    assert (s.size, s.sent, s.rejected) == (5, 2, 2)
    assert q.purge_sent() == 2 and q.stats().sent == 0


def test_evict_oldest_policy_drops_oldest_unharvested(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_size=3, full_policy="evict-oldest")
    a = q.put([record(i) for i in range(3)])
    claimed = q.claim(1)
    assert [r.id for r in claimed] == a[:1] and claimed[0].state == CLAIMED
    b = q.put([record(3), record(4)])
    assert all(b)
    s = q.stats()
    assert (s.size, s.evicted, s.rejected, s.claimed, s.pending) == (3, 2, 0, 1, 2)
    # the claimed record survived; the two oldest pending ones went
    assert [r.id for r in q.get(a)] == a[:1]
    # a put larger than the whole queue keeps what fits and refuses the rest (nothing pending is left to evict)
    c = q.put([record(i) for i in range(5, 9)])
    assert c.count(None) == 2 and q.stats().size == 3


def test_a_request_is_stored_once_for_all_its_records(tmp_path):
    path = tmp_path / "q.sqlite"
    SQLiteQueue(path).close()  # close checkpoints the WAL into the file: its size is what is stored
    empty = path.stat().st_size
    originals = big_request()
    q = SQLiteQueue(path)
    ids = q.put(originals)
    q.close()
    grown = path.stat().st_size - empty
    own = sum(own_bytes(r) for r in originals)
    print(f"sqlite: 64 records with 1 MB metadata grew the file by {grown} bytes (records' own bytes {own})")
    assert 1_000_000 < grown < 1_000_000 + 3 * own  # one copy of the metadata (it was 64: > 64 MB)
    q = SQLiteQueue(path)
    assert_one_request_read_back(q, originals, ids)
    q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(DISTINCT request_ref) FROM records").fetchone()[0] == 1


def test_request_rows_go_with_their_last_record(tmp_path):
    path = tmp_path / "q.sqlite"
    q = SQLiteQueue(path, max_size=4, full_policy="evict-oldest")
    a = q.put([alike(0)] * 2)
    q.put([alike(1)] * 2)
    assert requests_left(path) == ["r000", "r001"]
    q.put([alike(2)])  # evicts a[0]: request r000 keeps a[1]
    assert requests_left(path) == ["r000", "r001", "r002"] and [r.request_id for r in q.get(a)] == ["r000"]
    q.put([alike(3)])  # evicts a[1], the last record of r000
    assert requests_left(path) == ["r001", "r002", "r003"]
    b = [r.id for r in q.select(limit=2)]  # r001's records
    assert q.mark_sent(b[:1]) == 1 and q.purge_sent() == 1
    assert requests_left(path) == ["r001", "r002", "r003"]
    assert q.mark_sent(b[1:]) == 1 and q.purge_sent() == 1
    assert requests_left(path) == ["r002", "r003"]
    q.close()


def test_byte_bound_under_reject(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_bytes=3 * ALIKE_BYTES, full_policy="reject")
    check_byte_bound_reject(q)
    q.close()


def test_byte_bound_under_evict_oldest(tmp_path):
    q = SQLiteQueue(tmp_path / "q.sqlite", max_bytes=3 * ALIKE_BYTES + ALIKE_BYTES // 2, full_policy="evict-oldest")
    check_byte_bound_evict(q)
    q.close()


def test_the_byte_counter_matches_the_rows_and_survives_reopen(tmp_path):
    path = tmp_path / "q.sqlite"
    q = SQLiteQueue(path, max_size=6, full_policy="evict-oldest")
    ids = [i for n in range(4) for i in q.put(big_request(3)[:1] + [alike(n), alike(n)])]
    q.claim(2)
    q.release(ids[:1])
    q.mark_sent(ids[-4:-1])
    expected = q.stats().bytes
    q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT SUM(bytes) FROM records WHERE state != 'sent'").fetchone()[0] == expected
    assert SQLiteQueue(path).stats().bytes == expected > 0


def test_the_byte_counter_matches_the_rows_after_deletes(tmp_path):
    path = tmp_path / "q.sqlite"
    q = SQLiteQueue(path, max_size=6, full_policy="evict-oldest")
    ids = [i for n in range(4) for i in q.put(big_request(3)[:1] + [alike(n), alike(n)])]
    q.claim(2)
    q.mark_sent(ids[-4:-1])
    assert q.delete(ids[::2]) == 3  # some of them were evicted already
    expected = q.stats().bytes
    q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT SUM(bytes) FROM records WHERE state != 'sent'").fetchone()[0] == expected
    q = SQLiteQueue(path)
    assert q.stats().bytes == expected > 0 and q.stats().evicted == 6
    q.close()


def test_evictions_and_refusals_leave_rate_limited_lines(tmp_path, caplog):
    made = []

    def make(policy):
        made.append(SQLiteQueue(tmp_path / f"q{len(made)}.sqlite", max_size=2, full_policy=policy))
        return made[-1]

    check_drop_lines(make, caplog, "oodguard.queues.sqlite")

"""The queue metrics during a store outage: a scrape never waits on the store's statistics (a stand-in queue
whose statistics hang or fail, a real Redis stopped or frozen), slow statistics are read less often, and the
spool backlog and reachability come from the queue's own memory."""

from __future__ import annotations

import os
import signal
import time

from oodguard.queues.redis_streams import RedisQueue
from queues.store_checks import record

from .metrics_helpers import StubQueue, bound_metrics, maybe, scrape, scrape_until, timed_scrape, value


#: the families that come from the store's statistics (absent while they cannot be read)
STORE_STATS = ("oodguard_queue_size", "oodguard_queue_pending", "oodguard_queue_max_size", "oodguard_queue_bytes",
               "oodguard_queue_max_bytes", "oodguard_queue_accepted", "oodguard_queue_rejected",
               "oodguard_queue_evicted")


def test_a_scrape_never_waits_on_hung_queue_statistics(serve_metrics):
    queue = StubQueue()
    queue.responsive.clear()  # the first read hangs
    metrics = bound_metrics(queue, interval_s=0.05)  # a read is stuck after 3 intervals: 0.15 s
    port = serve_metrics(metrics)
    took, fam = timed_scrape(port)
    assert took < 0.5
    # the spool backlog and reachability come from the queue's memory: there, with the right values
    assert value(fam, "oodguard_queue_spool_backlog") == 7 and value(fam, "oodguard_queue_reachable") == 0
    assert value(fam, "oodguard_queue_stats_up") == 0 and not set(STORE_STATS) & set(fam)

    queue.responsive.set()
    fam = scrape_until(port, lambda f: maybe(f, "oodguard_queue_stats_up") == 1, what="stats up")
    assert (value(fam, "oodguard_queue_size"), value(fam, "oodguard_queue_pending"),
            value(fam, "oodguard_queue_max_size")) == (12, 10, 100)
    assert (value(fam, "oodguard_queue_bytes"), value(fam, "oodguard_queue_max_bytes")) == (3456, 1_000_000)
    assert (value(fam, "oodguard_queue_accepted_total"), value(fam, "oodguard_queue_rejected_total"),
            value(fam, "oodguard_queue_evicted_total")) == (40, 3, 1)
    assert value(fam, "oodguard_queue_spool_backlog") == 7

    def seconds_until_down() -> float:
        """Hang the store; seconds until the scrapes say stats down (each scrape under 0.5 s, no stale values)."""
        queue.responsive.clear()
        hung_at = time.monotonic()
        while True:
            took, fam = timed_scrape(port)
            assert took < 0.5
            if value(fam, "oodguard_queue_stats_up") == 0:
                assert not set(STORE_STATS) & set(fam) and value(fam, "oodguard_queue_spool_backlog") == 7
                return time.monotonic() - hung_at
            assert time.monotonic() - hung_at < 2.0, "statistics still up 2 s into a hung read"

    # a read that hangs: stats down once it is stuck (about one interval to start + 3 intervals)
    assert seconds_until_down() < 1.0
    # the hang ends (that read succeeds after 0.3 s): up at once, and the next hang is seen as soon (one slow
    # read does not make the reads rarer)
    time.sleep(0.3)
    queue.responsive.set()
    scrape_until(port, lambda f: maybe(f, "oodguard_queue_stats_up") == 1, timeout_s=1.0, what="stats up")
    assert seconds_until_down() < 1.0

    # a read that fails: down at once, and up again once the store answers
    queue.fail = True
    queue.responsive.set()
    time.sleep(0.2)
    assert value(scrape(port)[1], "oodguard_queue_stats_up") == 0
    queue.fail = False  # (a failed read does not slow the reads down: the next one comes after 0.05 s)
    scrape_until(port, lambda f: maybe(f, "oodguard_queue_size") == 12, timeout_s=1.0, what="stats back")

    thread = metrics._state.stats._thread
    metrics.stop_server()
    assert not thread.is_alive()  # the statistics thread stops with the endpoint


def test_slow_queue_statistics_are_read_less_often():
    # a read of 0.1 s (SQLite counting 100k records holds the queue's lock that long) comes at most every
    # 0.1 / QUEUE_STATS_MAX_DUTY = 2 s, however short the minimum interval, and stays up meanwhile
    queue = StubQueue(read_s=0.1)
    metrics = bound_metrics(queue, interval_s=0.01)
    metrics._state.stats.start()
    try:
        time.sleep(1.5)
        assert queue.reads == 1
        assert metrics.registry.get_sample_value("oodguard_queue_stats_up") == 1
        assert metrics.registry.get_sample_value("oodguard_queue_size") == 12
    finally:
        metrics._state.stats.close()


def test_spool_backlog_and_reachability_while_redis_is_stopped(redis_server, tmp_path, serve_metrics):
    queue = RedisQueue(redis_server.url, tmp_path / "spool", connect_retry_s=0.1)
    try:
        metrics = bound_metrics(queue, interval_s=0.1)
        port = serve_metrics(metrics)
        assert all(queue.put([record(i) for i in range(2)]))
        scrape_until(port, lambda f: maybe(f, "oodguard_queue_size") == 2, what="2 records in Redis")

        redis_server.stop()
        assert all(queue.put([record(i) for i in range(2, 5)]))  # acknowledged into the local spool
        fam = scrape_until(port, lambda f: maybe(f, "oodguard_queue_stats_up") == 0, what="stats down")
        took, fam = timed_scrape(port)
        assert took < 0.5
        assert value(fam, "oodguard_queue_spool_backlog") == 3 and value(fam, "oodguard_queue_reachable") == 0
        assert not set(STORE_STATS) & set(fam)  # no stale store statistics

        redis_server.start()  # the spool drains into Redis
        fam = scrape_until(port, lambda f: maybe(f, "oodguard_queue_size") == 5, timeout_s=20, what="spool replayed")
        assert value(fam, "oodguard_queue_spool_backlog") == 0 and value(fam, "oodguard_queue_reachable") == 1
        assert value(fam, "oodguard_queue_stats_up") == 1
    finally:
        queue.close()


def test_a_scrape_is_fast_while_redis_hangs(redis_server, tmp_path, serve_metrics):
    queue = RedisQueue(redis_server.url, tmp_path / "spool", connect_retry_s=0.1)
    try:
        metrics = bound_metrics(queue, interval_s=0.2)
        port = serve_metrics(metrics)
        assert all(queue.put([record(0)]))
        scrape_until(port, lambda f: maybe(f, "oodguard_queue_size") == 1, what="the record in Redis")
        os.kill(redis_server.process.pid, signal.SIGSTOP)  # Redis accepts connections but never answers
        try:
            frozen_at = time.monotonic()
            durations = []
            while True:
                took, fam = timed_scrape(port)
                durations.append(took)
                if value(fam, "oodguard_queue_stats_up") == 0:
                    break
                assert time.monotonic() - frozen_at < 3.0, "statistics still up 3 s into a hung Redis"
            assert max(durations) < 0.5 and maybe(fam, "oodguard_queue_size") is None
            assert value(fam, "oodguard_queue_spool_backlog") == 0
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        scrape_until(port, lambda f: maybe(f, "oodguard_queue_stats_up") == 1, what="stats back")
    finally:
        queue.close()

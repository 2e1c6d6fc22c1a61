"""The Redis Streams queue's idempotency: a retried request stored once within the window (its ``P:rid`` key
kept for the window), again after it, none with the check off."""

from __future__ import annotations

import redis

from oodguard.queues.redis_streams import DEFAULT_PREFIX

from .redis_helpers import make_queue
from .store_checks import check_retried_requests_are_stored_once, check_the_retry_window


def test_a_retried_request_is_stored_once(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path, idempotency_window_s=600)
    check_retried_requests_are_stored_once(q)
    client = redis.Redis.from_url(redis_server.url)
    key = f"{DEFAULT_PREFIX}:rid:digits:r2"
    assert set(client.hkeys(key)) == {b"0", b"2", b"5"} and 0 < client.pttl(key) <= 600_000
    client.close()
    q.close()


def test_a_retry_after_the_window_is_stored_again(redis_server, tmp_path):
    made = []

    def make(window_s):
        made.append(make_queue(redis_server, tmp_path, spool=f"spool{len(made)}", key_prefix=f"q{len(made)}",
                               idempotency_window_s=window_s))
        return made[-1]

    check_the_retry_window(make)
    client = redis.Redis.from_url(redis_server.url)
    keys = set(client.keys("q*:rid:*"))  # q1's key (0.5 s window) may have expired by now
    assert b"q0:rid:digits:r1" in keys and not any(k.startswith(b"q2:") for k in keys)  # none with the check off
    assert 0 < client.pttl("q0:rid:digits:r1") <= 600_000  # kept for the window
    client.close()

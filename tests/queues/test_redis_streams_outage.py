"""The Redis Streams queue while Redis is down or hangs: ``local_state`` answers at once, puts stop trying a
paused Redis until the replay thread finds it back, and puts wait on Redis for a timeout of their own."""

from __future__ import annotations

import collections
import signal
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from oodguard.queues.base import LocalQueueState
from oodguard.queues.factory import open_queue
from oodguard.queues.redis_streams import RedisQueue

from .redis_helpers import make_queue, stream_ids, wait_for
from .store_checks import record


def timed_local_state(q):
    start = time.monotonic()
    state = q.local_state()
    return state, time.monotonic() - start


def test_local_state_during_an_outage(redis_server, tmp_path):
    q = make_queue(redis_server, tmp_path)
    q.put([record(0)])
    assert q.local_state() == LocalQueueState(spool_backlog=0, reachable=True)
    redis_server.stop()
    q.put([record(1), record(2)])
    state, took = timed_local_state(q)
    assert state == LocalQueueState(spool_backlog=2, reachable=False) and took < 0.1
    redis_server.start()
    wait_for(lambda: q.local_state() == LocalQueueState(spool_backlog=0, reachable=True), what="the replay")
    q.close()


def test_local_state_answers_while_redis_hangs(redis_server, tmp_path):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=1.0, retry=Retry(NoBackoff(), 0), retry_on_error=[])
    q = RedisQueue(client, tmp_path / "spool", connect_retry_s=0.1)
    first = q.put([record(0)])
    redis_server.process.send_signal(signal.SIGSTOP)  # Redis accepts connections but answers nothing
    try:
        done = []
        writer = threading.Thread(target=lambda: done.append(q.put([record(1)])))
        writer.start()
        time.sleep(0.3)  # the put waits on Redis
        assert not done
        state, took = timed_local_state(q)
        assert took < 0.1 and state.spool_backlog == 0
        writer.join(10)  # the put times out and spools
        assert done and all(done[0])
        state, took = timed_local_state(q)
        assert state == LocalQueueState(spool_backlog=1, reachable=False) and took < 0.1
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    wait_for(lambda: q.local_state() == LocalQueueState(spool_backlog=0, reachable=True), what="the replay")
    # exactly once, though the stopped Redis may have run the timed-out put after all when it resumed
    assert stream_ids(redis_server) == collections.Counter(first + done[0])
    q.close()


def test_puts_skip_a_paused_redis_until_it_answers_again(redis_server, tmp_path):
    """Decided by what reached Redis, not by how long a put took (a loaded machine slows every call): while Redis is
    paused, only the first put tries it (and waits out its own short timeout); the others go to the spool."""
    q = make_queue(redis_server, tmp_path)  # puts wait at most 0.5 s (the default), other calls 5 s
    first = q.put([record(0)])
    tried = []  # puts that went to Redis (the replay thread's calls use the other client)
    run_put = q._run_put

    def counting(*args, client=None, **kwargs):
        if client is q._put_redis:
            tried.append(1)
        return run_put(*args, client=client, **kwargs)

    q._run_put = counting
    redis_server.process.send_signal(signal.SIGSTOP)  # Redis accepts connections but answers nothing
    spooled = []
    try:
        for n in range(1, 11):
            spooled += q.put([record(n), record(n + 100, flagged=False)])
            time.sleep(0.15)  # longer than connect_retry_s (0.1): a put that tried Redis again after it would count
        assert len(tried) == 1, tried  # the first put found Redis unreachable; the other nine spooled at once
        assert all(spooled) and q.spool.backlog == len(spooled)
        assert q.local_state() == LocalQueueState(spool_backlog=len(spooled), reachable=False)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    wait_for(lambda: q.local_state() == LocalQueueState(spool_backlog=0, reachable=True), what="the replay")
    # exactly once, though the stopped Redis ran the timed-out put when it resumed
    assert stream_ids(redis_server) == collections.Counter(first + spooled)
    # puts use Redis again
    more = q.put([record(999)])
    assert q.spool.backlog == 0 and stream_ids(redis_server)[more[0]] == 1
    # with nothing to replay, the probe is a PING
    q._reachable, q._down = False, True
    q._wake.set()
    wait_for(lambda: q.local_state().reachable and not q._down, what="the probe")
    assert q.put([record(1000)])[0] in stream_ids(redis_server) and q.spool.backlog == 0
    q.close()


def test_a_put_timeout_of_its_own_leaves_other_calls_theirs(redis_server, tmp_path):
    q = open_queue(redis_server.url + "?socket_timeout=4&put_timeout_s=0.25", spool_path=tmp_path / "spool",
                   idempotency_window_s=30)
    try:
        puts = q._put_redis.connection_pool.connection_kwargs
        others = q.redis.connection_pool.connection_kwargs
        assert (puts["socket_timeout"], puts["socket_connect_timeout"], others["socket_timeout"]) == (0.25, 0.25, 4.0)
        assert q.put([record(0)])[0] in stream_ids(redis_server) and q.idempotency_window_s == 30
    finally:
        q.close()
    q = open_queue(f"sqlite:///{tmp_path / 'q.sqlite'}", idempotency_window_s=30)
    assert q.idempotency_window_s == 30
    q.close()
    with pytest.raises(ValueError, match="put_timeout_s"):
        open_queue(redis_server.url + "?put_timeout_s=soon", spool_path=tmp_path / "spool")

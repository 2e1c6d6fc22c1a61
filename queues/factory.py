"""Open a query queue from a URL.

- ``sqlite:///PATH``: the SQLite queue in the file PATH, as SQLAlchemy writes it: three slashes and a
  relative path (``sqlite:///q.sqlite`` is ``q.sqlite`` in the working directory), four for an absolute one
  (``sqlite:////var/lib/oodguard/q.sqlite``). ``sqlite://x`` (two slashes) and ``sqlite://`` are errors
  that say what to write instead. Logs show the resolved absolute path (:func:`describe_url`).
- ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://`` for TLS): the Redis Streams queue, with
  its spool file at ``spool_path``. Extra query parameters of the queue (removed before the URL goes to
  redis-py, which takes the rest, e.g. ``socket_timeout``): ``key_prefix`` (default ``oodguard:queue``),
  ``inline_max_bytes`` (default 262144), ``spool`` (overrides ``spool_path``), ``put_timeout_s`` (default 0.5:
  the longest a put waits for Redis before it spools). Gateway worker ``i`` of
  ``oodguard serve --workers N`` spools to its own file (:func:`~oodguard.queues.spool.worker_spool_path`);
  worker 0 first takes over the spools of worker indexes ``>= N``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .base import DEFAULT_MAX_BYTES, QueryQueue

SCHEMES = ("sqlite", "redis", "rediss")
REDIS_QUEUE_PARAMS = ("key_prefix", "inline_max_bytes", "spool", "put_timeout_s")
NO_FILE = "write sqlite:///queue.sqlite (a file in the working directory) or sqlite:////absolute/path/queue.sqlite"


def url_scheme(url: str) -> str:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(f"queue URL {url!r}: expected sqlite:///PATH (relative to the working directory), "
                         "sqlite:////ABSOLUTE/PATH or redis://HOST:PORT/DB")
    return scheme


def sqlite_path(url: str) -> Path:
    """The absolute path of the file a ``sqlite:`` URL names (see the module docstring); ValueError saying
    what to write for a URL of another form."""
    rest = url.partition("://")[2]
    if not rest.startswith("/"):  # sqlite://x: SQLAlchemy would read x as a host
        if not rest:
            raise ValueError(f"queue URL {url!r} names no file: {NO_FILE}")
        raise ValueError(f"queue URL {url!r} has two slashes: write sqlite:///{rest} for "
                         f"{os.path.abspath(rest)} (relative to the working directory) or sqlite:////{rest} "
                         f"(four slashes) for /{rest}")
    path = rest[1:]
    if not path:
        raise ValueError(f"queue URL {url!r} names no file: {NO_FILE}")
    if "?" in path:
        raise ValueError(f"queue URL {url!r}: the SQLite queue takes no query parameters")
    return Path(os.path.abspath(path))


def split_redis_url(url: str) -> tuple[str, dict[str, str]]:
    """(the URL for redis-py, the queue's own query parameters)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in REDIS_QUEUE_PARAMS}
    rest = [(k, v) for k, v in query if k not in REDIS_QUEUE_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(rest))), ours


def open_queue(url: str, *, max_size: int = 100_000, full_policy: str = "reject",
               spool_path: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
               create: bool = True, worker: int = 0, workers: int = 1, idempotency_window_s: float = 0.0) -> QueryQueue:
    """The queue that ``url`` names (see the module docstring), bounded to ``max_size`` unharvested records
    and ``max_bytes`` of them. ``create=False`` (every command but ``serve``): a SQLite file that does not
    exist is a :class:`FileNotFoundError` naming its absolute path, and nothing is created (a Redis queue
    needs no file). ``worker`` / ``workers``: this gateway worker's index and how many run (the Redis spool file).
    ``idempotency_window_s``: how long a request's records answer for a retry of it (0: off; see
    :mod:`oodguard.queues.base`; the gateway passes its setting)."""
    scheme = url_scheme(url)
    if scheme == "sqlite":
        from .sqlite import SQLiteQueue

        path = sqlite_path(url)
        if not create and not path.exists():
            raise FileNotFoundError(f"no queue at {path} (from {url}); the gateway creates it on first start")
        return SQLiteQueue(path, max_size=max_size, full_policy=full_policy, max_bytes=max_bytes, create=create,
                           idempotency_window_s=idempotency_window_s)

    from .redis_streams import DEFAULT_INLINE_MAX_BYTES, DEFAULT_PREFIX, DEFAULT_PUT_TIMEOUT_S, RedisQueue
    from .spool import adopt_orphan_spools, worker_spool_path

    client_url, params = split_redis_url(url)
    spool = params.get("spool") or spool_path
    if not spool:
        raise ValueError(f"queue URL {url!r}: the Redis queue needs a spool file (queue_spool_path)")
    try:
        inline = int(params.get("inline_max_bytes", DEFAULT_INLINE_MAX_BYTES))
    except ValueError:
        raise ValueError(f"queue URL {url!r}: inline_max_bytes must be an integer") from None
    try:
        put_timeout = float(params.get("put_timeout_s", DEFAULT_PUT_TIMEOUT_S))
    except ValueError:
        raise ValueError(f"queue URL {url!r}: put_timeout_s must be a number") from None
    if worker == 0:
        adopt_orphan_spools(spool, workers)
    spool = worker_spool_path(spool, worker)
    return RedisQueue(client_url, Path(spool), max_size=max_size, full_policy=full_policy, max_bytes=max_bytes,
                      key_prefix=params.get("key_prefix") or DEFAULT_PREFIX, inline_max_bytes=inline,
                      put_timeout_s=put_timeout, idempotency_window_s=idempotency_window_s)


@contextlib.contextmanager
def open_existing(url: str):
    """The existing queue at ``url``, closed afterwards, for the commands that read it (harvest, labels import,
    ``oodguard queue``): a SQLite file that does not exist is an error naming its absolute path, and is not
    created (only ``serve`` creates the queue). They never put records, so the spool file the Redis queue requires
    stays empty; it lives in a temporary folder removed on exit."""
    with tempfile.TemporaryDirectory(prefix="oodguard-queue-") as spool_dir:
        queue = open_queue(url, spool_path=Path(spool_dir) / "spool", create=False)
        try:
            yield queue
        finally:
            queue.close()


def describe_url(url: str) -> str:
    """The URL for logs: a SQLite URL with its resolved absolute path (``sqlite:////abs/q.sqlite``), a Redis URL
    without its password."""
    if url.partition("://")[0].lower() == "sqlite":
        try:
            return f"sqlite:///{sqlite_path(url)}"
        except ValueError:
            return url
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    return url


__all__ = ["open_queue", "url_scheme", "sqlite_path", "split_redis_url", "describe_url", "SCHEMES"]

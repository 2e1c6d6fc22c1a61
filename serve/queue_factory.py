"""Open a query queue from a URL.

- ``sqlite://PATH``: the SQLite queue in the file PATH (``sqlite:///var/q.sqlite`` is the absolute
  ``/var/q.sqlite``, ``sqlite://q.sqlite`` is relative to the working directory).
- ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://`` for TLS): the Redis Streams queue, with
  its spool file at ``spool_path``. Extra query parameters of the queue (removed before the URL goes to
  redis-py, which takes the rest, e.g. ``socket_timeout``): ``key_prefix`` (default ``oodguard:queue``),
  ``inline_max_bytes`` (default 262144), ``spool`` (overrides ``spool_path``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .queue import DEFAULT_MAX_BYTES, QueryQueue

SCHEMES = ("sqlite", "redis", "rediss")
REDIS_QUEUE_PARAMS = ("key_prefix", "inline_max_bytes", "spool")


def url_scheme(url: str) -> str:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(f"queue URL {url!r}: expected sqlite:///PATH or redis://HOST:PORT/DB")
    return scheme


def split_redis_url(url: str) -> tuple[str, dict[str, str]]:
    """(the URL for redis-py, the queue's own query parameters)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in REDIS_QUEUE_PARAMS}
    rest = [(k, v) for k, v in query if k not in REDIS_QUEUE_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(rest))), ours


def open_queue(url: str, *, max_size: int = 100_000, full_policy: str = "reject",
               spool_path: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> QueryQueue:
    """The queue that ``url`` names (see the module docstring), bounded to ``max_size`` unharvested records
    and ``max_bytes`` of them."""
    scheme = url_scheme(url)
    if scheme == "sqlite":
        from .sqlite_queue import SQLiteQueue

        path = url[len("sqlite://"):]
        if not path:
            raise ValueError(f"queue URL {url!r} names no file")
        return SQLiteQueue(Path(path), max_size=max_size, full_policy=full_policy, max_bytes=max_bytes)

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from .redis_queue import DEFAULT_INLINE_MAX_BYTES, DEFAULT_PREFIX, RedisQueue

    client_url, params = split_redis_url(url)
    spool = params.get("spool") or spool_path
    if not spool:
        raise ValueError(f"queue URL {url!r}: the Redis queue needs a spool file (queue_spool_path)")
    try:
        inline = int(params.get("inline_max_bytes", DEFAULT_INLINE_MAX_BYTES))
    except ValueError:
        raise ValueError(f"queue URL {url!r}: inline_max_bytes must be an integer") from None
    client = redis.Redis.from_url(client_url, socket_connect_timeout=2.0, socket_timeout=5.0,
                                  retry=Retry(NoBackoff(), 0), retry_on_error=[])
    return RedisQueue(client, Path(spool), max_size=max_size, full_policy=full_policy, max_bytes=max_bytes,
                      key_prefix=params.get("key_prefix") or DEFAULT_PREFIX, inline_max_bytes=inline)


def describe_url(url: str) -> str:
    """The URL without a password, for logs."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    return url


__all__ = ["open_queue", "url_scheme", "split_redis_url", "describe_url", "SCHEMES"]

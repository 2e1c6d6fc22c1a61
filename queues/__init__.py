"""The active-learning query queue: what the gateway writes flagged inputs into and harvest reads them from.

:mod:`.base` is the interface every store implements (:class:`QueryQueue`) and the record types; :mod:`.sqlite`
and :mod:`.redis_streams` are the stores (one SQLite file; Redis Streams with a local :mod:`.spool` while Redis
is unreachable), both storing records as :mod:`.codec` packs them. The SQLite store's file layout is
:mod:`.sqlite_schema`, its put transaction :mod:`.sqlite_insert`; the Redis store's keys and Lua scripts are
:mod:`.redis_scripts`, its stream entries :mod:`.redis_entries`. :mod:`.writer` batches the gateway's puts off
its event loop; :mod:`.factory` opens a store from its URL (``sqlite:///PATH``, ``redis://HOST:PORT/DB``).
"""

from .base import NewRecord, QueryQueue, QueueError, QueueRecord
from .factory import open_queue

__all__ = ["NewRecord", "QueryQueue", "QueueError", "QueueRecord", "open_queue"]

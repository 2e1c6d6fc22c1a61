"""A crash-safe local spool: records acknowledged while their store cannot take them, kept on disk until it can.

One file of frames, one per append: ``b"OGSP" | u32 length | u32 crc32 | payload``; payload = the records,
then the request payloads, each a list: u32 count, then per element u32 item count and items each as u32
length + bytes; a record's items are ``id, flag, blob, field, value, ...``, a request's ``key, request_id,
metadata``; a frame of the first format ends after its records, whose request travels inline as fields. An
append is ``fsync``ed before it returns; a torn last frame (a crash during an append, never acknowledged) is
dropped when the spool is opened; frames are cut off the front only once their store accepted them
(:meth:`Spool.drop_prefix`). One spool file belongs to one process: with ``oodguard serve --workers N`` worker
``i`` has its own (:func:`worker_spool_path`), and worker 0 takes over the spools of worker indexes that no
longer run (:func:`adopt_orphan_spools`). The Redis Streams store (:mod:`oodguard.queues.redis_streams`) uses it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Sequence

from .base import QueueError

log = logging.getLogger("oodguard.queues.spool")

SPOOL_MAGIC = b"OGSP"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32
_U32 = struct.Struct("<I")

SpoolRecord = list  # [id, flag, blob, field, value, ...] as bytes
SpoolRequest = list  # [key, request_id, metadata JSON] as bytes


def _encode_lists(lists: Sequence[list]) -> list[bytes]:
    parts = [_U32.pack(len(lists))]
    for items in lists:
        parts.append(_U32.pack(len(items)))
        for item in items:
            parts.append(_U32.pack(len(item)))
            parts.append(item)
    return parts


def _encode_frame(records: Sequence[SpoolRecord], requests: Sequence[SpoolRequest]) -> bytes:
    payload = b"".join(_encode_lists(records) + _encode_lists(requests))
    return _HEADER.pack(SPOOL_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> tuple[list[SpoolRecord], list[SpoolRequest]]:
    """(records, request payloads); a frame of the first format ends after its records (no requests)."""
    pos = 0

    def u32() -> int:
        nonlocal pos
        (value,) = _U32.unpack_from(payload, pos)
        pos += 4
        return value

    def lists() -> list[list]:
        nonlocal pos
        out = []
        for _ in range(u32()):
            items = []
            for _ in range(u32()):
                length = u32()
                items.append(payload[pos:pos + length])
                pos += length
            out.append(items)
        return out

    records = lists()
    return records, lists() if pos < len(payload) else []


def _read_frames(data: bytes) -> tuple[int, list[tuple[int, list[SpoolRecord], list[SpoolRequest]]]]:
    """The valid frames at the start of ``data`` as (end offset, records, requests), and where the last one
    ends (a torn or corrupt frame ends the scan)."""
    pos, frames = 0, []
    while pos + _HEADER.size <= len(data):
        magic, length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        if magic != SPOOL_MAGIC or start + length > len(data):
            break
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            break
        pos = start + length
        frames.append((pos, *_decode_payload(payload)))
    return pos, frames


class Spool:
    """An append-only, fsync'd file of put batches that Redis could not take. Thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._open()
        data = self._read_all()
        end, frames = _read_frames(data)
        if end < len(data):  # a torn frame: its put never returned, so nobody holds its ids
            log.warning("spool %s: dropping %d bytes of an incomplete frame at the end", self.path, len(data) - end)
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        self.backlog = sum(len(records) for _, records, _ in frames)  # records waiting in the spool

    def _open(self) -> None:
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if created:
            _fsync_dir(self.path.parent)

    def _read_all(self) -> bytes:
        size = os.fstat(self._fd).st_size
        return os.pread(self._fd, size, 0) if size else b""

    def append(self, records: Sequence[SpoolRecord], requests: Sequence[SpoolRequest]) -> None:
        frame = _encode_frame(records, requests)
        with self._lock:
            if self._fd is None:
                raise QueueError(f"spool {self.path} is closed")
            before = os.fstat(self._fd).st_size
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except OSError as exc:
                try:
                    os.ftruncate(self._fd, before)
                except OSError:
                    pass
                raise QueueError(f"spool {self.path}: {exc}") from exc
            self.backlog += len(records)

    def snapshot(self) -> list[tuple[int, list[SpoolRecord], list[SpoolRequest]]]:
        """The frames the spool holds now, as (end offset, records, request payloads)."""
        with self._lock:
            if self._fd is None:
                raise QueueError(f"spool {self.path} is closed")
            return _read_frames(self._read_all())[1]

    def drop_prefix(self, offset: int, records: int) -> None:
        """Remove the first ``offset`` bytes (frames holding ``records`` records) once they are in Redis."""
        if offset <= 0:
            return
        with self._lock:
            if self._fd is None:
                return
            size = os.fstat(self._fd).st_size
            if size == offset:
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
            else:  # frames appended meanwhile: rewrite them into a fresh file, atomically
                tail = os.pread(self._fd, size - offset, offset)
                tmp = self.path.with_name(self.path.name + ".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    view = memoryview(tail)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
                _fsync_dir(self.path.parent)
                os.close(self._fd)
                self._open()
            self.backlog = max(0, self.backlog - records)

    def absorb(self, other: Path) -> int:
        """Append the valid frames of the spool file ``other`` (whose process is gone) and delete it; returns
        the records taken over. A crash between the append and the delete leaves those frames in both files:
        both are replayed, and dedup by id makes the second harmless."""
        data = Path(other).read_bytes()
        end, frames = _read_frames(data)
        with self._lock:
            if self._fd is None:
                raise QueueError(f"spool {self.path} is closed")
            view = memoryview(data)[:end]
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
            taken = sum(len(records) for _, records, _ in frames)
            self.backlog += taken
        os.unlink(other)
        _fsync_dir(self.path.parent)
        return taken

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def worker_spool_path(path: str | Path, worker: int) -> Path:
    """The spool file of gateway worker ``worker``: the plain path for worker 0 (and a single process),
    ``<path>.w<worker>`` for the others."""
    path = Path(path)
    return path if worker == 0 else path.with_name(f"{path.name}.w{worker}")


def adopt_orphan_spools(path: str | Path, workers: int) -> int:
    """Move the records of worker spools ``<path>.w<i>`` with ``i >= workers`` (no worker of this start owns
    them) into the spool at ``path`` (worker 0's); returns the records moved. Call before the queue opens it."""
    path = Path(path)
    orphans = []
    for other in path.parent.glob(f"{path.name}.w*"):
        index = other.name[len(path.name) + 2:]
        if index.isdigit() and int(index) >= max(workers, 1):
            orphans.append(other)
    if not orphans:
        return 0
    spool = Spool(path)
    try:
        taken = sum(spool.absorb(other) for other in sorted(orphans))
    finally:
        spool.close()
    log.info("spool %s: took over %d record(s) from %d spool(s) of workers that no longer run", path, taken,
             len(orphans))
    return taken


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["Spool", "SpoolRecord", "SpoolRequest", "SPOOL_MAGIC", "worker_spool_path", "adopt_orphan_spools"]

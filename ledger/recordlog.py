"""An append-only file of checksummed records, repaired at open when its tail is torn.

Each record on disk is::

    magic  b"MFR1"          4 bytes
    length big-endian u32   4 bytes, the payload size in bytes
    digest SHA-256(payload) 32 bytes
    payload                 `length` bytes

``append`` and ``append_batch`` return only after ``fsync``; a batch is one
``write`` and one ``fsync`` (group commit). A log whose ``sync_appends`` is
set to False returns from appends once the bytes are written (they survive a
process crash, not a machine crash) and makes them durable at ``sync`` or
``close``: for files whose contents can be rebuilt from another durable log.

At open the file is scanned: a last record that is incomplete or fails its
checksum (a write torn by a crash) is cut off and reported through
``RecordLog.repair`` and one warning log line. A bad record followed by a
valid one cannot come from a torn append, so it raises ``CorruptLogError``
instead of discarding acknowledged data.

Known shortcoming: the whole file is read into memory once at open, so opening
costs memory proportional to the file size (fine for ledgers of tens of MB).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

MAGIC = b"MFR1"
_HEADER = struct.Struct(">4sI32s")
HEADER_SIZE = _HEADER.size
MAX_RECORD = 1 << 30


class CorruptLogError(Exception):
    """A record in the middle of a log file is damaged; valid records follow it."""


@dataclass(frozen=True)
class TailRepair:
    """What was cut off a log file at open: its path, byte offset and size."""

    path: str
    offset: int
    dropped_bytes: int
    reason: str

    def describe(self) -> str:
        return (
            f"{self.path}: dropped {self.dropped_bytes} bytes at offset "
            f"{self.offset} ({self.reason})"
        )


def encode_record(payload: bytes) -> bytes:
    """Return the on-disk bytes of one record holding ``payload``."""
    if len(payload) > MAX_RECORD:
        raise ValueError(
            f"record of {len(payload)} bytes exceeds the {MAX_RECORD}-byte limit"
        )
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(MAGIC, len(payload), digest) + payload


def _parse_at(data: bytes | memoryview, offset: int) -> tuple[bytes | None, str]:
    """Parse the record starting at ``offset``: (payload, "") or (None, why not)."""
    if len(data) - offset < HEADER_SIZE:
        return None, "incomplete header"
    magic, length, digest = _HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        return None, "bad magic"
    end = offset + HEADER_SIZE + length
    if end > len(data):
        return None, f"record of {length} bytes runs past the end of file"
    payload = bytes(data[offset + HEADER_SIZE : end])
    if hashlib.sha256(payload).digest() != digest:
        return None, "checksum mismatch"
    return payload, ""


def _valid_record_after(data: bytes, offset: int) -> int | None:
    """Offset of the first parseable record starting after ``offset``, if any."""
    pos = data.find(MAGIC, offset + 1)
    while pos != -1:
        payload, _ = _parse_at(data, pos)
        if payload is not None:
            return pos
        pos = data.find(MAGIC, pos + 1)
    return None


def scan(data: bytes) -> tuple[list[tuple[int, bytes]], int, str]:
    """Parse records from ``data``: (records as (offset, payload), end, why stopped).

    ``end`` is the offset just past the last valid record; the reason is empty
    when the whole of ``data`` parsed.
    """
    records: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        payload, why = _parse_at(data, offset)
        if payload is None:
            return records, offset, why
        records.append((offset, payload))
        offset += HEADER_SIZE + len(payload)
    return records, offset, ""


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after create or rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class RecordLog:
    """An open append-only record file.

    Attributes:
        path: the file.
        repair: the ``TailRepair`` done at open, or None when the file was intact.
        offsets: byte offset of every record, in order.
        sync_appends: True (default): every append is fsynced before it
            returns; False: appends are fsynced only at ``sync`` or ``close``
            (truncate and rewrite always sync).
    """

    def __init__(self, path: str | Path, *, repair: bool = True) -> None:
        """Open (creating if absent) and scan ``path``.

        With ``repair=False`` a torn tail raises ``CorruptLogError`` instead of
        being cut, so read-only checks never modify the file.
        """
        self.path = Path(path)
        self.repair: TailRepair | None = None
        self.sync_appends = True
        self._unsynced = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if created:
            fsync_dir(self.path.parent)

        data = self._read_all()
        records, end, why = scan(data)
        if end < len(data):
            later = _valid_record_after(data, end)
            if later is not None:
                self.close()
                raise CorruptLogError(
                    f"{self.path}: record at offset {end} is damaged ({why}) but a "
                    f"valid record follows at offset {later}; this is not a torn "
                    "write, so nothing was truncated. Restore this replica from a "
                    "healthy one."
                )
            tail = TailRepair(str(self.path), end, len(data) - end, why)
            if not repair:
                self.close()
                raise CorruptLogError(f"torn tail not repaired: {tail.describe()}")
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            self.repair = tail
            log.warning("repaired log tail: %s", tail.describe())

        self.offsets = [offset for offset, _ in records]
        self._lengths = [len(payload) for _, payload in records]
        self._size = end

    def _read_all(self) -> bytes:
        size = os.fstat(self._fd).st_size
        return os.pread(self._fd, size, 0) if size else b""

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def size(self) -> int:
        """Bytes in the file (all valid records)."""
        return self._size

    def read(self, position: int) -> bytes:
        """Payload of the record at ``position`` (0-based record number)."""
        offset = self.offsets[position]
        length = self._lengths[position]
        raw = os.pread(self._fd, HEADER_SIZE + length, offset)
        payload, why = _parse_at(raw, 0)
        if payload is None:
            raise CorruptLogError(f"{self.path}: record at offset {offset}: {why}")
        return payload

    def __iter__(self) -> Iterator[bytes]:
        for position in range(len(self.offsets)):
            yield self.read(position)

    def append(self, payload: bytes) -> int:
        """Append one record and fsync; returns its position."""
        return self.append_batch([payload])[0]

    def append_batch(self, payloads: Iterable[bytes]) -> list[int]:
        """Append records with one write and one fsync (none when
        ``sync_appends`` is False); returns their positions."""
        chunks: list[bytes] = []
        offsets: list[int] = []
        lengths: list[int] = []
        offset = self._size
        for payload in payloads:
            chunk = encode_record(payload)
            offsets.append(offset)
            lengths.append(len(payload))
            chunks.append(chunk)
            offset += len(chunk)
        if not chunks:
            return []

        view = memoryview(b"".join(chunks))
        written = self._size
        while view:
            n = os.pwrite(self._fd, view, written)
            written += n
            view = view[n:]
        if self.sync_appends:
            os.fsync(self._fd)
        else:
            self._unsynced = True

        # Positions become visible only once the records are written.
        first = len(self.offsets)
        self.offsets.extend(offsets)
        self._lengths.extend(lengths)
        self._size = offset
        return list(range(first, first + len(chunks)))

    def truncate(self, position: int) -> None:
        """Drop the record at ``position`` and all after it; fsync."""
        if position >= len(self.offsets):
            return
        end = self.offsets[position]
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        self._unsynced = False
        del self.offsets[position:]
        del self._lengths[position:]
        self._size = end

    def rewrite(self, payloads: Iterable[bytes]) -> None:
        """Atomically replace the whole file with ``payloads`` (temp, fsync, rename)."""
        chunks = [encode_record(p) for p in payloads]
        atomic_write(self.path, b"".join(chunks))
        self._unsynced = False
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR)
        self.offsets, self._lengths = [], []
        offset = 0
        for chunk in chunks:
            self.offsets.append(offset)
            self._lengths.append(len(chunk) - HEADER_SIZE)
            offset += len(chunk)
        self._size = offset

    def sync(self) -> None:
        """Make every appended record durable (fsync, only when one is pending)."""
        if self._unsynced and self._fd >= 0:
            os.fsync(self._fd)
            self._unsynced = False

    def close(self) -> None:
        """Sync pending appends, then close the file."""
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RecordLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

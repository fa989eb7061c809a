"""Durable Raft storage for one replica: log entries, hard state and a snapshot.

Layout of a storage directory::

    log.dat        records of (index u64, term u64, data), see ``ledger.recordlog``
    hardstate.json {"term", "vote", "commit"}, replaced atomically
    snapshot.dat   one record: metadata JSON, then the snapshot bytes, replaced
                   atomically

Contract with Raft (etcd's order): persist entries and hard state (``append``,
``set_hard_state``; both return after fsync), then send messages, then apply.
``append`` overwrites a conflicting suffix: entries at or after the first new
index are dropped before the new ones are written. ``apply_snapshot`` saves the
snapshot before compacting the log, so a crash between the two steps leaves
both and loses nothing.

Indexes are 1-based like Raft's; ``first_index()`` is the snapshot index + 1.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from ledger.recordlog import RecordLog, TailRepair, atomic_write, fsync_dir

log = logging.getLogger(__name__)

_ENTRY = struct.Struct(">QQB")


class LogEntry(NamedTuple):
    """One Raft log entry: index, term it was proposed in, kind, opaque data.

    Fields are in the order of ``ledger.raft.messages.Entry``, so
    ``Entry(*log_entry)`` converts (with ``EntryType(log_entry.type)``).
    """

    index: int
    term: int
    type: int = 0
    data: bytes = b""


class HardState(NamedTuple):
    """Raft state that must survive a restart: term, vote (replica id) and commit.

    Same fields and order as ``ledger.raft.messages.HardState``.
    """

    term: int = 0
    vote: Any = None
    commit: int = 0


class StoredSnapshot(NamedTuple):
    """A stored snapshot in the field order of ``ledger.raft.messages.Snapshot``."""

    index: int
    term: int
    voters: tuple
    data: bytes = b""


@dataclass(frozen=True)
class SnapshotMeta:
    """Where a snapshot sits in the log, and the voters it was taken with."""

    index: int = 0
    term: int = 0
    voters: tuple = ()


class StorageError(ValueError):
    """A request the storage cannot satisfy (gap, compacted index, bad order)."""


def _encode_entry(entry: Any) -> bytes:
    kind = int(getattr(entry, "type", 0))
    return _ENTRY.pack(entry.index, entry.term, kind) + bytes(entry.data)


def _decode_entry(payload: bytes) -> LogEntry:
    index, term, kind = _ENTRY.unpack_from(payload, 0)
    return LogEntry(index, term, kind, payload[_ENTRY.size :])


class DurableStorage:
    """Raft log, hard state and snapshot of one replica, kept in ``directory``.

    Attributes:
        repair: what was cut from a torn log tail at open (``TailRepair``), or None.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log = RecordLog(self.dir / "log.dat")
        self.repair: TailRepair | None = self._log.repair
        self._hard = self._load_hard_state()
        self._snap_meta, self._snap_data = self._load_snapshot()

        # Index and term of every stored entry, so reads of terms never touch disk.
        self._terms: list[int] = []
        self._first = self._snap_meta.index + 1
        for position, payload in enumerate(self._log):
            entry = _decode_entry(payload)
            if position == 0:
                self._first = entry.index
            elif entry.index != self._first + position:
                raise StorageError(
                    f"{self._log.path}: entry {position} has index {entry.index}, "
                    f"expected {self._first + position}; the log is not contiguous"
                )
            self._terms.append(entry.term)
        if self._terms and self._first > self._snap_meta.index + 1:
            raise StorageError(
                f"{self._log.path}: log starts at index {self._first} but the "
                f"snapshot ends at {self._snap_meta.index}; entries are missing"
            )
        # Entries already covered by the snapshot (a crash before compaction).
        if self._terms and self._first <= self._snap_meta.index:
            self.compact(self._snap_meta.index)
        log.debug(
            "opened %s: entries %d..%d, hard state %s",
            self.dir, self.first_index(), self.last_index(), self._hard,
        )

    # -- hard state ---------------------------------------------------------

    def _load_hard_state(self) -> HardState:
        path = self.dir / "hardstate.json"
        if not path.exists():
            return HardState()
        try:
            raw = json.loads(path.read_bytes())
            return HardState(int(raw["term"]), raw["vote"], int(raw["commit"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{path}: unreadable hard state ({exc})") from exc

    def hard_state(self) -> HardState:
        return self._hard

    def set_hard_state(self, hard: HardState) -> None:
        """Persist ``hard`` atomically (temp file, fsync, rename, fsync dir)."""
        body = {"term": hard.term, "vote": hard.vote, "commit": hard.commit}
        atomic_write(self.dir / "hardstate.json", json.dumps(body).encode())
        self._hard = hard

    # -- snapshot -----------------------------------------------------------

    def _load_snapshot(self) -> tuple[SnapshotMeta, bytes]:
        path = self.dir / "snapshot.dat"
        if not path.exists():
            return SnapshotMeta(), b""
        with RecordLog(path, repair=False) as records:
            payloads = list(records)
        if len(payloads) != 2:
            raise StorageError(f"{path}: expected 2 records, found {len(payloads)}")
        meta = json.loads(payloads[0])
        return (
            SnapshotMeta(int(meta["index"]), int(meta["term"]), tuple(meta["voters"])),
            payloads[1],
        )

    def snapshot(self) -> tuple[SnapshotMeta, bytes]:
        """The latest snapshot's metadata and bytes (index 0 and b"" when none)."""
        return self._snap_meta, self._snap_data

    def apply_snapshot(
        self, meta: Any, data: bytes | None = None, *, replace_log: bool = False
    ) -> None:
        """Save a snapshot, then drop log entries it covers.

        ``meta`` has ``index``, ``term`` and ``voters`` (a ``SnapshotMeta`` or
        Raft's ``Snapshot``); ``data`` defaults to ``meta.data``. With
        ``replace_log`` (a snapshot received from the leader) the whole log is
        dropped.

        Entries after ``meta.index`` are kept only when the log holds
        ``meta.index`` with ``meta.term`` (Raft's rule); otherwise the whole log
        is discarded because it conflicts with the snapshot.
        """
        data = meta.data if data is None else data
        meta = SnapshotMeta(int(meta.index), int(meta.term), tuple(meta.voters))
        if meta.index < self._snap_meta.index:
            raise StorageError(
                f"snapshot at index {meta.index} is older than the stored one "
                f"at {self._snap_meta.index}"
            )
        head = json.dumps(
            {"index": meta.index, "term": meta.term, "voters": list(meta.voters)}
        ).encode()
        tmp = self.dir / "snapshot.dat.new"
        if tmp.exists():
            tmp.unlink()
        with RecordLog(tmp) as records:
            records.append_batch([head, bytes(data)])
        os.replace(tmp, self.dir / "snapshot.dat")
        fsync_dir(self.dir)
        self._snap_meta, self._snap_data = meta, bytes(data)

        keep = (
            not replace_log
            and self._first <= meta.index <= self.last_index()
            and self.term(meta.index) == meta.term
        )
        if keep:
            self.compact(meta.index)
        else:
            self._log.rewrite([])
            self._terms = []
            self._first = meta.index + 1
        log.info("snapshot saved at index %d term %d", meta.index, meta.term)

    def stored_snapshot(self) -> StoredSnapshot | None:
        """The snapshot as ``StoredSnapshot``, or None when none was saved."""
        meta, data = self._snap_meta, self._snap_data
        if meta.index == 0:
            return None
        return StoredSnapshot(meta.index, meta.term, tuple(meta.voters), data)

    # -- the Ready contract of ledger.raft ----------------------------------

    def save(
        self, snapshot: Any = None, entries: Sequence[Any] = (),
        hard_state: Any = None,
    ) -> None:
        """Persist one Ready's writes in Raft's order; durable on return.

        ``snapshot`` (received from the leader) replaces the log wholesale,
        ``entries`` replace the log from their first index on, and
        ``hard_state`` (any (term, vote, commit) triple) overwrites the old one.
        """
        if snapshot is not None:
            self.apply_snapshot(snapshot, replace_log=True)
        if entries:
            self.append(entries)
        if hard_state is not None:
            term, vote, commit = hard_state
            self.set_hard_state(HardState(int(term), vote, int(commit)))

    def fsync(self) -> None:
        """Nothing to do: every write method here has already synced."""

    def load(self) -> tuple[HardState, StoredSnapshot | None, list[LogEntry]]:
        """What ``RaftNode.restore`` needs: hard state, snapshot, entries after it."""
        first, last = self.first_index(), self.last_index()
        return self._hard, self.stored_snapshot(), self.entries(first, last + 1)

    # -- entries ------------------------------------------------------------

    def first_index(self) -> int:
        """Index of the first entry still in the log (snapshot index + 1)."""
        return self._first

    def last_index(self) -> int:
        """Index of the last entry, or the snapshot index when the log is empty."""
        return self._first + len(self._terms) - 1

    def last_term(self) -> int:
        return self.term(self.last_index())

    def term(self, index: int) -> int:
        """Term of the entry at ``index`` (the snapshot's term at its index)."""
        if index == self._snap_meta.index:
            return self._snap_meta.term
        if index < self._first:
            raise StorageError(
                f"index {index} is compacted (log starts at {self._first})"
            )
        if index > self.last_index():
            raise StorageError(
                f"index {index} is beyond the last entry {self.last_index()}"
            )
        return self._terms[index - self._first]

    def entries(
        self, lo: int, hi: int, max_bytes: int | None = None
    ) -> list[LogEntry]:
        """Entries with ``lo <= index < hi``; with ``max_bytes``, at least one."""
        if lo < self._first:
            raise StorageError(f"index {lo} is compacted (log starts at {self._first})")
        if hi > self.last_index() + 1:
            raise StorageError(
                f"range end {hi} is past the last entry {self.last_index()}"
            )
        out: list[LogEntry] = []
        total = 0
        for index in range(lo, hi):
            entry = _decode_entry(self._log.read(index - self._first))
            total += len(entry.data)
            if max_bytes is not None and out and total > max_bytes:
                break
            out.append(entry)
        return out

    def append(self, entries: Sequence[Any]) -> None:
        """Persist ``entries`` (objects with index, term, data) with one fsync.

        A conflicting suffix (entries at or after the first new index) is
        truncated first, as Raft requires when a leader overwrites a follower.
        """
        if not entries:
            return
        first = entries[0].index
        for offset, entry in enumerate(entries):
            if entry.index != first + offset:
                raise StorageError(
                    f"entries are not contiguous: {entry.index} after "
                    f"{first + offset - 1}"
                )
        if first < self._first:
            raise StorageError(
                f"cannot append at index {first}: compacted up to {self._first - 1}"
            )
        if first > self.last_index() + 1:
            raise StorageError(
                f"cannot append at index {first}: the log ends at {self.last_index()}"
            )
        if first <= self.last_index():
            self.truncate_suffix(first)
        self._log.append_batch(_encode_entry(e) for e in entries)
        self._terms.extend(e.term for e in entries)

    def truncate_suffix(self, index: int) -> None:
        """Drop the entry at ``index`` and everything after it (fsync)."""
        if index < self._first:
            raise StorageError(
                f"cannot truncate at {index}: compacted up to {self._first - 1}"
            )
        dropped = self.last_index() - index + 1
        if dropped <= 0:
            return
        self._log.truncate(index - self._first)
        del self._terms[index - self._first :]
        log.info("truncated %d conflicting entries from index %d", dropped, index)

    def compact(self, index: int) -> None:
        """Drop entries up to and including ``index`` (covered by the snapshot)."""
        if index > self._snap_meta.index:
            raise StorageError(
                f"cannot compact to {index}: the snapshot only covers "
                f"{self._snap_meta.index}; save a snapshot first"
            )
        if index < self._first:
            return
        keep_from = min(index + 1, self.last_index() + 1)
        kept = [
            self._log.read(i - self._first)
            for i in range(keep_from, self.last_index() + 1)
        ]
        terms = self._terms[keep_from - self._first :]
        self._log.rewrite(kept)
        self._terms = terms
        self._first = index + 1
        log.info("compacted log up to index %d", index)

    def close(self) -> None:
        self._log.close()


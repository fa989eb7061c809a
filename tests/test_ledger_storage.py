"""Durable storage: record log repair at open, Raft log, hard state, snapshots."""

from __future__ import annotations

import logging
import os

import pytest

from ledger.recordlog import HEADER_SIZE, CorruptLogError, RecordLog
from ledger.storage import (
    DurableStorage, HardState, LogEntry, SnapshotMeta, StorageError,
)


def _payloads(n: int) -> list[bytes]:
    return [f"record-{i}-".encode() * (i + 1) for i in range(n)]


def test_records_survive_reopen_and_batch_is_one_append(tmp_path):
    path = tmp_path / "r.log"
    with RecordLog(path) as records:
        assert records.append(b"first") == 0
        assert records.append_batch(_payloads(5)) == [1, 2, 3, 4, 5]
    with RecordLog(path) as records:
        assert records.repair is None
        assert list(records) == [b"first", *_payloads(5)]


def test_deferred_appends_sync_only_at_sync_and_close(tmp_path, monkeypatch):
    path = tmp_path / "r.log"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    records = RecordLog(path)
    records.sync_appends = False
    synced.clear()
    records.append_batch(_payloads(3))
    records.append(b"more")
    assert synced == []
    assert list(records) == [*_payloads(3), b"more"]
    records.sync()
    assert len(synced) == 1
    records.sync()  # nothing pending: no second fsync
    assert len(synced) == 1
    records.append(b"last")
    records.close()
    assert len(synced) == 2
    with RecordLog(path) as again:
        assert list(again) == [*_payloads(3), b"more", b"last"]


def test_log_cut_mid_record_is_repaired_and_reported(tmp_path, caplog):
    path = tmp_path / "r.log"
    with RecordLog(path) as records:
        records.append_batch(_payloads(4))
        last_offset = records.offsets[-1]
    size = path.stat().st_size
    cut = last_offset + HEADER_SIZE + 3  # inside the last payload
    os.truncate(path, cut)

    with caplog.at_level(logging.WARNING, logger="ledger.recordlog"):
        records = RecordLog(path)
    assert list(records) == _payloads(3)
    assert records.repair is not None
    assert records.repair.offset == last_offset
    assert records.repair.dropped_bytes == cut - last_offset
    assert path.stat().st_size == last_offset
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(path) in warning and str(last_offset) in warning
    assert f"dropped {cut - last_offset} bytes" in warning
    assert size > cut

    # Appending after the repair continues a valid file.
    records.append(b"after repair")
    records.close()
    with RecordLog(path) as again:
        assert list(again) == [*_payloads(3), b"after repair"]
        assert again.repair is None


def test_corrupt_last_record_is_repaired_and_reported(tmp_path):
    path = tmp_path / "r.log"
    with RecordLog(path) as records:
        records.append_batch(_payloads(4))
        last_offset = records.offsets[-1]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))

    with RecordLog(path) as records:
        assert list(records) == _payloads(3)
        assert records.repair.offset == last_offset
        assert "checksum" in records.repair.reason


def test_corrupt_middle_record_is_an_error_and_file_untouched(tmp_path):
    path = tmp_path / "r.log"
    with RecordLog(path) as records:
        records.append_batch(_payloads(4))
        second = records.offsets[1]
    data = bytearray(path.read_bytes())
    data[second + HEADER_SIZE + 1] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(CorruptLogError, match=f"offset {second}"):
        RecordLog(path)
    assert path.read_bytes() == bytes(data)


def test_read_only_open_refuses_to_cut_a_torn_tail(tmp_path):
    path = tmp_path / "r.log"
    with RecordLog(path) as records:
        records.append_batch(_payloads(2))
    os.truncate(path, path.stat().st_size - 1)
    size = path.stat().st_size
    with pytest.raises(CorruptLogError, match="not repaired"):
        RecordLog(path, repair=False)
    assert path.stat().st_size == size


def _entries(lo: int, hi: int, term: int) -> list[LogEntry]:
    return [LogEntry(i, term, 0, f"data-{i}-{term}".encode()) for i in range(lo, hi)]


def test_raft_storage_append_read_and_reopen(tmp_path):
    store = DurableStorage(tmp_path)
    assert (store.first_index(), store.last_index(), store.last_term()) == (1, 0, 0)
    store.append(_entries(1, 11, 1))
    store.set_hard_state(HardState(term=3, vote=2, commit=7))
    store.close()

    store = DurableStorage(tmp_path)
    assert store.last_index() == 10 and store.last_term() == 1
    assert store.entries(3, 6) == _entries(3, 6, 1)
    assert store.hard_state() == HardState(3, 2, 7)
    assert len(store.entries(1, 11, max_bytes=20)) == 2
    with pytest.raises(StorageError, match="past the last entry"):
        store.entries(5, 12)


def test_conflicting_suffix_is_overwritten(tmp_path):
    store = DurableStorage(tmp_path)
    store.append(_entries(1, 11, 1))
    store.append(_entries(6, 8, 2))  # a new leader overwrites 6..10
    assert store.last_index() == 7
    assert [e.term for e in store.entries(1, 8)] == [1] * 5 + [2, 2]
    store.close()

    store = DurableStorage(tmp_path)
    assert store.entries(5, 8) == _entries(5, 6, 1) + _entries(6, 8, 2)
    with pytest.raises(StorageError, match="log ends at 7"):
        store.append(_entries(9, 10, 2))


def test_snapshot_compacts_and_survives_reopen(tmp_path):
    store = DurableStorage(tmp_path)
    store.append(_entries(1, 21, 1))
    store.apply_snapshot(SnapshotMeta(12, 1, (1, 2, 3)), b"state-at-12")
    assert store.first_index() == 13 and store.last_index() == 20
    assert store.term(12) == 1
    with pytest.raises(StorageError, match="compacted"):
        store.entries(5, 8)
    store.close()

    store = DurableStorage(tmp_path)
    meta, data = store.snapshot()
    assert (meta.index, meta.term, meta.voters) == (12, 1, (1, 2, 3))
    assert data == b"state-at-12"
    assert store.entries(13, 21) == _entries(13, 21, 1)

    # A snapshot that conflicts with the log replaces it entirely.
    store.apply_snapshot(SnapshotMeta(30, 4, (1, 2, 3)), b"state-at-30")
    assert (store.first_index(), store.last_index(), store.last_term()) == (31, 30, 4)
    store.append(_entries(31, 33, 4))
    store.close()
    assert DurableStorage(tmp_path).entries(31, 33) == _entries(31, 33, 4)


def test_torn_raft_log_tail_is_reported_by_storage(tmp_path):
    store = DurableStorage(tmp_path)
    store.append(_entries(1, 6, 1))
    store.close()
    log_file = tmp_path / "log.dat"
    os.truncate(log_file, log_file.stat().st_size - 4)

    store = DurableStorage(tmp_path)
    assert store.repair is not None and store.repair.path == str(log_file)
    assert store.last_index() == 4
    assert store.entries(1, 5) == _entries(1, 5, 1)


def test_hard_state_write_is_atomic_file_replace(tmp_path):
    store = DurableStorage(tmp_path)
    store.set_hard_state(HardState(1, None, 0))
    inode = (tmp_path / "hardstate.json").stat().st_ino
    store.set_hard_state(HardState(2, 1, 5))
    assert (tmp_path / "hardstate.json").stat().st_ino != inode
    assert not (tmp_path / "hardstate.json.tmp").exists()
    assert DurableStorage(tmp_path).hard_state() == HardState(2, 1, 5)


def test_ready_save_and_load_follow_the_raft_contract(tmp_path):
    store = DurableStorage(tmp_path)
    store.save(None, _entries(1, 6, 1), (1, 2, 3))
    store.save(None, _entries(4, 5, 2), None)  # truncate 4..5, append 4
    assert store.load() == (
        HardState(1, 2, 3), None, _entries(1, 4, 1) + _entries(4, 5, 2)
    )

    # A snapshot from the leader replaces the log even where it would match.
    snap = type("Snap", (), {"index": 3, "term": 1, "voters": (1, 2, 3),
                             "data": b"leader-state"})()
    store.save(snap)
    assert store.load()[2] == [] and store.first_index() == 4
    store.save(None, _entries(4, 6, 2), (2, None, 5))
    store.close()

    hard, stored, entries = DurableStorage(tmp_path).load()
    assert hard == HardState(2, None, 5)
    assert tuple(stored) == (3, 1, (1, 2, 3), b"leader-state")
    assert entries == _entries(4, 6, 2)

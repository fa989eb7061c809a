"""Durable append rate of the ledger: group commit against one fsync per entry.

Workload: signed ledger entries (``prediction_audit``, the smallest realistic
type, and ``model_update``), appended to a ``ledger.recordlog.RecordLog`` on
the file system of ``--dir``:

- ``per_entry``: ``append`` per entry, so one write and one fsync each;
- ``group_100``: ``append_batch`` of 100 entries, one write and one fsync;
- ``raft_group_100``: ``DurableStorage.append`` of one Raft entry carrying a
  batch of 100 ledger entries (``encode_batch``), as a replica persists it;
- ``ledger_apply_100``: ``Ledger.apply_batch`` of 100 model updates, i.e.
  Ed25519 verification, the rules, the Merkle root and one fsynced block.

Entries are signed before timing starts. Rates are entries per second of wall
time (durable on return). fsync cost depends on the disk; on tmpfs it is free
and the comparison is meaningless, so the file system type is printed.

Usage:
    python benchmarks/ledger_append.py [--entries 2000] [--dir DIR]

Prints a table, and as its last line one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ledger import entries as E
from ledger.genesis import make_consortium
from ledger.recordlog import RecordLog
from ledger.storage import DurableStorage, LogEntry
from ledger.store import Ledger

BATCH = 100


def file_system(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True,
                             check=True).stdout.splitlines()[-1].split()
        return out[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000,
                        help="entries per measurement (multiple of 100)")
    parser.add_argument("--dir", default=None, help="where to write (default: temp)")
    args = parser.parse_args()
    n = max(BATCH, args.entries // BATCH * BATCH)

    work = Path(tempfile.mkdtemp(prefix="ledger-bench-", dir=args.dir))
    try:
        consortium = make_consortium(work / "consortium", hospitals=1)
        s = consortium.signers
        t0 = 1_700_000_000.0
        audits = [E.prediction_audit(s["server"], root=f"{i:064x}", count=256,
                                     model_hash="ab" * 32, timestamp=t0 + i)
                  for i in range(n)]
        size = sum(map(len, audits)) / n

        with RecordLog(work / "per_entry.log") as log:
            per_entry = timed(lambda: [log.append(raw) for raw in audits])
        with RecordLog(work / "group.log") as log:
            group = timed(lambda: [log.append_batch(audits[i:i + BATCH])
                                   for i in range(0, n, BATCH)])
        storage = DurableStorage(work / "raft")
        raft_entries = [LogEntry(k + 1, 1, 0, E.encode_batch(audits[i:i + BATCH]))
                        for k, i in enumerate(range(0, n, BATCH))]
        raft = timed(lambda: [storage.append([e]) for e in raft_entries])
        storage.close()

        # The rules need an open round and distinct hospitals per round; one
        # hospital, one round per batch of updates is enough: the first update
        # is accepted and the rest are rejected as second updates, which costs
        # the same signature check.
        updates, k = [], 0
        for r in range(n // BATCH):
            batch = [E.round_open(s["coordinator"], round=r, base_model_hash="00" * 32,
                                  timestamp=t0 + k)]
            for j in range(BATCH - 1):
                batch.append(E.model_update(
                    s["hospital-00"], round=r, base_model_hash="00" * 32,
                    update_hash=f"{k + j:064x}", num_samples=100, timestamp=t0 + k))
            k += BATCH
            updates.append(batch)
        led = Ledger(work / "replica", consortium.genesis)
        apply = timed(lambda: [led.apply_batch(i + 1, batch)
                               for i, batch in enumerate(updates)])
        update_size = sum(len(x) for b in updates for x in b) / n
        led.close()
        fs = file_system(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("per_entry (1 fsync/entry)", per_entry),
        (f"group_{BATCH} (1 fsync/{BATCH})", group),
        (f"raft_group_{BATCH} (DurableStorage)", raft),
        (f"ledger_apply_{BATCH} (verify+rules+block)", apply),
    ]
    print(f"{n} signed entries, {size:.0f} bytes each (model updates "
          f"{update_size:.0f}), file system {fs}")
    print(f"{'way':<40} {'seconds':>8} {'entries/s':>10}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds:>8.3f} {n / seconds:>10,.0f}")
    figures = {
        "entries": n,
        "entry_bytes": round(size),
        "model_update_bytes": round(update_size),
        "file_system": fs,
        "per_entry_fsync_entries_per_second": round(n / per_entry),
        "group_commit_100_entries_per_second": round(n / group),
        "raft_storage_group_100_entries_per_second": round(n / raft),
        "ledger_apply_100_entries_per_second": round(n / apply),
        "group_commit_speedup": round(per_entry / group, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

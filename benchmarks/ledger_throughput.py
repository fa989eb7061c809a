"""Replicated ledger on Ray: committed entries per second, commit latency, failover.

Three ``LedgerReplica`` actors on a local Ray instance (127.0.0.1, 2 CPUs),
each with its own directory on ``--dir``'s file system: every Raft entry is
fsynced on a majority before it counts, every ledger entry's Ed25519
signature is verified by every replica, and every block is written (fsynced
before compaction: the Raft log already holds it durably). Entries
are ``prediction_audit`` entries signed by the consortium's server (the same
signing, canonical JSON and verification as a model update, and accepted by
the rules any number of times). They are signed before each timed section;
the signing rate is measured separately and printed.

Workloads (latency: from the submit call, or the scheduled send time for
the fixed load, to the acknowledgement that the entry is committed and
applied on the leader):

- ``unbatched``: one submitter, one entry per submission, one at a time, so
  each Raft entry (and block) holds one ledger entry;
- ``batched_c<N>``: N concurrent submitters of one entry each; the leader
  packs what arrives during one Ready into one Raft entry (group commit);
- ``client_batch_<B>x<N>``: N submitters of B entries per submission;
- ``fixed_<R>_per_s``: open-loop offered load of R entries per second, one
  entry per submission, sent on schedule whatever the replies;
- ``failover``: a light sequential load, the leader actor killed (Ray
  restarts it); time from the kill to the next acknowledged commit.

Reference (measured on this machine class): PySyncObj 0.3.17, 3 local
processes, in-memory journal, no fsync, no signatures: about 5,000 committed
200-byte entries per second, 0.86 s failover.

Usage:
    python benchmarks/ledger_throughput.py [--seconds 6] [--dir DIR]

Prints a table, and as its last line one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray

from cluster.ledger_service import LedgerService, start_ledger
from cluster.runtime import ray_session
from ledger import entries as E

ZERO = "00" * 32


def h(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class Entries:
    """Pre-signed entries, handed out in order; counts signing time."""

    def __init__(self, svc: LedgerService) -> None:
        self.signer = svc.signer("server")
        self.count = 0
        self.sign_seconds = 0.0

    def make(self, n: int) -> list[bytes]:
        start = time.perf_counter()
        out = [E.prediction_audit(self.signer, root=h(f"p{self.count + i}"), count=1,
                                  model_hash=h("m0"), timestamp=1.0)
               for i in range(n)]
        self.sign_seconds += time.perf_counter() - start
        self.count += n
        return out


def setup_round(svc: LedgerService) -> None:
    coordinator, hospital = svc.signer("coordinator"), svc.signer("hospital-00")
    svc.client.submit([
        E.round_open(coordinator, round=0, base_model_hash=ZERO, timestamp=1.0),
        E.model_update(hospital, round=0, base_model_hash=ZERO, update_hash=h("u0"),
                       num_samples=10, timestamp=2.0),
        E.global_model(coordinator, round=0, model_hash=h("m0"),
                       update_hashes=[h("u0")], timestamp=3.0),
    ])


async def closed_loop(svc: LedgerService, batches: list[list[bytes]],
                      submitters: int) -> dict:
    """`submitters` coroutines each submitting batches one after another."""
    latencies: list[float] = []
    queue = list(reversed(batches))

    async def worker() -> None:
        while queue:
            batch = queue.pop()
            start = time.perf_counter()
            await svc.client.submit_async(batch)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(submitters)))
    wall = time.perf_counter() - start
    entries = sum(len(b) for b in batches)
    return {"entries": entries, "seconds": wall, "rate": entries / wall,
            "p50_ms": 1e3 * percentile(latencies, 50),
            "p99_ms": 1e3 * percentile(latencies, 99)}


async def open_loop(svc: LedgerService, entries: list[bytes], rate: float) -> dict:
    """Send one entry every 1/rate seconds on schedule; latency from schedule."""
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05

    async def one(k: int, entry: bytes) -> None:
        due = t0 + k / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        await svc.client.submit_async([entry])
        latencies.append(loop.time() - due)

    start = time.perf_counter()
    await asyncio.gather(*(one(k, e) for k, e in enumerate(entries)))
    wall = time.perf_counter() - start
    return {"entries": len(entries), "seconds": wall, "rate": len(entries) / wall,
            "p50_ms": 1e3 * percentile(latencies, 50),
            "p99_ms": 1e3 * percentile(latencies, 99)}


def failover(svc: LedgerService, maker: Entries, trials: int) -> list[float]:
    """Seconds from killing the leader to the next acknowledged commit."""
    times = []
    for _ in range(trials):
        leader = svc.client.wait_for_leader()
        pool = maker.make(200)
        for entry in pool[:20]:
            svc.client.submit([entry])
        killed = time.perf_counter()
        svc.kill_replica(leader, restart=True)
        svc.client.submit([pool[20]])
        times.append(time.perf_counter() - killed)
        # Let the killed replica restart and catch up before the next trial.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            heads = svc.client.heads(timeout_s=2.0)
            if all(heads) and len({x["hash"] for x in heads}) == 1:
                break
            svc.client.submit([pool[21 + int(time.monotonic() * 10) % 150]])
            time.sleep(0.2)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="target length of each throughput run")
    parser.add_argument("--dir", default=None, help="where replicas keep files")
    parser.add_argument("--trials", type=int, default=3, help="failover trials")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = Path(args.dir or tempfile.mkdtemp(prefix="medfed-ledger-bench-"))
    rows: dict[str, dict] = {}
    with ray_session(num_cpus=2):
        svc = start_ledger(base / "ledger", replicas=3, hospitals=3)
        try:
            setup_round(svc)
            maker = Entries(svc)
            sample = maker.make(1)[0]

            # Unbatched: measure how many fit in the time, then run that many.
            probe = maker.make(30)
            r = asyncio.run(closed_loop(svc, [[e] for e in probe], 1))
            n = max(50, int(r["rate"] * args.seconds))
            r = asyncio.run(closed_loop(svc, [[e] for e in maker.make(n)], 1))
            rows["unbatched"] = r

            for submitters in (64,):
                n = max(500, int(rows["unbatched"]["rate"] * 20 * args.seconds))
                pool = maker.make(n)
                r = asyncio.run(closed_loop(svc, [[e] for e in pool], submitters))
                rows[f"batched_c{submitters}"] = r

            size, submitters = 100, 8
            n = max(2000, int(rows[f"batched_c64"]["rate"] * 2 * args.seconds))
            pool = maker.make(n)
            batches = [pool[i:i + size] for i in range(0, len(pool), size)]
            rows[f"client_batch_{size}x{submitters}"] = asyncio.run(
                closed_loop(svc, batches, submitters))

            rate = 500.0
            pool = maker.make(int(rate * args.seconds))
            rows["fixed_500_per_s"] = asyncio.run(open_loop(svc, pool, rate))

            fail = failover(svc, maker, args.trials)
            heads = svc.client.heads()
        finally:
            svc.stop()
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)

    sign_rate = maker.count / maker.sign_seconds
    print(f"3 replicas on local Ray (2 CPUs), entries of {len(sample)} bytes "
          f"signed before timing ({sign_rate:,.0f} signatures/s on one core)")
    print(f"{'workload':<24} {'entries':>8} {'seconds':>8} {'entries/s':>10} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    for name, r in rows.items():
        print(f"{name:<24} {r['entries']:>8} {r['seconds']:>8.2f} {r['rate']:>10,.0f} "
              f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")
    print(f"failover (kill leader -> next commit): "
          + ", ".join(f"{t:.2f} s" for t in fail)
          + f"; median {statistics.median(fail):.2f} s")
    print(f"final heads agree: {len({x['hash'] for x in heads if x}) == 1}")
    print("reference PySyncObj 0.3.17 (no fsync, no signatures): ~5,000 entries/s, "
          "failover 0.86 s")

    figures = {"entry_bytes": len(sample), "signatures_per_s": round(sign_rate)}
    for name, r in rows.items():
        figures[f"{name}_entries_per_s"] = round(r["rate"], 1)
        figures[f"{name}_p50_latency_s"] = round(r["p50_ms"] / 1e3, 4)
        figures[f"{name}_p99_latency_s"] = round(r["p99_ms"] / 1e3, 4)
    figures["failover_s"] = [round(t, 3) for t in fail]
    figures["failover_median_s"] = round(statistics.median(fail), 3)
    figures["pysyncobj_reference_entries_per_s"] = 5000
    figures["pysyncobj_reference_failover_s"] = 0.86
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

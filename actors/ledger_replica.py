"""LedgerReplica: one Raft replica of the audit ledger as a Ray actor.

The actor wraps the pure ``ledger.raft.core.RaftNode`` with its durable
storage (``ledger.storage.DurableStorage`` in ``<dir>/raft``) and the ledger
state machine (``ledger.store.Ledger``, blocks in ``<dir>/blocks.log``). A
background asyncio task is the only code that touches the node. Each loop
turn it ticks the node (every ``tick_s`` seconds), steps the messages that
arrived, proposes the waiting submissions, and handles every ``Ready`` in
Raft's order:

1. persist snapshot, entries and changed term/vote (``DurableStorage.save``),
2. then send the messages (fire-and-forget actor calls to the peers),
3. then apply the snapshot and the committed entries to the ledger (one block
   per Raft entry, written but not fsynced: see below),
4. then ``advance``.

Steps 1 and 3 run in a worker thread, so calls keep arriving (and queueing
for the next batch) while the disk syncs: this is the group commit. On the
leader, all submissions that arrive while one Ready is being handled (at
most ``max_batch_entries`` entries) become one Raft entry and one block. A
steady-state Ready costs one fsync however many entries it carries, for the
Raft log (step 1); the hard-state file is rewritten (two more) only when
term or vote change.

Blocks are not fsynced before answering, because the Raft log already holds
every committed entry durably: a machine crash may cut the block file's
unsynced tail (repaired at open), and the restarted replica re-applies the
committed entries after its last stored block from its Raft log, which Raft
hands out again (``applied`` is the snapshot index). Compaction fsyncs the
block file before it drops Raft entries, so no entry is discarded whose block
is not durable; ``stop`` fsyncs it too.

Idempotency: every submission carries a key. The Raft entry holds the keys
with their entries (``encode_submissions``), and each replica keeps a table
key -> result as part of its replicated state, updated only while applying
committed entries, so every replica decides alike. A submission whose key is
already in the table is skipped at apply time (no second block entry) and
its caller gets the original result. The table survives restarts: it is
carried in Raft snapshots (``encode_snapshot``) and rebuilt at start from
the Raft log entries after the snapshot, which Raft hands out again and which
are matched with the blocks already stored (no entry is judged twice).

Persistence: everything that must survive is on disk, since Ray runs the
constructor again on restart. The commit index is written with the hard
state only when term or vote change (Raft allows a lagging commit: a
restarted replica re-learns it); at start it is raised to the ledger's
applied index, which only ever holds committed entries. A torn log tail is
cut by the storage at open and reported in the log; the replica then
copies the committed entries it may have lost from a peer (`committed_log`)
before starting Raft, because a leader never re-sends entries a follower
once acknowledged. A hard-state commit beyond the log is lowered to its end.

Messages travel as actor calls (``step``); Raft tolerates their loss,
duplication and reordering, and a dead peer's call error is logged at debug
level only.

Known shortcomings: the idempotency table keeps every key forever (about
120 bytes per entry in a snapshot); a replica whose log tail was cut has
lost entries it may have acknowledged, which Raft tolerates only while a
majority still holds them; membership is fixed by the genesis.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from ledger import entries as E
from ledger.genesis import GENESIS_FILE, Genesis
from ledger.raft.core import RaftConfig, RaftNode
from ledger.raft.messages import (
    Entry, EntryType, HardState, Message, Ready, Role, Snapshot,
)
from ledger.storage import DurableStorage
from ledger.store import Ledger

log = logging.getLogger(__name__)

REPLICA_CPUS = 0.2
_SUBMISSIONS_MAGIC = b"MFS1"
_SNAPSHOT_MAGIC = b"MFK1"
MAX_KEY_CHARS = 200
# Seconds between lookups of a peer's actor handle after a failed call.
_PEER_RETRY_S = 0.2


class NotLeader(Exception):
    """NotLeader: the replica asked is not the leader; retry at `leader_hint`.

    `replica` is the index of the replica that refused; `leader_hint` is the
    index of the leader it knows of, or None (no leader known: retry soon).
    """

    def __init__(self, replica: int, leader_hint: int | None) -> None:
        hint = (f"submit to replica {leader_hint}" if leader_hint is not None
                else "no leader known yet, retry shortly")
        super().__init__(f"replica {replica} is not the leader; {hint}")
        self.replica = replica
        self.leader_hint = leader_hint

    def __reduce__(self):
        return (NotLeader, (self.replica, self.leader_hint))


@dataclass(frozen=True)
class ReplicaConfig:
    """ReplicaConfig: timing, batching and compaction of one replica.

    tick_s: seconds between Raft ticks (default 0.01).
    election_ticks: ticks without a leader before a follower campaigns (a
        random 1x..2x); 20 ticks of 10 ms give failover well under 1 s.
    heartbeat_ticks: a leader's heartbeat interval in ticks.
    max_batch_entries: most ledger entries the leader packs into one Raft
        entry (one block).
    compact_every: Raft entries applied between log compactions (0: never).
    submit_timeout_s: seconds `submit` waits for its entries to apply before
        raising TimeoutError (the caller retries with the same key).
    """

    tick_s: float = 0.01
    election_ticks: int = 20
    heartbeat_ticks: int = 2
    max_batch_entries: int = 2000
    compact_every: int = 20_000
    submit_timeout_s: float = 5.0


def replica_name(ledger_id: str, index: int) -> str:
    """The Ray actor name of replica `index` of the ledger `ledger_id`."""
    return f"medfed-ledger-{ledger_id}-{index}"


# -- the replicated submission envelope and idempotency table ------------------

def encode_submissions(submissions: list[tuple[str, list[bytes]]]) -> bytes:
    """One Raft entry's data: magic, then (key, ledger batch) pairs."""
    items: list[bytes] = []
    for key, entries in submissions:
        items.append(key.encode("utf-8"))
        items.append(E.encode_batch(entries))
    return _SUBMISSIONS_MAGIC + E.encode_batch(items)


def decode_submissions(data: bytes) -> list[tuple[str, list[bytes]]] | None:
    """Inverse of `encode_submissions`; None when `data` is not such an envelope."""
    if data[:4] != _SUBMISSIONS_MAGIC:
        return None
    try:
        items = E.decode_batch(data[4:])
        if len(items) % 2:
            return None
        return [(items[k].decode("utf-8"), E.decode_batch(items[k + 1]))
                for k in range(0, len(items), 2)]
    except (E.MalformedEntry, UnicodeDecodeError):
        return None


def encode_snapshot(ledger_snapshot: bytes, results: dict[str, dict]) -> bytes:
    """Raft snapshot data: the ledger's snapshot and the idempotency table."""
    table = E.canonical(results)
    return _SNAPSHOT_MAGIC + E.encode_batch([ledger_snapshot, table])


def decode_snapshot(data: bytes) -> tuple[bytes, dict[str, dict]]:
    """Inverse of `encode_snapshot`: (ledger snapshot bytes, key -> result)."""
    if data[:4] != _SNAPSHOT_MAGIC:
        raise ValueError(
            f"snapshot data starts with {data[:4]!r}, not {_SNAPSHOT_MAGIC!r}; "
            "it was not written by a LedgerReplica"
        )
    ledger_snapshot, table = E.decode_batch(data[4:])
    return ledger_snapshot, json.loads(table)


def default_key(entries: list[bytes]) -> str:
    """The idempotency key of a submission when the caller gives none: its hash."""
    return hashlib.sha256(E.encode_batch(entries)).hexdigest()


def _result(index: int, height: int, outcomes: list[dict]) -> dict:
    return {"index": index, "block_height": height, "outcomes": outcomes}


# -- the actor ------------------------------------------------------------------

@ray.remote(num_cpus=REPLICA_CPUS, max_restarts=-1, max_task_retries=0)
class LedgerReplica:
    """LedgerReplica: Raft node + storage + ledger of `directory`, driven by ticks.

    ledger_id: names this ledger's actors (see `replica_name`); peers are
        found by name, so a restarted or replaced peer is reached again.
    index: this replica's index (0-based, genesis voter `replica-<index>`);
        its Raft id is index + 1.
    replicas: how many replicas the ledger has (3 or 5).
    directory: this replica's directory; the genesis is read from
        `directory/../genesis.json`.
    config: a ReplicaConfig (defaults when None).
    seed: seeds election timeouts (None: fresh randomness per start).
    """

    async def __init__(
        self, ledger_id: str, index: int, replicas: int, directory: str,
        config: ReplicaConfig | None = None, seed: int | None = None,
    ) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=logging.INFO,
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
        self.ledger_id = ledger_id
        self.index = index
        self.id = index + 1
        self.voters = tuple(range(1, replicas + 1))
        self.config = config or ReplicaConfig()
        self.dir = Path(directory)
        genesis = Genesis.load(self.dir.parent / GENESIS_FILE)
        if len(genesis.voters) != replicas:
            raise ValueError(
                f"genesis names {len(genesis.voters)} voters but {replicas} "
                "replicas were asked for; start the ledger with as many replicas "
                "as its genesis names"
            )

        self.storage = DurableStorage(self.dir / "raft")
        self.ledger = Ledger(self.dir, genesis, sync_blocks=False)
        self.results: dict[str, dict] = {}
        if self.storage.repair is not None:
            await self._refill_from_peers()
        self.node = self._restore_node(seed)
        self.started_at = time.time()

        self._inbox: list[Message] = []
        self._queue: list[tuple[str, list[bytes]]] = []
        self._pending: dict[str, asyncio.Future] = {}
        self._peers: dict[int, Any] = {}
        self._peer_lookup_at: dict[int, float] = {}
        self._wake = asyncio.Event()
        # Held while the ledger changes in a worker thread, so reads that walk
        # the state (head, query) never see it half-updated.
        self._ledger_lock = asyncio.Lock()
        self._last_role = self.node.role
        self._last_compacted = self.storage.first_index() - 1
        self._stopped = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _restore_node(self, seed: int | None) -> RaftNode:
        """Rebuild the node from disk (a fresh node when nothing is stored)."""
        rng = random.Random(seed)
        raft_config = RaftConfig(
            election_ticks=self.config.election_ticks,
            heartbeat_ticks=self.config.heartbeat_ticks,
        )
        hard, snap, stored = self.storage.load()
        if self.storage.repair is not None:
            log.warning("replica %d: raft log tail repaired: %s", self.index,
                        self.storage.repair.describe())
        if self.ledger.repair is not None:
            log.warning("replica %d: block file tail repaired: %s", self.index,
                        self.ledger.repair.describe())

        # Key table as of the snapshot; entries after it are handed out again
        # by Raft and matched with stored blocks (see _apply_entry).
        snapshot = None
        self._keys_applied = 0
        if snap is not None:
            ledger_data, self.results = decode_snapshot(snap.data)
            if snap.index > self.ledger.applied_raft_index:
                self.ledger.restore(ledger_data)
            snapshot = Snapshot(snap.index, snap.term, tuple(snap.voters), snap.data)
            self._keys_applied = snap.index
        self._block_outcomes = self._stored_outcomes()

        entries = [Entry(e.index, e.term, EntryType(e.type), e.data) for e in stored]
        if hard.term == 0 and not entries and snapshot is None:
            return RaftNode(self.id, self.voters, rng, raft_config)
        last = entries[-1].index if entries else (snapshot.index if snapshot else 0)
        commit = min(max(hard.commit, self.ledger.applied_raft_index), last)
        node = RaftNode.restore(
            self.id, self.voters, HardState(hard.term, hard.vote, commit), snapshot,
            entries, rng, raft_config, applied=self._keys_applied,
        )
        log.info(
            "replica %d restarted from %s: term %d, log %d..%d, commit %d, "
            "ledger height %d at raft index %d", self.index, self.dir, hard.term,
            self.storage.first_index(), last, commit, self.ledger.height,
            self.ledger.applied_raft_index,
        )
        return node

    async def _refill_from_peers(self) -> None:
        """After a cut log tail, copy the committed entries peers hold past our
        last known-committed index (the cut may have lost entries this replica
        had acknowledged, which a leader would never send again)."""
        hard = self.storage.hard_state()
        last = self.storage.last_index()
        lo = min(max(hard.commit, self.ledger.applied_raft_index), last) + 1
        start = lo
        for raft_id in self.voters:
            if raft_id == self.id:
                continue
            try:
                handle = ray.get_actor(replica_name(self.ledger_id, raft_id - 1))
            except ValueError:
                continue
            more = True
            while more:
                try:
                    part = await asyncio.wait_for(handle.committed_log.remote(lo), 5.0)
                except Exception as exc:  # that peer is down: ask the next one
                    log.info("replica %d: peer %d gave no entries (%s)", self.index,
                             raft_id - 1, type(exc).__name__)
                    break
                if part["snapshot"] is not None:
                    snap = Snapshot(*part["snapshot"])
                    await asyncio.to_thread(
                        self.storage.apply_snapshot, snap, replace_log=True
                    )
                    lo = snap.index + 1
                entries = [Entry(*e) for e in part["entries"]]
                if entries:
                    # append() truncates our uncommitted suffix where they differ.
                    await asyncio.to_thread(self.storage.append, entries)
                    lo = entries[-1].index + 1
                more = part["more"] and bool(entries)
        log.warning("replica %d: after the repaired tail, copied committed entries "
                    "%d..%d from peers", self.index, start, lo - 1)

    async def committed_log(self, lo: int, max_entries: int = 2000) -> dict:
        """Committed entries from index `lo` (with the snapshot when `lo` was
        compacted away): what a replica with a cut log tail copies at start.

        Returns {"snapshot": (index, term, voters, data) or None, "entries":
        [(index, term, type, data), ...], "more": bool}.
        """
        lg = self.node.log
        snap = None
        if lo <= lg.snapshot_index and self.node.snapshot is not None:
            snap = tuple(self.node.snapshot)
            lo = self.node.snapshot.index + 1
        hi = min(lg.committed, lo + max_entries - 1)
        entries = lg.slice(lo, hi) if hi >= lo else ()
        return {"snapshot": snap, "entries": [tuple(e) for e in entries],
                "more": hi < lg.committed}

    def _stored_outcomes(self) -> dict[int, tuple[int, list[dict]]]:
        """Raft index -> (block height, outcomes) of the blocks stored so far."""
        out: dict[int, tuple[int, list[dict]]] = {}
        for record in self.ledger.records():
            height, outcomes = out.setdefault(record.raft_index, (record.height, []))
            outcomes.append({"entry_id": record.entry_id,
                             "accepted": record.accepted, "reason": record.reason})
        return out

    # -- the loop ------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tick_s = self.config.tick_s
        next_tick = loop.time() + tick_s
        while not self._stopped:
            try:
                wait_s = max(0.0, next_tick - loop.time())
                await asyncio.wait_for(self._wake.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                # One tick per turn at most: a stalled process slows its
                # logical clock instead of firing a burst of elections.
                if loop.time() >= next_tick:
                    self.node.tick()
                    next_tick = loop.time() + tick_s
                inbox, self._inbox = self._inbox, []
                for message in inbox:
                    if message.dst == self.id:
                        self.node.step(message)
                self._propose()
                while self.node.has_ready():
                    await self._handle_ready(self.node.ready())
                self._after_role_change()
                await self._maybe_compact()
            except Exception:
                # A failed disk write leaves memory ahead of the files: only a
                # restart (constructor replays the disk) is safe now.
                log.exception("replica %d: loop failed; exiting for a restart",
                              self.index)
                logging.shutdown()
                os._exit(1)

    async def _handle_ready(self, rd: Ready) -> None:
        if rd.must_sync:
            await asyncio.to_thread(self._persist, rd)
        self._send(rd.messages)
        finished = []
        if rd.snapshot is not None or rd.committed_entries:
            async with self._ledger_lock:
                finished = await asyncio.to_thread(self._apply, rd)
        self.node.advance(rd)
        for key, result in finished:
            future = self._pending.pop(key, None)
            if future is not None and not future.done():
                future.set_result(result)

    def _persist(self, rd: Ready) -> None:
        hard = rd.hard_state
        if hard is not None:
            stored = self.storage.hard_state()
            # The commit index alone may lag on disk (see module docstring).
            if (hard.term, hard.vote) == (stored.term, stored.vote):
                hard = None
        self.storage.save(rd.snapshot, rd.entries, hard)

    def _apply(self, rd: Ready) -> list[tuple[str, dict]]:
        finished: list[tuple[str, dict]] = []
        snap = rd.snapshot
        if snap is not None and snap.index > self._keys_applied:
            ledger_data, results = decode_snapshot(snap.data)
            self.ledger.restore(ledger_data)
            self.results = results
            self._keys_applied = snap.index
            self._block_outcomes = self._stored_outcomes()
        for entry in rd.committed_entries:
            finished.extend(self._apply_entry(entry))
        return finished

    def _apply_entry(self, entry: Entry) -> list[tuple[str, dict]]:
        """Apply one committed entry; returns (key, result) of its submissions."""
        if entry.index <= self._keys_applied:
            return []
        self._keys_applied = entry.index
        submissions = None
        if entry.type == EntryType.NORMAL:
            submissions = decode_submissions(entry.data)
            if submissions is None and entry.data:
                # Not ours: keep it on the chain as the ledger judges it.
                self.ledger.apply_raft_entry(entry.index, entry.data)
                return []
        if not submissions:
            self.ledger.apply_raft_entry(entry.index, b"")
            return []

        # Keys seen before (in the table or earlier in this entry) are skipped.
        fresh: list[tuple[str, list[bytes]]] = []
        seen: set[str] = set()
        for key, entries in submissions:
            if key not in self.results and key not in seen:
                fresh.append((key, entries))
                seen.add(key)
        outcomes = self._judge(entry.index, [e for _, e in fresh])
        height = outcomes[0] if outcomes else 0
        position = 0
        for key, entries in fresh:
            mine = outcomes[1][position : position + len(entries)]
            self.results[key] = _result(entry.index, height, mine)
            position += len(entries)
        return [(key, self.results[key]) for key, _ in submissions]

    def _judge(self, raft_index: int, batches: list[list[bytes]]):
        """(height, outcomes) of the block for `raft_index`: built now, or read
        back when this replica applied it before a restart; None when empty."""
        flat = [raw for batch in batches for raw in batch]
        if raft_index <= self.ledger.applied_raft_index:
            stored = self._block_outcomes.get(raft_index)
            if not flat:
                return None
            if stored is None or len(stored[1]) != len(flat):
                raise RuntimeError(
                    f"replica {self.index}: raft index {raft_index} holds "
                    f"{len(flat)} new entries but the stored block holds "
                    f"{None if stored is None else len(stored[1])}; the block file "
                    "and the Raft log disagree: rebuild this replica from a healthy one"
                )
            return stored
        self._block_outcomes.clear()  # past the restart's blocks: not needed
        if not flat:
            self.ledger.apply_raft_entry(raft_index, b"")
            return None
        block = self.ledger.apply_batch(raft_index, flat)
        outcomes = [{"entry_id": item.id, "accepted": item.accepted,
                     "reason": item.reason} for item in block.entries]
        return block.height, outcomes

    def _propose(self) -> None:
        if not self._queue:
            return
        if self.node.role is not Role.LEADER:
            self._fail_pending()
            return
        limit = self.config.max_batch_entries
        while self._queue:
            batch, count = [], 0
            while self._queue and (
                not batch or count + len(self._queue[0][1]) <= limit
            ):
                key, entries = self._queue.pop(0)
                batch.append((key, entries))
                count += len(entries)
            self.node.propose(encode_submissions(batch))

    def _after_role_change(self) -> None:
        role = self.node.role
        if role is not self._last_role:
            if Role.LEADER in (role, self._last_role):
                log.info("replica %d is now %s at term %d", self.index, role.value,
                         self.node.term)
            self._last_role = role
        if role is not Role.LEADER and (self._pending or self._queue):
            self._fail_pending()

    def _fail_pending(self) -> None:
        error = NotLeader(self.index, self._leader_index())
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # mark retrieved: callers may have gone
        self._pending.clear()
        self._queue.clear()

    async def _maybe_compact(self) -> None:
        every = self.config.compact_every
        applied = self.ledger.applied_raft_index
        if not every or applied - self._last_compacted < every:
            return
        if applied != self._keys_applied or applied != self.node.log.applied:
            return
        async with self._ledger_lock:
            data = await asyncio.to_thread(self._durable_snapshot)
        snap = self.node.compact(applied, data)
        await asyncio.to_thread(self.storage.apply_snapshot, snap)
        self._last_compacted = applied
        log.info("replica %d compacted its log up to raft index %d (%d bytes)",
                 self.index, applied, len(data))

    def _durable_snapshot(self) -> bytes:
        """Snapshot data at the applied index, once every block up to it is
        durable: the Raft entries it replaces are the blocks' only other copy."""
        self.ledger.sync()
        return encode_snapshot(self.ledger.snapshot(), self.results)

    # -- transport -----------------------------------------------------------

    def _peer(self, raft_id: int):
        handle = self._peers.get(raft_id)
        if handle is not None:
            return handle
        now = time.monotonic()
        if now - self._peer_lookup_at.get(raft_id, 0.0) < _PEER_RETRY_S:
            return None
        self._peer_lookup_at[raft_id] = now
        try:
            handle = ray.get_actor(replica_name(self.ledger_id, raft_id - 1))
        except ValueError:
            log.debug("replica %d: peer %d not found", self.index, raft_id - 1)
            return None
        self._peers[raft_id] = handle
        return handle

    def _send(self, messages: tuple[Message, ...]) -> None:
        by_peer: dict[int, list[Message]] = {}
        for message in messages:
            by_peer.setdefault(message.dst, []).append(message)
        for raft_id, batch in by_peer.items():
            handle = self._peer(raft_id)
            if handle is None:
                continue
            ref = handle.step.remote(batch)
            asyncio.ensure_future(self._watch_send(raft_id, handle, ref))

    async def _watch_send(self, raft_id: int, handle, ref) -> None:
        try:
            await ref
        except Exception as exc:  # a dead or restarting peer: Raft resends
            log.debug("replica %d: message to %d lost: %s", self.index,
                      raft_id - 1, type(exc).__name__)
            if self._peers.get(raft_id) is handle:
                del self._peers[raft_id]

    # -- calls -----------------------------------------------------------------

    async def step(self, messages: list[Message]) -> None:
        """step queues peers' Raft messages for the loop (fire-and-forget)."""
        self._inbox.extend(messages)
        self._wake.set()

    async def submit(self, entries: list[bytes], key: str | None = None) -> dict:
        """submit appends `entries` (signed ledger entries) as one submission.

        Returns {"index": Raft index, "block_height", "outcomes": [{"entry_id",
        "accepted", "reason"}, ...]} once the entries are committed and applied
        here. A key already applied returns the original result, unchanged.
        Raises NotLeader(leader_hint) off the leader, TimeoutError after
        `config.submit_timeout_s` seconds (retry with the same key).
        """
        waiting = self._enqueue(entries, key)
        if isinstance(waiting, dict):
            return waiting
        return (await self._wait([waiting]))[0]

    async def submit_many(self, submissions: list[tuple[list[bytes], str]]) -> list:
        """submit_many is `submit` for several (entries, key) pairs in one call.

        Returns their results in order; the pairs may share Raft entries with
        each other and with other callers' submissions. All or nothing as far
        as the answer goes: any NotLeader or timeout raises for the whole call
        (retry every pair with its key; those that landed return their result).
        """
        waiting = [self._enqueue(entries, key) for entries, key in submissions]
        futures = [w for w in waiting if not isinstance(w, dict)]
        done = iter(await self._wait(futures)) if futures else iter(())
        return [w if isinstance(w, dict) else next(done) for w in waiting]

    def _enqueue(self, entries: list[bytes], key: str | None):
        """The stored result of `key`, or a future for it (queued when new)."""
        if not entries:
            raise ValueError("submit needs at least one entry, got an empty list")
        if len(entries) > self.config.max_batch_entries:
            raise ValueError(
                f"submit of {len(entries)} entries exceeds max_batch_entries="
                f"{self.config.max_batch_entries}; split it"
            )
        key = default_key(entries) if key is None else str(key)
        if not 0 < len(key) <= MAX_KEY_CHARS:
            raise ValueError(f"idempotency key must be 1..{MAX_KEY_CHARS} characters")
        done = self.results.get(key)
        if done is not None:
            return done
        if self.node.role is not Role.LEADER:
            raise NotLeader(self.index, self._leader_index())

        future = self._pending.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[key] = future
            self._queue.append((key, [bytes(raw) for raw in entries]))
            self._wake.set()
        return future

    async def _wait(self, futures: list[asyncio.Future]) -> list[dict]:
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(asyncio.shield(f) for f in futures)),
                self.config.submit_timeout_s,
            )
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"replica {self.index}: {len(futures)} submission(s) not applied "
                f"within {self.config.submit_timeout_s} s; retry with the same keys"
            ) from None

    def _leader_index(self) -> int | None:
        lead = self.node.lead
        return None if lead is None else lead - 1

    async def status(self) -> dict:
        """Role, term, leader (replica index), commit, applied and last index."""
        node = self.node
        return {
            "replica": self.index, "role": node.role.value, "term": node.term,
            "leader": self._leader_index(), "commit": node.log.committed,
            "applied": self.ledger.applied_raft_index,
            "last_index": node.log.last_index(), "height": self.ledger.height,
            "started_at": self.started_at,
            "repaired": (self.storage.repair.describe()
                         if self.storage.repair is not None else None),
        }

    async def head(self) -> dict:
        """The chain head: height, hash, Raft index and ledger state hash."""
        async with self._ledger_lock:
            return {"replica": self.index, "height": self.ledger.height,
                    "hash": self.ledger.head_hash,
                    "raft_index": self.ledger.applied_raft_index,
                    "state_hash": self.ledger.state.state_hash()}

    async def query(
        self, round: int | None = None, member: str | None = None,
        type: str | None = None, accepted: bool | None = None,
    ) -> list[dict]:
        """Entries on this replica's chain matching every filter given.

        Entries before a snapshot anchor are not held (see ``Ledger.restore``).
        """
        async with self._ledger_lock:
            records = self.ledger.records(round=round, member=member, type=type,
                                          accepted=accepted)
            return [asdict(record) for record in records]

    async def blocks_path(self) -> str:
        """This replica's directory (holds ``blocks.log``; for ``ledger verify``)."""
        return str(self.dir)

    async def stop(self) -> None:
        """stop ends the loop and closes the files; the actor stays to be killed."""
        self._stopped = True
        self._wake.set()
        try:
            await self._task
        finally:
            self.storage.close()
            self.ledger.close()

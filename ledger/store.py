"""The ledger of one replica: rules, chain and block file bound together.

``Ledger.apply_raft_entry(index, data)`` is what a replica calls for each
committed Raft entry, in order: the data is a batch of ledger entries
(``ledger.entries.encode_batch``), every entry gets a verdict from
``LedgerState`` and the batch becomes one block, fsynced before returning
(with ``sync_blocks=False``: written, and fsynced only at ``sync`` or
``close``; see ``Ledger``).
Raft indexes at or below the last applied one are ignored, so re-delivery
after a restart is harmless. Empty Raft entries (a new leader's no-op) make no
block.

At startup a replica compares its Raft snapshot with ``applied_raft_index``:
when the snapshot is ahead (a crash between saving a received snapshot and
``restore``), it calls ``restore(snapshot.data)`` before applying entries.

Replica directory::

    dir/blocks.log   the chain (``ledger.chain.BlockStore``)
    dir/state.snap   only after ``restore``: the state at the anchor

At open the state is rebuilt by re-applying every stored block's entries and
checking that each verdict matches the stored one; a mismatch means the rules
or the file changed, and raises.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Iterator

from ledger import entries as E
from ledger.chain import (
    BLOCKS_FILE, Anchor, Block, BlockEntry, BlockStore, VerifyResult, make_proof,
    check_block, read_anchor, verify,
)
from ledger.genesis import Genesis
from ledger.recordlog import TailRepair, atomic_write
from ledger.rules import LedgerState

log = logging.getLogger(__name__)

STATE_FILE = "state.snap"


class DivergedError(RuntimeError):
    """A stored block does not follow its predecessor, or re-applying it gave
    a different verdict than the one stored."""


@dataclass(frozen=True)
class EntryRecord:
    """One entry as the ledger holds it, for queries and export."""

    entry_id: str
    height: int
    raft_index: int
    seq: int
    position: int
    accepted: bool
    reason: str | None
    type: str | None
    signer: str | None
    nonce: str | None
    timestamp: float | None
    body: dict | None

    def members(self) -> set[str]:
        """Member ids this entry concerns: its signer and any it names."""
        names = {self.signer} if self.signer else set()
        body = self.body or {}
        if "hospital" in body:
            names.add(body["hospital"])
        if isinstance(body.get("member"), dict):
            names.add(body["member"].get("id"))
        return names


def block_records(
    block: Block, first_seq: int, parsed: list | None = None
) -> list[EntryRecord]:
    """Records of a block's entries; ``parsed`` are their parsed entries if known."""
    if parsed is None:
        parsed = []
        for item in block.entries:
            try:
                parsed.append(E.parse(item.raw))
            except E.MalformedEntry:
                parsed.append(None)
    out = []
    for position, (item, entry) in enumerate(zip(block.entries, parsed)):
        out.append(EntryRecord(
            item.id, block.height, block.raft_index, first_seq + position,
            position, item.accepted, item.reason,
            entry.type if entry else None, entry.signer if entry else None,
            entry.nonce if entry else None, entry.timestamp if entry else None,
            entry.body if entry else None,
        ))
    return out


def filter_records(
    records: list[EntryRecord], *, round: int | None = None,
    member: str | None = None, type: str | None = None,
    accepted: bool | None = None,
) -> list[EntryRecord]:
    """The records matching every filter given."""
    out = []
    for record in records:
        if type is not None and record.type != type:
            continue
        if round is not None and (record.body or {}).get("round") != round:
            continue
        if member is not None and member not in record.members():
            continue
        if accepted is not None and record.accepted != accepted:
            continue
        out.append(record)
    return out


def find_record(records: list[EntryRecord], entry_id: str, where: str) -> EntryRecord:
    """The first record with ``entry_id`` (or a unique prefix of 8+ characters).

    Raises ValueError naming the problem: not hex, a prefix under 8
    characters, an ambiguous prefix, or an id not in ``records``.
    """
    entry_id = entry_id.strip().lower()
    if not entry_id or any(c not in "0123456789abcdef" for c in entry_id):
        raise ValueError(f"entry id {entry_id!r} is not hex; give the entry id "
                         "as shown by `medfed ledger show`")
    if len(entry_id) < 8:
        raise ValueError(f"entry id prefix {entry_id!r} has {len(entry_id)} "
                         "characters; an id prefix needs at least 8 hex "
                         "characters (or give the full 64)")
    exact = [r for r in records if r.entry_id == entry_id]
    if exact:
        return exact[0]
    ids = {r.entry_id for r in records
           if len(entry_id) >= 8 and r.entry_id.startswith(entry_id)}
    if len(ids) == 1:
        return next(r for r in records if r.entry_id in ids)
    if len(ids) > 1:
        raise ValueError(f"entry id prefix {entry_id!r} matches {len(ids)} entries")
    raise ValueError(f"entry {entry_id!r} is not in the ledger at {where}")


def verify_replica(directory: str | Path, genesis: Genesis) -> VerifyResult:
    """``ledger.chain.verify`` of a replica directory, re-judging every entry.

    Starts from the genesis members, or from ``state.snap`` when the block file
    begins at a snapshot anchor. Reads only; repairs nothing.
    """
    directory = Path(directory)
    state = LedgerState(genesis.members)
    snap = directory / STATE_FILE
    if read_anchor(directory) is not None and snap.exists():
        state = Ledger._decode_snapshot(snap.read_bytes())[0]
    return verify(directory, genesis.hash(), state=state)


def write_jsonl(records: list[EntryRecord], out: IO[str]) -> int:
    """Write one JSON object per record to ``out``; returns how many."""
    for record in records:
        out.write(json.dumps(asdict(record), sort_keys=True) + "\n")
    return len(records)


class Ledger:
    """Rules + chain + block file of one replica directory.

    Not thread-safe: one caller (the replica) applies entries in Raft order.

    sync_blocks: True (default): each block is fsynced before ``apply_batch``
        returns. False: blocks are fsynced only by ``sync`` and ``close``, for
        a caller whose own durable log (a Raft log) holds every applied entry
        and re-applies those after ``applied_raft_index`` when it reopens: a
        machine crash may cut the unsynced blocks (the torn tail is repaired
        at open and ``applied_raft_index`` falls back). Such a caller must
        call ``sync`` before discarding log entries (compaction).

    Attributes:
        state: the ``LedgerState`` after every applied entry.
        repair: torn tail cut from the block file at open, or None.
    """

    def __init__(
        self, directory: str | Path, genesis: Genesis, sync_blocks: bool = True
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.genesis = genesis
        self._genesis_hash = genesis.hash()
        self._blocks = BlockStore(self.dir / BLOCKS_FILE)
        self.repair: TailRepair | None = self._blocks.repair
        # BlockStore appends through its RecordLog; its sync policy is set here.
        self._block_log = self._blocks._log
        self._block_log.sync_appends = sync_blocks
        self._records: list[EntryRecord] = []
        self._applied_raft_index = 0

        anchor = self._blocks.anchor
        if anchor is not None:
            snap = self.dir / STATE_FILE
            if not snap.exists():
                raise FileNotFoundError(
                    f"{self.dir} starts from a snapshot anchor but {snap} is missing"
                )
            self.state = self._decode_snapshot(snap.read_bytes())[0]
            self._applied_raft_index = anchor.raft_index
        else:
            self.state = LedgerState(genesis.members)

        # The chain must hang together before its verdicts are trusted.
        height = anchor.height + 1 if anchor else 1
        prev = anchor.hash if anchor else self._genesis_hash
        for block in self._blocks.blocks():
            problem = check_block(block, height, prev)
            if problem:
                raise DivergedError(
                    f"{self.dir / BLOCKS_FILE}: block {height}: {problem}; check it "
                    "with `medfed ledger verify` and restore this replica from a "
                    "healthy one"
                )
            self._replay(block)
            height, prev = height + 1, block.hash
        log.info(
            "ledger %s opened: %d blocks, %d entries, state %s",
            self.dir, len(self._blocks), self.state.applied_index,
            self.state.state_hash()[:12],
        )

    # -- applying -----------------------------------------------------------

    @property
    def applied_raft_index(self) -> int:
        """The last Raft index applied (persisted through the blocks)."""
        return self._applied_raft_index

    @property
    def height(self) -> int:
        head = self._blocks.head
        return head.height if head is not None else 0

    @property
    def head_hash(self) -> str:
        """Hash of the last block (the genesis hash before any block)."""
        head = self._blocks.head
        return head.hash if head is not None else self._genesis_hash

    def apply_raft_entry(self, raft_index: int, data: bytes) -> Block | None:
        """Apply one committed Raft entry's data; None when it makes no block."""
        if not data:
            self._applied_raft_index = max(self._applied_raft_index, raft_index)
            return None
        try:
            batch = E.decode_batch(data)
        except E.MalformedEntry:
            # Kept as one (rejected) entry so the bad data stays on the chain.
            batch = [bytes(data)]
        return self.apply_batch(raft_index, batch)

    def apply_batch(self, raft_index: int, entry_bytes: list[bytes]) -> Block | None:
        """Judge each entry, store them as one block (fsync unless
        ``sync_blocks`` is False), return it.

        Returns None when ``raft_index`` was already applied. If writing the
        block fails (``OSError``), the in-memory state is already ahead of the
        file: discard this ``Ledger`` and reopen it, which replays the file.
        """
        if raft_index <= self._applied_raft_index:
            log.debug("raft index %d already applied; skipped", raft_index)
            return None
        block_entries = []
        outcomes = []
        for raw in entry_bytes:
            outcome = self.state.apply(bytes(raw), self.state.applied_index + 1)
            outcomes.append(outcome)
            if not outcome.accepted:
                entry = outcome.entry
                log.info(
                    "raft index %d: %s from %s rejected: %s", raft_index,
                    entry.type if entry else "entry", entry.signer if entry else "?",
                    outcome.reason,
                )
            block_entries.append(
                BlockEntry(bytes(raw), outcome.accepted, outcome.reason)
            )
        block = Block.build(self.height + 1, self.head_hash, raft_index, block_entries)
        self._blocks.append(block)
        self._index(block, [o.entry for o in outcomes])
        self._applied_raft_index = raft_index
        return block

    def _replay(self, block: Block) -> None:
        parsed = []
        for position, item in enumerate(block.entries):
            outcome = self.state.apply(item.raw, self.state.applied_index + 1)
            if (outcome.accepted, outcome.reason) != (item.accepted, item.reason):
                raise DivergedError(
                    f"{self.dir}: block {block.height} entry {position} is stored as "
                    f"{(item.accepted, item.reason)} but the rules now give "
                    f"{(outcome.accepted, outcome.reason)}"
                )
            parsed.append(outcome.entry)
        self._index(block, parsed)
        self._applied_raft_index = block.raft_index

    def _index(self, block: Block, parsed: list) -> None:
        first_seq = self.state.applied_index - len(block.entries) + 1
        self._records.extend(block_records(block, first_seq, parsed))

    # -- snapshots ----------------------------------------------------------

    def snapshot(self) -> bytes:
        """State and chain head as bytes: a Raft snapshot at ``applied_raft_index``."""
        return E.canonical({
            "state": self.state.to_dict(),
            "head": {"height": self.height, "hash": self.head_hash,
                     "raft_index": self._applied_raft_index},
        })

    @staticmethod
    def _decode_snapshot(data: bytes) -> tuple[LedgerState, Anchor]:
        try:
            raw = json.loads(data)
            head = raw["head"]
            anchor = Anchor(int(head["height"]), str(head["hash"]),
                            int(head["raft_index"]))
            state = LedgerState.restore(E.canonical(raw["state"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"unreadable ledger snapshot: {exc}") from exc
        return state, anchor

    def restore(self, data: bytes) -> None:
        """Replace this replica's state and chain with a snapshot from ``snapshot()``.

        Blocks before the snapshot are not copied: the block file restarts
        with an anchor naming the last block's height and hash.
        """
        state, anchor = self._decode_snapshot(data)
        if anchor.raft_index <= self._applied_raft_index:
            # Already past it (a snapshot re-sent after we caught up): keep ours.
            log.info("snapshot at raft index %d is not ahead of applied %d; ignored",
                     anchor.raft_index, self._applied_raft_index)
            return
        atomic_write(self.dir / STATE_FILE, bytes(data))
        self._blocks.reset_to_anchor(anchor)
        self.state = state
        self._records = []
        self._applied_raft_index = anchor.raft_index
        log.info("ledger %s restored from snapshot at block %d (raft index %d)",
                 self.dir, anchor.height, anchor.raft_index)

    # -- queries ------------------------------------------------------------

    def blocks(self) -> Iterator[Block]:
        return self._blocks.blocks()

    def records(
        self, *, round: int | None = None, member: str | None = None,
        type: str | None = None, accepted: bool | None = None,
    ) -> list[EntryRecord]:
        """Entries matching every filter given (round in the body, member, type)."""
        return filter_records(self._records, round=round, member=member, type=type,
                              accepted=accepted)

    def find(self, entry_id: str) -> EntryRecord:
        """The entry with this id (a unique prefix of 8+ hex characters works)."""
        return find_record(self._records, entry_id, where=str(self.dir))

    def prove(self, entry_id: str) -> dict:
        """Inclusion proof of an entry (see ``ledger.chain.make_proof``)."""
        record = self.find(entry_id)
        return make_proof(self._blocks.get(record.height), record.position)

    def export_jsonl(self, out: IO[str]) -> int:
        """Write one JSON object per entry to ``out``; returns how many."""
        return write_jsonl(self._records, out)

    def sync(self) -> None:
        """Make every stored block durable (fsync, only when one is pending)."""
        self._block_log.sync()

    def close(self) -> None:
        """Sync pending blocks and close the block file."""
        self._blocks.close()

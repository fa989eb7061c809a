"""Blocks, the per-replica block file, and the chain check.

One committed Raft log entry becomes one block; the Raft entry carries a batch
of ledger entries, so group commit makes few large blocks and every replica,
applying the same committed log, builds the identical chain.

A block's header is ``{height, prev_hash, raft_index, merkle_root, count}``
and its hash is SHA-256 of the header's canonical JSON. The Merkle root
(RFC 6962 hashing, ``ledger.merkle``) covers one leaf per entry: the canonical
JSON of ``{entry_id, accepted, reason}``, so an outcome cannot be changed
without changing the root. Block 1's ``prev_hash`` is the genesis hash.

The block file is a ``RecordLog`` (checksummed, fsync per append) of block
JSON. A replica restored from a snapshot starts its file with an anchor record
``{"anchor": {height, hash, raft_index}}`` instead of the blocks it never saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import merkle
from ledger.entries import canonical, entry_id
from ledger.recordlog import CorruptLogError, RecordLog, TailRepair, scan

log = logging.getLogger(__name__)

BLOCKS_FILE = "blocks.log"


@dataclass(frozen=True)
class BlockEntry:
    """One ledger entry inside a block, with the rules' verdict on it."""

    raw: bytes
    accepted: bool
    reason: str | None

    @property
    def id(self) -> str:
        return entry_id(self.raw)

    def leaf(self) -> bytes:
        """The Merkle leaf data of this entry."""
        return canonical(
            {"entry_id": self.id, "accepted": self.accepted, "reason": self.reason}
        )


@dataclass(frozen=True)
class Block:
    height: int
    prev_hash: str
    raft_index: int
    entries: tuple[BlockEntry, ...]
    merkle_root: str
    hash: str

    @staticmethod
    def build(
        height: int, prev_hash: str, raft_index: int, entries: list[BlockEntry]
    ) -> "Block":
        root = merkle.root([e.leaf() for e in entries]).hex()
        header = _header(height, prev_hash, raft_index, root, len(entries))
        return Block(height, prev_hash, raft_index, tuple(entries), root,
                     hash_header(header))

    def header(self) -> dict:
        return _header(self.height, self.prev_hash, self.raft_index,
                       self.merkle_root, len(self.entries))

    def to_bytes(self) -> bytes:
        return canonical({
            "header": self.header(),
            "hash": self.hash,
            "entries": [
                {"entry": e.raw.hex(), "accepted": e.accepted, "reason": e.reason}
                for e in self.entries
            ],
        })

    @staticmethod
    def from_bytes(data: bytes) -> "Block":
        """Decode a stored block as written, without checking its hashes."""
        raw = json.loads(data)
        h = raw["header"]
        entries = tuple(
            BlockEntry(bytes.fromhex(e["entry"]), bool(e["accepted"]), e["reason"])
            for e in raw["entries"]
        )
        return Block(int(h["height"]), str(h["prev_hash"]), int(h["raft_index"]),
                     entries, str(h["merkle_root"]), str(raw["hash"]))


def _header(height: int, prev: str, raft_index: int, root: str, count: int) -> dict:
    return {"height": height, "prev_hash": prev, "raft_index": raft_index,
            "merkle_root": root, "count": count}


def hash_header(header: dict) -> str:
    return hashlib.sha256(canonical(header)).hexdigest()


def check_block(block: Block, height: int, prev_hash: str | None) -> str | None:
    """Why ``block`` is not a valid block at ``height`` after ``prev_hash``, or None."""
    if block.height != height:
        return f"height is {block.height}, expected {height}"
    if prev_hash is not None and block.prev_hash != prev_hash:
        return (f"prev_hash {block.prev_hash[:16]} does not match the previous "
                f"block's hash {prev_hash[:16]}")
    root = merkle.root([e.leaf() for e in block.entries]).hex()
    if root != block.merkle_root:
        return (f"merkle root {block.merkle_root[:16]} does not match its "
                f"entries ({root[:16]})")
    if hash_header(block.header()) != block.hash:
        return f"block hash {block.hash[:16]} does not match its header"
    return None


@dataclass(frozen=True)
class Anchor:
    """Where a block file starts when its replica was restored from a snapshot."""

    height: int
    hash: str
    raft_index: int


def _decode_record(payload: bytes) -> Block | Anchor:
    raw = json.loads(payload)
    if "anchor" in raw:
        a = raw["anchor"]
        return Anchor(int(a["height"]), str(a["hash"]), int(a["raft_index"]))
    return Block.from_bytes(payload)


class BlockStore:
    """The append-only block file of one replica.

    Attributes:
        repair: the torn tail cut at open (``TailRepair``) or None.
        anchor: the snapshot anchor the file starts from, or None.
    """

    def __init__(self, path: str | Path) -> None:
        self._log = RecordLog(path)
        self.path = self._log.path
        self.repair: TailRepair | None = self._log.repair
        self.anchor: Anchor | None = None
        self._heights: list[int] = []
        self._last: Block | None = None
        for position, payload in enumerate(self._log):
            record = _decode_record(payload)
            if isinstance(record, Anchor):
                if position != 0:
                    raise CorruptLogError(f"{self.path}: anchor at record {position}")
                self.anchor = record
                continue
            self._heights.append(record.height)
            self._last = record

    def __len__(self) -> int:
        return len(self._heights)

    @property
    def head(self) -> Block | Anchor | None:
        """The last block, else the anchor, else None (empty chain)."""
        return self._last if self._last is not None else self.anchor

    def blocks(self):
        """Every stored block, oldest first (the anchor is skipped)."""
        for payload in self._log:
            record = _decode_record(payload)
            if isinstance(record, Block):
                yield record

    def get(self, height: int) -> Block:
        first = self._heights[0] if self._heights else 1
        position = height - first + (1 if self.anchor else 0)
        if not self._heights or not first <= height <= self._heights[-1]:
            raise KeyError(f"block {height} is not in {self.path}")
        block = _decode_record(self._log.read(position))
        assert isinstance(block, Block) and block.height == height
        return block

    def append(self, block: Block) -> None:
        """Persist ``block`` (fsync) after the current head."""
        self._log.append(block.to_bytes())
        self._heights.append(block.height)
        self._last = block

    def reset_to_anchor(self, anchor: Anchor) -> None:
        """Replace the file with just ``anchor`` (after installing a snapshot)."""
        record = canonical({"anchor": {"height": anchor.height, "hash": anchor.hash,
                                       "raft_index": anchor.raft_index}})
        self._log.rewrite([record])
        self.anchor, self._heights, self._last = anchor, [], None

    def close(self) -> None:
        self._log.close()


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of walking a block file.

    ``first_bad_height`` names the first block that fails (None when ok).
    """

    ok: bool
    blocks: int
    first_bad_height: int | None
    reason: str | None
    head_hash: str | None = None


def _block_file(path: str | Path) -> Path:
    """The block file named by ``path``, or the one inside folder ``path``."""
    path = Path(path)
    return path / BLOCKS_FILE if path.is_dir() else path


def _scan_block_file(path: str | Path) -> tuple[list, int, str | None, int]:
    """``scan`` of the block file at ``path`` plus the file's size in bytes.

    Raises FileNotFoundError when there is no such file.
    """
    path = _block_file(path)
    if not path.exists():
        raise FileNotFoundError(f"block file {path} not found")
    data = path.read_bytes()
    return (*scan(data), len(data))


def verify(
    path: str | Path, genesis_hash: str | None = None, state: Any = None
) -> VerifyResult:
    """Walk the chain in ``path`` (a block file or a replica directory) read-only.

    Checks record checksums, heights, each ``prev_hash``, each Merkle root and
    each block hash; with ``genesis_hash``, block 1 must follow it. With
    ``state`` (a ``LedgerState`` at the start of the file, which this call
    advances) every entry is re-judged by the rules and must carry the stored
    verdict, so a forged verdict is caught even when all hashes were redone.
    A damaged record is reported as the block at the height where it stands.
    """
    records, end, why, size = _scan_block_file(path)

    prev = genesis_hash
    height = 1
    count = 0
    for position, (offset, payload) in enumerate(records):
        try:
            record = _decode_record(payload)
        except (ValueError, KeyError, TypeError) as exc:
            return VerifyResult(False, count, height,
                                f"block record at offset {offset} is unreadable: {exc}",
                                prev)
        if isinstance(record, Anchor):
            if position != 0:
                return VerifyResult(False, count, height,
                                    f"anchor record at offset {offset} is not first",
                                    prev)
            height, prev = record.height + 1, record.hash
            continue
        problem = check_block(record, height, prev)
        if problem is None and state is not None:
            problem = _rejudge(record, state)
        if problem:
            return VerifyResult(False, count, height, f"block {height}: {problem}",
                                prev)
        prev = record.hash
        height += 1
        count += 1
    if end < size:
        return VerifyResult(
            False, count, height,
            f"block {height}: record at offset {end} of {_block_file(path)} "
            f"is damaged ({why})",
            prev,
        )
    return VerifyResult(True, count, None, None, prev)


def _rejudge(block: Block, state: Any) -> str | None:
    """Why the rules disagree with a verdict stored in ``block``, or None."""
    for position, item in enumerate(block.entries):
        outcome = state.apply(item.raw, state.applied_index + 1)
        if (outcome.accepted, outcome.reason) != (item.accepted, item.reason):
            stored = _verdict(item.accepted, item.reason)
            judged = _verdict(outcome.accepted, outcome.reason)
            return f"entry {position} is stored as {stored} but the rules give {judged}"
    return None


def _verdict(accepted: bool, reason: str | None) -> str:
    return "accepted" if accepted else f"rejected ({reason})"


# -- inclusion proofs ----------------------------------------------------------

def make_proof(block: Block, position: int) -> dict:
    """A self-contained proof that entry ``position`` of ``block`` is in the chain.

    Holds the entry bytes (hex), its leaf, the audit path, and the block
    header, so a checker needs only a trusted Merkle root or block hash.
    """
    entry = block.entries[position]
    leaves = [e.leaf() for e in block.entries]
    return {
        "entry_id": entry.id,
        "entry": entry.raw.hex(),
        "leaf": {"entry_id": entry.id, "accepted": entry.accepted,
                 "reason": entry.reason},
        "leaf_index": position,
        "tree_size": len(leaves),
        "path": [h.hex() for h in merkle.inclusion_path(position, leaves)],
        "merkle_root": block.merkle_root,
        "block": block.header(),
        "block_hash": block.hash,
    }


_PROOF_FIELDS = ("entry_id", "entry", "leaf", "leaf_index", "tree_size", "path",
                 "merkle_root", "block", "block_hash")


def verify_proof(proof: dict, root: str | None = None) -> bool:
    """True when ``proof`` shows its entry under ``root``.

    ``root`` is a trusted Merkle root or block hash (hex); without it the
    proof is checked against its own block header (consistency only). Raises
    ``ValueError`` when the proof is not a proof at all (missing or mistyped
    fields); returns False when it is one but does not verify.
    """
    return proof_problem(proof, root) is None


def proof_problem(proof: dict, root: str | None = None) -> str | None:
    """Why ``proof`` does not show its entry under ``root``, or None when it does.

    Same checks and ``ValueError`` as ``verify_proof``; the reason names the
    first check that failed, with the values involved.
    """
    if not isinstance(proof, dict):
        raise ValueError(f"a proof is a JSON object, got {type(proof).__name__}")
    missing = [f for f in _PROOF_FIELDS if f not in proof]
    if missing:
        raise ValueError(f"proof lacks fields {missing}")
    try:
        raw = bytes.fromhex(proof["entry"])
        path = [bytes.fromhex(h) for h in proof["path"]]
        expected = bytes.fromhex(proof["merkle_root"])
        index, size = int(proof["leaf_index"]), int(proof["tree_size"])
        header = dict(proof["block"])
        leaf = canonical({"entry_id": proof["leaf"]["entry_id"],
                          "accepted": proof["leaf"]["accepted"],
                          "reason": proof["leaf"]["reason"]})
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"malformed proof: {exc}") from exc

    claimed = proof["entry_id"]
    if entry_id(raw) != claimed or proof["leaf"]["entry_id"] != claimed:
        return (f"the entry bytes hash to {entry_id(raw)}, not the claimed entry "
                f"id {claimed}")
    if header.get("merkle_root") != proof["merkle_root"] or header.get("count") != size:
        return "the block header's Merkle root or entry count differs from the proof's"
    if hash_header(header) != proof["block_hash"]:
        return (f"the block header hashes to {hash_header(header)}, not the "
                f"proof's block hash {proof['block_hash']}")
    if root is not None and root.lower() not in (proof["merkle_root"],
                                                 proof["block_hash"]):
        return (f"root {root} matches neither the proof's block hash "
                f"{proof['block_hash']} nor its Merkle root {proof['merkle_root']}")
    if not merkle.verify_inclusion(leaf, index, size, path, expected):
        return (f"the Merkle path from leaf {index} of {size} does not lead to "
                f"root {proof['merkle_root']}")
    return None


def proof_on_chain(proof: dict, blocks: list[Block]) -> str | None:
    """Why the proof's block is not among ``blocks``, or None when it is.

    ``blocks`` must come from a chain already checked with ``verify``; the
    proof's block must stand there at its claimed height with its claimed
    hash. This says nothing about the Merkle path; use ``proof_problem``.
    """
    try:
        height = int(proof["block"]["height"])
        claimed = str(proof["block_hash"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"malformed proof: {exc}") from exc
    by_height = {b.height: b.hash for b in blocks}
    if height not in by_height:
        span = (f"heights {min(by_height)}-{max(by_height)}" if by_height
                else "no blocks")
        return f"the ledger has no block {height} (it holds {span})"
    if by_height[height] != claimed:
        return (f"block {height} of the ledger has hash {by_height[height]}, "
                f"not the proof's {claimed}")
    return None


def read_blocks(path: str | Path) -> tuple[list[Block], str | None]:
    """Blocks of a block file, read-only, up to the first damaged record.

    Returns (blocks, problem) where problem describes where reading stopped,
    or None when the whole file was read. Nothing is checked but checksums;
    use ``verify`` to check the chain.
    """
    records, end, why, size = _scan_block_file(path)
    blocks = []
    for offset, payload in records:
        try:
            record = _decode_record(payload)
        except (ValueError, KeyError, TypeError) as exc:
            return blocks, f"record at offset {offset} is unreadable: {exc}"
        if isinstance(record, Block):
            blocks.append(record)
    problem = None if end == size else f"record at offset {end} is damaged ({why})"
    return blocks, problem


def read_anchor(path: str | Path) -> Anchor | None:
    """The snapshot anchor a block file starts with, or None (read-only)."""
    if not _block_file(path).exists():
        return None
    records, _, _, _ = _scan_block_file(path)
    if not records:
        return None
    try:
        first = _decode_record(records[0][1])
    except (ValueError, KeyError, TypeError):
        return None
    return first if isinstance(first, Anchor) else None

"""Raft's data types: entries, messages, hard state, snapshots and the Ready batch.

Every type here is plain data with no behaviour, so a wrapper can serialise it
(pickle, or field by field) and the simulator can hash it into a trace. Node
ids are small positive integers; terms and indexes start at 1 (0 means "none").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class EntryType(enum.IntEnum):
    """EntryType says what an entry is for; only NORMAL entries carry client data."""

    NORMAL = 0  # opaque client data, applied by the state machine
    NOOP = 1  # appended by every new leader so it can commit its own term
    CONFIG = 2  # reserved for membership changes (membership is fixed today)


class Entry(NamedTuple):
    """Entry is one position of the replicated log.

    `data` is opaque bytes; Raft never looks inside. Two entries with the same
    index and term are the same entry on every node (the log matching property).
    """

    index: int
    term: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


class MessageType(enum.IntEnum):
    """MessageType names the Raft RPCs and their replies."""

    APP = 1  # AppendEntries: entries after (index, log_term), leader commit
    APP_RESP = 2  # accept (index = last matching index) or reject with a hint
    VOTE = 3  # RequestVote: candidate's last (index, log_term)
    VOTE_RESP = 4
    PRE_VOTE = 5  # "would you vote for me at term + 1?" without changing terms
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7  # leader liveness and commit (never beyond what is verified)
    HEARTBEAT_RESP = 8  # index = the follower's last index verified to match
    SNAP = 9  # InstallSnapshot: the whole snapshot in one message


@dataclass(slots=True)
class Message:
    """Message is one RPC between two nodes; fields unused by a type stay at 0.

    For APP: `index`/`log_term` locate the entry preceding `entries`.
    For APP_RESP: `index` is the follower's last matching index on accept, the
    rejected `index` on reject, with `hint_index`/`hint_term` for fast back-off.
    For VOTE and PRE_VOTE: `index`/`log_term` are the candidate's last entry.
    """

    type: MessageType
    src: int
    dst: int
    term: int
    index: int = 0
    log_term: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    hint_index: int = 0
    hint_term: int = 0
    snapshot: "Snapshot | None" = None


class HardState(NamedTuple):
    """HardState is what must be on stable storage before dependent messages go out.

    `vote` is the node voted for in `term` (None if none); `commit` may be
    persisted lazily (losing it only costs re-learning it), but term and vote
    must never be lost once a message that depends on them was sent.
    """

    term: int = 0
    vote: int | None = None
    commit: int = 0


class Snapshot(NamedTuple):
    """Snapshot is the application's state after applying every entry up to `index`.

    `term` is the term of the entry at `index`; `voters` is the configuration
    in force; `data` is opaque application bytes.
    """

    index: int
    term: int
    voters: tuple[int, ...]
    data: bytes = b""


class Role(enum.Enum):
    """Role is a node's part in the current term."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class Ready:
    """Ready is one batch of work the caller must do, in this order, then `advance`.

    1. Persist `snapshot` (if any: it replaces the whole log), then `entries`
       (truncate the stored log from `entries[0].index`, then append), then
       `hard_state` (if not None), and fsync all of it.
    2. Only then send `messages` (they may promise what step 1 stored).
    3. Apply `snapshot` to the state machine (if any), then `committed_entries`
       in order.
    4. Call `node.advance(ready)`.

    `leader` and `role` are informational (no persistence needed).
    `must_sync` is False when step 1 wrote at most a new commit index, which
    may be written without waiting for fsync (losing it is harmless).
    """

    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None
    messages: tuple[Message, ...]
    committed_entries: tuple[Entry, ...]
    leader: int | None
    role: Role
    term: int
    must_sync: bool = True

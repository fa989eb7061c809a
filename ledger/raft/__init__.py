"""Raft consensus as a pure state machine, and its deterministic simulator.

`RaftNode` (core.py) is driven by `tick`, `step` and `propose` and hands out
`Ready` batches; the caller persists, sends, applies and calls `advance`, in
that order (see core.py). `sim.py` runs whole clusters under faults.
"""

from ledger.raft.core import KNOWN_BUGS, NotLeader, Proposal, RaftConfig, RaftNode
from ledger.raft.messages import (
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Ready,
    Role,
    Snapshot,
)

__all__ = [
    "KNOWN_BUGS",
    "Entry",
    "EntryType",
    "HardState",
    "Message",
    "MessageType",
    "NotLeader",
    "Proposal",
    "RaftConfig",
    "RaftNode",
    "Ready",
    "Role",
    "Snapshot",
]

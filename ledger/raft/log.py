"""RaftLog: one node's in-memory view of the replicated log.

The log is a snapshot (index, term) followed by contiguous entries. It tracks
three positions: `committed` (known committed), `applied` (handed to the state
machine) and `unstable_from` (the first index not yet confirmed persisted).
It never talks to storage; `RaftNode` turns the unstable tail into a Ready.
"""

from __future__ import annotations

from ledger.raft.messages import Entry, Snapshot


class RaftLog:
    """RaftLog holds entries after `snapshot_index`; `entries[k].index` is
    `snapshot_index + 1 + k`.

    Invariants: snapshot_index <= applied <= committed <= last_index(), and
    committed entries are never truncated.
    """

    __slots__ = (
        "snapshot_index",
        "snapshot_term",
        "entries",
        "committed",
        "applied",
        "unstable_from",
    )

    def __init__(
        self,
        snapshot_index: int = 0,
        snapshot_term: int = 0,
        entries: list[Entry] | None = None,
    ) -> None:
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self.entries: list[Entry] = list(entries) if entries else []
        self.committed = snapshot_index
        self.applied = snapshot_index
        self.unstable_from = self.last_index() + 1

    def last_index(self) -> int:
        """last_index is the index of the last entry (or the snapshot's)."""
        return self.snapshot_index + len(self.entries)

    def last_term(self) -> int:
        """last_term is the term of the last entry (or the snapshot's)."""
        return self.entries[-1].term if self.entries else self.snapshot_term

    def first_index(self) -> int:
        """first_index is the lowest index still held as an entry."""
        return self.snapshot_index + 1

    def term(self, index: int) -> int | None:
        """term gives the term at `index`, or None when compacted or beyond the end."""
        offset = index - self.snapshot_index
        if offset == 0:
            return self.snapshot_term
        if offset < 0 or offset > len(self.entries):
            return None
        return self.entries[offset - 1].term

    def match_term(self, index: int, term: int) -> bool:
        """match_term tells whether the log holds an entry (index, term)."""
        return self.term(index) == term

    def slice(self, lo: int, hi: int) -> tuple[Entry, ...]:
        """slice returns entries lo..hi inclusive; both must be held as entries."""
        base = self.snapshot_index + 1
        return tuple(self.entries[lo - base : hi - base + 1])

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """is_up_to_date: is a log ending at (last_index, last_term) at least as
        up to date as this one (Raft section 5.4.1)?"""
        mine = self.last_term()
        if last_term != mine:
            return last_term > mine
        return last_index >= self.last_index()

    def append(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """append adds entries, truncating any held suffix from entries[0].index.

        Raises ValueError if that would leave a gap or drop a committed entry,
        both of which mean a caller bug.
        """
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise ValueError(
                f"append at index {first} would overwrite committed index "
                f"{self.committed}; only uncommitted entries may be replaced"
            )
        if first > self.last_index() + 1:
            raise ValueError(
                f"append at index {first} leaves a gap after last index "
                f"{self.last_index()}"
            )
        del self.entries[first - self.snapshot_index - 1 :]
        self.entries.extend(entries)
        if first < self.unstable_from:
            self.unstable_from = first

    def maybe_append(
        self, prev_index: int, prev_term: int, entries: tuple[Entry, ...]
    ) -> int | None:
        """maybe_append applies an AppendEntries after the consistency check.

        Returns the index of the last entry now known to match the sender's log
        (prev_index + len(entries)), or None if (prev_index, prev_term) is not
        in this log. Entries already present are kept; the first conflicting
        one and everything after it are replaced.
        """
        if not self.match_term(prev_index, prev_term):
            return None

        # Skip the prefix we already hold, so a duplicated or reordered message
        # never truncates entries appended by a later one.
        last_new = prev_index + len(entries)
        for k, entry in enumerate(entries):
            held = self.term(entry.index)
            if entry.index <= self.snapshot_index:
                continue
            if held != entry.term:
                self.append(entries[k:])
                break
        return last_new

    def conflict_hint(self, index: int) -> tuple[int, int]:
        """conflict_hint gives (hint_index, hint_term) for rejecting an append at
        `index`: the first index of the conflicting term, or last_index + 1 with
        term 0 when the log is too short."""
        last = self.last_index()
        if index > last:
            return last + 1, 0
        term = self.term(index)
        if term is None:
            return self.first_index(), 0

        # Walk back over the conflicting term so the leader can skip it whole.
        lo = max(self.first_index(), self.committed + 1)
        i = index
        while i > lo and self.term(i - 1) == term:
            i -= 1
        return i, term

    def commit_to(self, index: int) -> bool:
        """commit_to raises `committed` (never lowers it); True if it moved."""
        if index > self.committed:
            if index > self.last_index():
                raise ValueError(
                    f"commit index {index} is beyond last index {self.last_index()}"
                )
            self.committed = index
            return True
        return False

    def restore(self, snapshot: Snapshot) -> None:
        """restore replaces the whole log by `snapshot` (InstallSnapshot)."""
        self.snapshot_index = snapshot.index
        self.snapshot_term = snapshot.term
        self.entries = []
        self.committed = snapshot.index
        self.unstable_from = snapshot.index + 1

    def compact(self, index: int) -> None:
        """compact drops entries up to `index`, which must be applied."""
        term = self.term(index)
        if term is None or index > self.applied:
            raise ValueError(
                f"cannot compact to index {index}: applied is {self.applied}, "
                f"held entries are {self.first_index()}..{self.last_index()}"
            )
        del self.entries[: index - self.snapshot_index]
        self.snapshot_index = index
        self.snapshot_term = term

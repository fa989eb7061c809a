"""RaftNode: Raft consensus as a pure, deterministic state machine.

The node never touches the network, a disk or a clock. Time enters as
`tick()`, peers' messages as `step(message)`, client commands as
`propose(data)`; work comes out as a `Ready` batch. Randomised election
timeouts draw from an injected `random.Random`, so a seed reproduces a run.

Features: leader election with pre-vote and check-quorum; log replication
with the AppendEntries consistency check and fast back-off by conflicting
term; commitment by counting only for entries of the leader's own term
(Raft section 5.4.2; every new leader appends a no-op); snapshots supplied by
the application (`compact`) and InstallSnapshot for lagging followers.
Membership is fixed by the genesis configuration (3 or 5 voters).

The Ready/advance contract (the caller's loop)::

    node.tick() / node.step(msg) / node.propose(data)   # any number of times
    if node.has_ready():
        rd = node.ready()
        storage.save(rd.snapshot, rd.entries, rd.hard_state)  # 1. persist...
        if rd.must_sync:
            storage.fsync()                                    #    ...and sync
        transport.send(rd.messages)                            # 2. then send
        state_machine.apply(rd.snapshot, rd.committed_entries) # 3. then apply
        node.advance(rd)                                       # 4. acknowledge

Why this order: a vote reply promises the vote is durable; an append reply
promises the entries are durable; a leader counts its own entries toward a
commit only once `advance` confirms them persisted. If the process dies
between 1 and the fsync, the unsynced batch may be lost, and that is safe
precisely because nothing depending on it was sent. Between `ready()` and
`advance()` no other method may be called (RuntimeError otherwise).

Persisting: `snapshot` replaces the stored log wholesale; `entries` replace
the stored log from `entries[0].index` onwards (truncate, then append);
`hard_state` (term, vote, commit) overwrites the previous one. Applying:
`committed_entries` arrive in index order exactly once per process lifetime;
after `restore` the entries above the restored `applied` index are handed out
again. NOOP and CONFIG entries are delivered too (skip them in the state
machine, but count their index as applied).

Known shortcomings: membership changes, leadership transfer and
linearizable reads (ReadIndex) are not implemented; an InstallSnapshot
message carries the whole snapshot in one piece.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ledger.raft.log import RaftLog
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
from ledger.raft.quorum import committed_index, quorum_size, vote_result

log = logging.getLogger(__name__)

APP = MessageType.APP
APP_RESP = MessageType.APP_RESP
VOTE = MessageType.VOTE
VOTE_RESP = MessageType.VOTE_RESP
PRE_VOTE = MessageType.PRE_VOTE
PRE_VOTE_RESP = MessageType.PRE_VOTE_RESP
HEARTBEAT = MessageType.HEARTBEAT
HEARTBEAT_RESP = MessageType.HEARTBEAT_RESP
SNAP = MessageType.SNAP

FOLLOWER = Role.FOLLOWER
PRE_CANDIDATE = Role.PRE_CANDIDATE
CANDIDATE = Role.CANDIDATE
LEADER = Role.LEADER

# Planted bugs, for the simulator's self-test only.
KNOWN_BUGS = frozenset({"vote_not_persisted", "commit_old_term"})

# Progress states of a follower as seen by the leader.
PROBE = 0  # one append in flight at a time until the follower's match is found
REPLICATE = 1  # appends streamed optimistically
SNAPSHOT = 2  # a snapshot is in flight

# Heartbeat replies without progress before a streaming follower is re-probed.
_STALL_LIMIT = 3


class NotLeader(Exception):
    """NotLeader is raised by `propose` on a node that is not the leader.

    `leader` is the id of the leader this node knows of, or None.
    """

    def __init__(self, node_id: int, leader: int | None) -> None:
        super().__init__(
            f"node {node_id} is not the leader; "
            + (f"propose to node {leader}" if leader else "no leader known, retry")
        )
        self.leader = leader


@dataclass(frozen=True)
class RaftConfig:
    """RaftConfig holds the timing and batching knobs, in ticks and entries.

    election_ticks: a follower campaigns after a random 1x..2x this many ticks
        without a leader; a leader with check_quorum steps down after this
        many ticks without hearing from a majority. Default 10.
    heartbeat_ticks: a leader's heartbeat interval; must be < election_ticks.
    max_entries_per_message: cap on entries in one AppendEntries. Default 64.
    max_inflight_messages: appends a leader streams to one follower before
        waiting for acknowledgements. Default 8.
    pre_vote: run the pre-vote phase before incrementing the term.
    check_quorum: leader steps down without an active majority, and followers
        ignore vote requests while they hear from a leader (leader lease).
    """

    election_ticks: int = 10
    heartbeat_ticks: int = 1
    max_entries_per_message: int = 64
    max_inflight_messages: int = 8
    pre_vote: bool = True
    check_quorum: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_ticks < self.election_ticks:
            raise ValueError(
                f"need 0 < heartbeat_ticks ({self.heartbeat_ticks}) < "
                f"election_ticks ({self.election_ticks})"
            )
        if self.max_inflight_messages < 1:
            raise ValueError(
                f"max_inflight_messages must be >= 1, got {self.max_inflight_messages}"
            )
        if self.max_entries_per_message < 1:
            raise ValueError(
                f"max_entries_per_message must be >= 1, got "
                f"{self.max_entries_per_message}"
            )


class Proposal(NamedTuple):
    """Proposal identifies a proposed entry; it is committed iff the entry
    applied at `index` has this `term`."""

    index: int
    term: int


@dataclass(slots=True)
class _Progress:
    """What a leader knows about one follower's log."""

    match: int = 0
    next: int = 1
    state: int = PROBE
    paused: bool = False
    recent_active: bool = True
    stall: int = 0
    inflight: deque = field(default_factory=deque)  # last index of each append


@dataclass(slots=True)
class _Pending:
    """The real hard state a Ready asked to persist (for `advance`)."""

    hard_state: tuple[int, int | None, int] | None = None


class RaftNode:
    """RaftNode is one Raft voter; see the module docstring for the contract.

    node_id: this node's id (a positive int, one of `voters`).
    voters: the genesis configuration, 3 or 5 distinct positive ints (other
        sizes work but are not what the ledger runs).
    rng: source of randomised election timeouts; inject a seeded one.
    config: timing knobs; defaults to RaftConfig().
    """

    def __init__(
        self,
        node_id: int,
        voters: tuple[int, ...] | list[int],
        rng: random.Random,
        config: RaftConfig | None = None,
        *,
        _bug: str | None = None,
    ) -> None:
        voters = tuple(sorted(set(voters)))
        if node_id not in voters:
            raise ValueError(f"node id {node_id} is not among voters {voters}")
        if any(v <= 0 for v in voters):
            raise ValueError(f"voter ids must be positive ints, got {voters}")
        if _bug is not None and _bug not in KNOWN_BUGS:
            raise ValueError(
                f"unknown planted bug {_bug!r}; known: {sorted(KNOWN_BUGS)}"
            )

        self.id = node_id
        self.voters = voters
        self.peers = tuple(v for v in voters if v != node_id)
        self.quorum = quorum_size(len(voters))
        self.rng = rng
        self.config = config or RaftConfig()
        self._bug = _bug

        self.term = 0
        self.vote: int | None = None
        self.lead: int | None = None
        self.role = FOLLOWER
        self.log = RaftLog()
        self.snapshot: Snapshot | None = None  # latest, for lagging followers

        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = 0
        self.votes: dict[int, bool] = {}
        self.progress: dict[int, _Progress] = {}
        self.verified = 0  # last index known to match the current leader's log

        self._msgs: list[Message] = []
        self._persisted_hs: tuple[int, int | None, int] = (0, None, 0)
        self._pending_snapshot: Snapshot | None = None
        self._in_ready: _Pending | None = None
        self._reset_timeout()

    @classmethod
    def restore(
        cls,
        node_id: int,
        voters: tuple[int, ...] | list[int],
        hard_state: HardState,
        snapshot: Snapshot | None,
        entries: list[Entry] | tuple[Entry, ...],
        rng: random.Random,
        config: RaftConfig | None = None,
        *,
        applied: int | None = None,
        _bug: str | None = None,
    ) -> "RaftNode":
        """restore rebuilds a node after a restart from what was persisted.

        `entries` must follow `snapshot` contiguously. `applied` is the index
        the application's state already reflects; by default the snapshot's,
        so entries above it up to the persisted commit are handed out again.
        """
        node = cls(node_id, voters, rng, config, _bug=_bug)
        base = snapshot.index if snapshot else 0
        for k, entry in enumerate(entries):
            if entry.index != base + 1 + k:
                raise ValueError(
                    f"persisted entries must follow index {base} contiguously; "
                    f"found index {entry.index} at position {k}"
                )
        node.log = RaftLog(base, snapshot.term if snapshot else 0, list(entries))
        node.snapshot = snapshot

        term, vote, commit = hard_state
        if commit > node.log.last_index():
            raise ValueError(
                f"persisted commit {commit} is beyond the persisted log's last "
                f"index {node.log.last_index()}; storage lost synced entries"
            )
        node.term = term
        node.vote = vote
        node.log.committed = max(commit, base)
        if applied is not None and applied > node.log.last_index():
            raise ValueError(
                f"applied index {applied} is beyond the persisted log's last index "
                f"{node.log.last_index()}"
            )
        node.log.applied = base if applied is None else max(base, applied)
        # What the application applied was committed, even if the persisted
        # commit index lagged behind it.
        node.log.committed = max(node.log.committed, node.log.applied)
        node.log.unstable_from = node.log.last_index() + 1
        node._persisted_hs = (term, vote, node.log.committed)
        return node

    # ---- inputs -----------------------------------------------------------

    def tick(self) -> None:
        """tick advances logical time by one tick."""
        self._check_not_in_ready()
        if self.role is LEADER:
            self._tick_leader()
        else:
            self.election_elapsed += 1
            if self.election_elapsed >= self.randomized_timeout:
                self.election_elapsed = 0
                self.campaign()

    def campaign(self) -> None:
        """campaign starts an election now (pre-vote first when enabled)."""
        if self.role is LEADER:
            return
        self._campaign(pre=self.config.pre_vote)

    def propose(self, data: bytes) -> Proposal:
        """propose appends a NORMAL entry with `data`; leader only.

        Returns the Proposal (index, term). The entry is committed once it is
        applied with that term; it may instead be lost if leadership changes.
        Raises NotLeader (with the known leader id) on any other node.
        """
        self._check_not_in_ready()
        if self.role is not LEADER:
            raise NotLeader(self.id, self.lead)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"proposal data must be bytes, got {type(data).__name__}")
        index = self.log.last_index() + 1
        entry = Entry(index, self.term, EntryType.NORMAL, bytes(data))
        self.log.append((entry,))
        for peer in self.peers:
            pr = self.progress[peer]
            if pr.state == REPLICATE and pr.next == entry.index:
                if len(pr.inflight) < self.config.max_inflight_messages:
                    self._send_append(peer)
        return Proposal(entry.index, entry.term)

    def step(self, m: Message) -> None:
        """step handles one message addressed to this node."""
        self._check_not_in_ready()
        if m.dst != self.id:
            raise ValueError(f"message for node {m.dst} stepped into node {self.id}")
        t = m.type

        # Terms first: a higher term usually makes us a follower, with the
        # exceptions that keep pre-vote and leader leases from disrupting.
        if m.term > self.term:
            if t is VOTE or t is PRE_VOTE:
                in_lease = (
                    self.config.check_quorum
                    and self.lead is not None
                    and self.election_elapsed < self.config.election_ticks
                )
                if in_lease:
                    return
            if t is PRE_VOTE or (t is PRE_VOTE_RESP and not m.reject):
                pass
            elif t is APP or t is HEARTBEAT or t is SNAP:
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if t is APP or t is HEARTBEAT:
                # A stale leader learns our term from this and steps down.
                self._send(Message(APP_RESP, self.id, m.src, self.term))
            elif t is PRE_VOTE:
                self._send(
                    Message(PRE_VOTE_RESP, self.id, m.src, self.term, reject=True)
                )
            return

        if t is VOTE or t is PRE_VOTE:
            self._handle_vote_request(m)
        elif self.role is LEADER:
            self._step_leader(m)
        elif t is APP or t is HEARTBEAT or t is SNAP:
            if self.role is not FOLLOWER:
                self._become_follower(m.term, m.src)
            self.election_elapsed = 0
            self.lead = m.src
            if t is APP:
                self._handle_append(m)
            elif t is HEARTBEAT:
                self._handle_heartbeat(m)
            else:
                self._handle_snapshot(m)
        elif (t is PRE_VOTE_RESP and self.role is PRE_CANDIDATE) or (
            t is VOTE_RESP and self.role is CANDIDATE
        ):
            self._handle_vote_response(m)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """compact records the application's snapshot `data` taken at `index`
        (which must be applied) and drops the log up to it.

        Returns the Snapshot; the caller persists it atomically before
        deleting stored entries up to `index`. It is also what the leader sends
        to followers whose next entry was compacted away.
        """
        self._check_not_in_ready()
        if index <= self.log.snapshot_index:
            raise ValueError(
                f"snapshot index {index} is not after the current snapshot "
                f"index {self.log.snapshot_index}"
            )
        if index > self.log.applied:
            raise ValueError(
                f"snapshot index {index} is beyond applied index {self.log.applied}; "
                "snapshot only state the application has applied"
            )
        snap = Snapshot(index, self.log.term(index), self.voters, bytes(data))
        self.log.compact(index)
        self.snapshot = snap
        return snap

    # ---- outputs ----------------------------------------------------------

    def has_ready(self) -> bool:
        """has_ready tells whether `ready()` would carry any work."""
        lg = self.log
        return bool(
            self._msgs
            or lg.unstable_from <= lg.last_index()
            or self._pending_snapshot is not None
            or lg.committed > self._apply_from() - 1
            or self._hard_state_tuple() != self._persisted_hs
        )

    def ready(self) -> Ready:
        """ready hands out the next batch of work; see the module docstring."""
        self._check_not_in_ready()
        lg = self.log
        hs = self._hard_state_tuple()
        hard_state = None
        if hs != self._persisted_hs:
            vote = hs[1]
            if self._bug == "vote_not_persisted" and hs[0] == self._persisted_hs[0]:
                # Planted bug: a vote cast in an already persisted term is
                # never written, so a restart forgets it.
                vote = self._persisted_hs[1]
            elif self._bug == "vote_not_persisted":
                vote = None
            hard_state = HardState(hs[0], vote, hs[2])

        entries = lg.slice(lg.unstable_from, lg.last_index())
        apply_from = self._apply_from()
        committed = ()
        if lg.committed >= apply_from:
            committed = lg.slice(apply_from, lg.committed)
        rd = Ready(
            hard_state=hard_state,
            entries=entries,
            snapshot=self._pending_snapshot,
            messages=tuple(self._msgs),
            committed_entries=committed,
            leader=self.lead,
            role=self.role,
            term=self.term,
            must_sync=bool(entries)
            or self._pending_snapshot is not None
            or hs[:2] != self._persisted_hs[:2],
        )
        self._msgs = []
        self._in_ready = _Pending(hs if hard_state is not None else None)
        return rd

    def advance(self, rd: Ready) -> None:
        """advance acknowledges that `rd` was persisted, sent and applied."""
        pending = self._in_ready
        if pending is None:
            raise RuntimeError("advance() called without an outstanding ready()")
        self._in_ready = None
        lg = self.log

        if pending.hard_state is not None:
            self._persisted_hs = pending.hard_state
        if rd.snapshot is not None:
            self._pending_snapshot = None
            lg.applied = max(lg.applied, rd.snapshot.index)
            lg.unstable_from = max(lg.unstable_from, rd.snapshot.index + 1)
        if rd.entries:
            lg.unstable_from = rd.entries[-1].index + 1
        if rd.committed_entries:
            lg.applied = rd.committed_entries[-1].index

        # The leader's own entries count toward commitment only once durable.
        if self.role is LEADER and rd.entries:
            self._maybe_commit()

    # ---- inspection ---------------------------------------------------------

    @property
    def hard_state(self) -> HardState:
        """hard_state is the current (term, vote, commit), persisted or not."""
        return HardState(self.term, self.vote, self.log.committed)

    @property
    def persisted_index(self) -> int:
        """persisted_index is the last log index confirmed durable by advance()."""
        return self.log.unstable_from - 1

    # ---- roles ------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
            self.verified = 0
        self.lead = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_timeout()
        self.votes = {}

    def _reset_timeout(self) -> None:
        e = self.config.election_ticks
        self.randomized_timeout = e + self.rng.randrange(e)

    def _become_follower(self, term: int, lead: int | None) -> None:
        was_leader = self.role is LEADER
        self._reset(term)
        self.role = FOLLOWER
        self.lead = lead
        if was_leader:
            log.info("node %d steps down at term %d", self.id, term)

    def _campaign(self, pre: bool) -> None:
        if pre:
            self.role = PRE_CANDIDATE
            self.lead = None
            self.votes = {}
            vote_term, kind = self.term + 1, PRE_VOTE
        else:
            self._reset(self.term + 1)
            self.role = CANDIDATE
            self.vote = self.id
            vote_term, kind = self.term, VOTE
        self.votes[self.id] = True
        if vote_result(self.votes, len(self.voters)):
            self._win(pre)
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for peer in self.peers:
            self._send(Message(kind, self.id, peer, vote_term, last_index, last_term))

    def _win(self, pre: bool) -> None:
        if pre:
            self._campaign(pre=False)
        else:
            self._become_leader()

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = LEADER
        self.lead = self.id
        last = self.log.last_index()
        self.progress = {
            p: _Progress(match=0, next=last + 1, state=PROBE) for p in self.peers
        }

        # The no-op lets this term commit, and with it every earlier entry.
        self.log.append((Entry(last + 1, self.term, EntryType.NOOP, b""),))
        log.info(
            "node %d elected leader at term %d (last index %d)",
            self.id,
            self.term,
            last,
        )
        for peer in self.peers:
            self._send_append(peer)

    # ---- follower side ------------------------------------------------------

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type is PRE_VOTE
        can_vote = (
            self.vote == m.src
            or (self.vote is None and self.lead is None)
            or (pre and m.term > self.term)
        )
        reply = PRE_VOTE_RESP if pre else VOTE_RESP
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # A pre-vote reply carries the asked term so the asker counts it.
            self._send(Message(reply, self.id, m.src, m.term))
            if not pre:
                self.election_elapsed = 0
                self.vote = m.src
        else:
            self._send(Message(reply, self.id, m.src, self.term, reject=True))

    def _handle_vote_response(self, m: Message) -> None:
        self.votes[m.src] = not m.reject
        result = vote_result(self.votes, len(self.voters))
        if result is True:
            self._win(self.role is PRE_CANDIDATE)
        elif result is False:
            self._become_follower(self.term, None)

    def _handle_append(self, m: Message) -> None:
        lg = self.log
        if m.index < lg.committed:
            self._send(Message(APP_RESP, self.id, m.src, self.term, index=lg.committed))
            return

        last_new = lg.maybe_append(m.index, m.log_term, m.entries)
        if last_new is None:
            hint_index, hint_term = lg.conflict_hint(m.index)
            self._send(
                Message(
                    APP_RESP,
                    self.id,
                    m.src,
                    self.term,
                    index=m.index,
                    reject=True,
                    hint_index=hint_index,
                    hint_term=hint_term,
                )
            )
            return

        # Only the prefix just checked against this leader may be committed.
        if last_new > self.verified:
            self.verified = last_new
        lg.commit_to(min(m.commit, self.verified))
        self._send(Message(APP_RESP, self.id, m.src, self.term, index=last_new))

    def _handle_heartbeat(self, m: Message) -> None:
        self.log.commit_to(min(m.commit, self.verified))
        self._send(
            Message(HEARTBEAT_RESP, self.id, m.src, self.term, index=self.verified)
        )

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        lg = self.log
        if snap is None or snap.index <= lg.committed:
            self._send(Message(APP_RESP, self.id, m.src, self.term, index=lg.committed))
            return

        if lg.match_term(snap.index, snap.term):
            # Our log already holds the snapshot's last entry: just commit.
            lg.commit_to(snap.index)
        else:
            lg.restore(snap)
            self.snapshot = snap
            self._pending_snapshot = snap
            log.info(
                "node %d restored snapshot at index %d term %d from node %d",
                self.id,
                snap.index,
                snap.term,
                m.src,
            )
        self.verified = max(self.verified, snap.index)
        self._send(Message(APP_RESP, self.id, m.src, self.term, index=snap.index))

    # ---- leader side ------------------------------------------------------

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1

        if self.election_elapsed >= self.config.election_ticks:
            self.election_elapsed = 0
            if self.config.check_quorum:
                active = 1 + sum(1 for pr in self.progress.values() if pr.recent_active)
                for pr in self.progress.values():
                    pr.recent_active = False
                if active < self.quorum:
                    log.info(
                        "node %d lost contact with a majority (%d of %d active)",
                        self.id,
                        active,
                        len(self.voters),
                    )
                    self._become_follower(self.term, None)
                    return

        if self.heartbeat_elapsed >= self.config.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            commit = self.log.committed
            for peer in self.peers:
                # Never tell a follower to commit past what it is known to hold.
                known = min(self.progress[peer].match, commit)
                self._send(Message(HEARTBEAT, self.id, peer, self.term, commit=known))

    def _step_leader(self, m: Message) -> None:
        pr = self.progress.get(m.src)
        if pr is None:
            return
        t = m.type
        if t is APP_RESP:
            pr.recent_active = True
            if m.reject:
                self._handle_reject(m.src, pr, m)
            else:
                self._handle_ack(m.src, pr, m.index)
        elif t is HEARTBEAT_RESP:
            pr.recent_active = True
            last = self.log.last_index()
            if pr.state == PROBE:
                pr.paused = False
                self._send_append(m.src)
            elif pr.state == SNAPSHOT:
                pr.stall += 1
                if pr.stall >= _STALL_LIMIT:
                    # The snapshot was probably lost: probe again from scratch.
                    self._reprobe(m.src, pr)
            elif pr.match < last:
                pr.stall += 1
                if pr.stall >= _STALL_LIMIT:
                    # Appends were probably lost: find the follower again.
                    self._reprobe(m.src, pr)
            elif m.index < min(pr.match, self.log.committed):
                # The follower restarted and forgot what it verified.
                pr.next = pr.match + 1
                self._send_append(m.src)

    def _reprobe(self, peer: int, pr: _Progress) -> None:
        pr.state, pr.next, pr.paused, pr.stall = PROBE, pr.match + 1, False, 0
        pr.inflight.clear()
        self._send_append(peer)

    def _handle_ack(self, peer: int, pr: _Progress, index: int) -> None:
        inflight = pr.inflight
        while inflight and inflight[0] <= index:
            inflight.popleft()
        if index > pr.match:
            pr.match = index
            pr.stall = 0
            if pr.next <= index:
                pr.next = index + 1
            if pr.state != REPLICATE:
                pr.state = REPLICATE
                pr.next = index + 1
                inflight.clear()
            pr.paused = False
            self._maybe_commit()
        elif pr.state == PROBE:
            pr.paused = False
        if pr.next <= self.log.last_index():
            self._send_append(peer)

    def _handle_reject(self, peer: int, pr: _Progress, m: Message) -> None:
        if m.index <= pr.match:
            return  # stale: the follower has since accepted more
        if pr.state == PROBE and m.index != pr.next - 1:
            return  # stale: not the probe we are waiting for
        if pr.state == SNAPSHOT:
            return

        # Fast back-off: skip the follower's whole conflicting term at once.
        if m.hint_term == 0:
            candidate = m.hint_index
        else:
            i = min(m.index, self.log.last_index())
            term = self.log.term(i)
            while term is not None and term > m.hint_term:
                i -= 1
                term = self.log.term(i)
            candidate = i + 1 if term == m.hint_term else m.hint_index
        pr.next = max(pr.match + 1, min(candidate, m.index))
        pr.state, pr.paused = PROBE, False
        pr.inflight.clear()
        self._send_append(peer)

    def _send_append(self, peer: int) -> None:
        pr = self.progress[peer]
        if pr.paused:
            return
        lg = self.log
        last = lg.last_index()
        limit = self.config.max_entries_per_message
        window = self.config.max_inflight_messages

        # Probing sends one message; streaming fills the in-flight window.
        while True:
            if pr.state == REPLICATE and len(pr.inflight) >= window:
                return
            prev = pr.next - 1
            prev_term = lg.term(prev)
            if prev_term is None or prev < lg.snapshot_index:
                self._send_snapshot(peer, pr)
                return
            hi = min(last, prev + limit)
            entries = lg.slice(pr.next, hi) if hi >= pr.next else ()
            self._send(
                Message(
                    APP,
                    self.id,
                    peer,
                    self.term,
                    index=prev,
                    log_term=prev_term,
                    entries=entries,
                    commit=lg.committed,
                )
            )
            if pr.state != REPLICATE:
                pr.paused = True
                return
            if not entries:
                return
            pr.next = hi + 1
            pr.inflight.append(hi)
            if pr.next > last:
                return

    def _send_snapshot(self, peer: int, pr: _Progress) -> None:
        snap = self.snapshot
        if snap is None:
            raise RuntimeError(
                f"node {self.id} must send a snapshot to node {peer} but holds none"
            )
        self._send(Message(SNAP, self.id, peer, self.term, snapshot=snap))
        pr.state, pr.paused, pr.next, pr.stall = SNAPSHOT, True, snap.index + 1, 0
        pr.inflight.clear()

    def _maybe_commit(self) -> None:
        matches = [pr.match for pr in self.progress.values()]
        matches.append(self.persisted_index)
        index = committed_index(matches)
        if index <= self.log.committed:
            return

        # Raft section 5.4.2: count replicas only for entries of our own term.
        if self.log.term(index) == self.term or self._bug == "commit_old_term":
            self.log.commit_to(index)

    # ---- helpers ----------------------------------------------------------

    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def _apply_from(self) -> int:
        snap = self._pending_snapshot
        applied = self.log.applied
        if snap is not None and snap.index > applied:
            applied = snap.index
        return applied + 1

    def _hard_state_tuple(self) -> tuple[int, int | None, int]:
        return (self.term, self.vote, self.log.committed)

    def _check_not_in_ready(self) -> None:
        if self._in_ready is not None:
            raise RuntimeError(
                f"node {self.id}: call advance() for the outstanding Ready first"
            )

"""Raft scenarios as readable interactions: messages in, state out.

A tiny in-memory harness plays the caller's side of the Ready contract
(persist, then send, then apply, then advance) and lets a test cut links,
crash nodes and deliver messages one round at a time.
"""

from __future__ import annotations

import random

import pytest

from ledger.raft import core
from ledger.raft.core import NotLeader, RaftConfig, RaftNode
from ledger.raft.messages import (
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Role,
    Snapshot,
)

E = EntryType


class Store:
    """What one node has persisted."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []

    def save(self, rd) -> None:
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = []
        if rd.entries:
            base = self.snapshot.index if self.snapshot else 0
            del self.entries[rd.entries[0].index - base - 1 :]
            self.entries.extend(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state


class Cluster:
    """Cluster wires RaftNodes together with a FIFO network under test control."""

    def __init__(self, n: int = 3, config: RaftConfig | None = None, bug=None) -> None:
        self.voters = tuple(range(1, n + 1))
        self.config = config or RaftConfig(election_ticks=10, heartbeat_ticks=1)
        self.bug = bug
        self.nodes: dict[int, RaftNode | None] = {
            i: RaftNode(i, self.voters, random.Random(i), self.config, _bug=bug)
            for i in self.voters
        }
        self.stores = {i: Store() for i in self.voters}
        self.applied: dict[int, list[Entry]] = {i: [] for i in self.voters}
        self.inbox: list[Message] = []
        self.cut: set[tuple[int, int]] = set()
        self.delivered: list[Message] = []

    def restore(self, i: int, term: int, entries: list[tuple[int, int]], commit=0,
                vote=None) -> None:
        """Replace node i by one restored from a log given as (index, term) pairs."""
        log = [Entry(idx, t, E.NORMAL, b"%d.%d" % (idx, t)) for idx, t in entries]
        store = self.stores[i]
        store.hard_state = HardState(term, vote, commit)
        store.entries = log
        self.nodes[i] = RaftNode.restore(
            i, self.voters, store.hard_state, None, log, random.Random(i),
            self.config, applied=commit, _bug=self.bug,
        )

    def node(self, i: int) -> RaftNode:
        node = self.nodes[i]
        assert node is not None, f"node {i} is down"
        return node

    def flush(self, i: int) -> list:
        """Run node i's Ready loop once; returns the Readies handled."""
        readies = []
        node = self.nodes[i]
        while node is not None and node.has_ready():
            rd = node.ready()
            self.stores[i].save(rd)
            self.inbox.extend(rd.messages)
            if rd.snapshot is not None:
                self.applied[i] = [Entry(rd.snapshot.index, rd.snapshot.term, E.NORMAL,
                                         rd.snapshot.data)]
            self.applied[i].extend(rd.committed_entries)
            node.advance(rd)
            readies.append(rd)
        return readies

    def isolate(self, i: int) -> None:
        for j in self.voters:
            if j != i:
                self.cut |= {(i, j), (j, i)}

    def heal(self) -> None:
        self.cut = set()

    def crash(self, i: int) -> None:
        self.nodes[i] = None

    def restart(self, i: int) -> RaftNode:
        s = self.stores[i]
        self.nodes[i] = RaftNode.restore(
            i, self.voters, s.hard_state, s.snapshot, list(s.entries),
            random.Random(100 + i), self.config, _bug=self.bug,
        )
        return self.nodes[i]

    def deliver(self, keep=lambda m: True) -> list[Message]:
        """Deliver one round: every queued message, then flush every node."""
        for i in self.voters:
            self.flush(i)
        batch, self.inbox = self.inbox, []
        done = []
        for m in batch:
            node = self.nodes[m.dst]
            if node is None or (m.src, m.dst) in self.cut or not keep(m):
                continue
            node.step(m)
            done.append(m)
        self.delivered.extend(done)
        for i in self.voters:
            self.flush(i)
        return done

    def settle(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            if not self.deliver() and not self.inbox:
                return

    def tick(self, i: int, n: int = 1) -> None:
        for _ in range(n):
            self.node(i).tick()
        self.flush(i)

    def elect(self, i: int) -> RaftNode:
        self.node(i).campaign()
        self.settle()
        assert self.node(i).role is Role.LEADER
        return self.node(i)

    def heartbeat(self, rounds: int = 3) -> None:
        leader = next(n for n in self.nodes.values() if n and n.role is Role.LEADER)
        for _ in range(rounds):
            self.tick(leader.id, self.config.heartbeat_ticks)
            self.settle()

    def propose(self, i: int, *values: bytes) -> None:
        for v in values:
            self.node(i).propose(v)
        self.settle()


def types(msgs) -> list[MessageType]:
    return [m.type for m in msgs]


# ---- elections -------------------------------------------------------------


def test_election_pre_vote_then_vote_then_noop_commit():
    c = Cluster(3)
    n1 = c.node(1)

    # Timing out, node 1 asks for pre-votes at term 1 without leaving term 0.
    c.tick(1, n1.randomized_timeout)
    assert n1.role is Role.PRE_CANDIDATE and n1.term == 0
    assert types(c.inbox) == [MessageType.PRE_VOTE] * 2
    assert {m.term for m in c.inbox} == {1}

    # Pre-votes granted: now a real candidate; its self-vote is in the same
    # Ready as the vote requests, so it is persisted before they are sent.
    c.deliver()
    c.deliver()
    assert n1.role is Role.CANDIDATE and n1.term == 1
    assert c.stores[1].hard_state == HardState(1, 1, 0)

    # Votes granted: leader, with a no-op of its term that commits.
    c.settle()
    assert n1.role is Role.LEADER
    assert c.stores[1].entries == [Entry(1, 1, E.NOOP, b"")]
    assert n1.log.committed == 1
    c.heartbeat()
    for i in (2, 3):
        assert c.node(i).lead == 1 and c.node(i).log.committed == 1
        assert c.stores[i].hard_state.vote == 1


def test_vote_reply_leaves_only_with_the_vote_persisted():
    c = Cluster(3, RaftConfig(pre_vote=False))
    c.node(1).campaign()
    c.flush(1)
    for m in c.inbox:
        c.node(m.dst).step(m)

    # The reply and the vote it promises come out in one Ready: the caller
    # persists the hard state before sending the reply.
    for i in (2, 3):
        node = c.node(i)
        rd = node.ready()
        assert types(rd.messages) == [MessageType.VOTE_RESP]
        assert not rd.messages[0].reject
        assert rd.hard_state == HardState(1, 1, 0)
        node.advance(rd)


def test_split_vote_then_a_later_term_elects_one_leader():
    c = Cluster(5, RaftConfig(pre_vote=False, check_quorum=False))
    c.crash(5)

    # 1 and 2 stand at once; 3 hears 1 first, 4 hears 2 first.
    c.node(1).campaign()
    c.node(2).campaign()
    first = {3: 1, 4: 2}
    c.deliver(keep=lambda m: m.type is not MessageType.VOTE
              or m.dst not in first or first[m.dst] == m.src)
    c.settle()
    assert c.node(1).role is Role.CANDIDATE and c.node(2).role is Role.CANDIDATE
    assert c.node(1).term == c.node(2).term == 1
    assert c.node(3).vote == 1 and c.node(4).vote == 2

    # Nobody won term 1; node 1 retries at term 2 and wins.
    c.tick(1, c.node(1).randomized_timeout)
    c.settle()
    assert c.node(1).role is Role.LEADER and c.node(1).term == 2
    assert c.node(2).role is Role.FOLLOWER


def test_restarted_node_keeps_its_vote_in_the_term():
    c = Cluster(3, RaftConfig(pre_vote=False))
    c.elect(1)
    c.crash(3)
    n3 = c.restart(3)
    assert (n3.term, n3.vote) == (1, 1)

    # Node 2 asks for node 3's vote in the same term: refused.
    n3.step(Message(MessageType.VOTE, 2, 3, 1, index=5, log_term=1))
    rd = n3.ready()
    assert rd.messages[0].type is MessageType.VOTE_RESP and rd.messages[0].reject
    n3.advance(rd)


def test_planted_vote_bug_forgets_the_vote_after_restart():
    c = Cluster(3, RaftConfig(pre_vote=False), bug="vote_not_persisted")
    c.elect(1)
    c.crash(3)
    n3 = c.restart(3)
    assert (n3.term, n3.vote) == (1, None)
    n3.step(Message(MessageType.VOTE, 2, 3, 1, index=5, log_term=1))
    rd = n3.ready()
    assert not rd.messages[0].reject  # the second vote in term 1
    n3.advance(rd)


# ---- disruption: pre-vote and check-quorum ----------------------------------


def test_pre_vote_keeps_a_rejoining_node_from_disrupting():
    c = Cluster(3)
    c.elect(1)
    c.isolate(3)
    for _ in range(5):
        c.tick(3, c.config.election_ticks * 2)
        c.settle()
    # Its pre-votes went nowhere, so its term never moved.
    assert c.node(3).term == 1 and c.node(3).role is Role.PRE_CANDIDATE

    c.heal()
    c.tick(3, c.config.election_ticks * 2)
    c.settle()
    c.heartbeat()
    assert c.node(1).role is Role.LEADER and c.node(1).term == 1
    assert c.node(3).role is Role.FOLLOWER and c.node(3).lead == 1


def test_without_pre_vote_a_rejoining_node_deposes_the_leader():
    c = Cluster(3, RaftConfig(pre_vote=False, check_quorum=False))
    c.elect(1)
    c.isolate(3)
    for _ in range(3):
        c.tick(3, c.config.election_ticks * 2)
        c.settle()
    assert c.node(3).term > 1  # terms inflated while cut off

    c.heal()
    c.heartbeat()
    assert c.node(1).term > 1  # the old leader had to step down


def test_check_quorum_steps_down_an_isolated_leader():
    c = Cluster(3)
    c.elect(1)
    c.isolate(1)
    c.tick(1, c.config.election_ticks)
    c.settle()
    c.tick(1, c.config.election_ticks)
    assert c.node(1).role is Role.FOLLOWER
    with pytest.raises(NotLeader):
        c.node(1).propose(b"x")


def test_propose_on_a_follower_names_the_leader():
    c = Cluster(3)
    c.elect(2)
    c.heartbeat()
    with pytest.raises(NotLeader) as info:
        c.node(1).propose(b"x")
    assert info.value.leader == 2


# ---- replication ------------------------------------------------------------


def test_log_repair_of_a_divergent_follower_with_fast_back_off():
    c = Cluster(3, RaftConfig(pre_vote=False, max_entries_per_message=64))
    # Node 3 led term 2 alone and wrote 6 entries nobody else has.
    common = [(1, 1), (2, 1)]
    c.restore(1, 3, common + [(3, 3), (4, 3)], commit=2)
    c.restore(2, 3, common + [(3, 3)], commit=2)
    c.restore(3, 2, common + [(i, 2) for i in range(3, 9)], commit=2)

    c.node(1).campaign()
    c.settle()
    c.heartbeat()
    leader_log = [(e.index, e.term) for e in c.stores[1].entries]
    assert [(e.index, e.term) for e in c.stores[3].entries] == leader_log
    assert c.node(3).log.committed == c.node(1).log.committed == 5

    # The follower's whole term-2 run is skipped in one step, not one by one.
    rejects = [m for m in c.delivered if m.type is MessageType.APP_RESP and m.reject
               and m.src == 3]
    assert len(rejects) == 1
    assert (rejects[0].hint_index, rejects[0].hint_term) == (3, 2)


def test_follower_never_commits_beyond_what_it_verified():
    c = Cluster(3, RaftConfig(pre_vote=False))
    common = [(1, 1), (2, 1)]
    c.restore(1, 3, common + [(3, 3)], commit=2)
    c.restore(2, 3, common + [(3, 3)], commit=2)
    c.restore(3, 2, common + [(3, 2), (4, 2)], commit=2)
    c.node(1).campaign()
    c.settle(rounds=1)

    # A heartbeat claiming commit 4 arrives before any append: node 3 holds
    # stale entries at 3 and 4 and must not treat them as committed.
    n3 = c.node(3)
    n3.step(Message(MessageType.HEARTBEAT, 1, 3, 4, commit=4))
    assert n3.log.committed == 2


def test_a_stale_reordered_append_never_truncates_newer_entries():
    c = Cluster(3, RaftConfig(pre_vote=False))
    c.elect(1)
    c.heartbeat()
    n2 = c.node(2)
    noop = Entry(1, 1, E.NOOP, b"")
    a, b = Entry(2, 1, E.NORMAL, b"a"), Entry(3, 1, E.NORMAL, b"b")

    # The append carrying 2..3 overtakes the one carrying only 2.
    n2.step(Message(MessageType.APP, 1, 2, 1, index=1, log_term=1, entries=(a, b)))
    n2.step(Message(MessageType.APP, 1, 2, 1, index=1, log_term=1, entries=(a,)))
    assert n2.log.entries == [noop, a, b]
    rd = n2.ready()
    assert [m.index for m in rd.messages] == [3, 2]  # both acknowledge a match
    n2.advance(rd)


def test_a_snapshot_whose_last_entry_the_follower_holds_only_commits():
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"a", b"b")
    n2 = c.node(2)
    assert n2.log.last_index() == 3 and n2.log.committed == 1
    snap = Snapshot(2, 1, c.voters, b"state@2")
    n2.step(Message(MessageType.SNAP, 1, 2, 1, snapshot=snap))
    rd = n2.ready()
    assert rd.snapshot is None and n2.log.last_index() == 3
    assert n2.log.committed == 2
    assert [e.data for e in rd.committed_entries] == [b"a"]
    n2.advance(rd)


def test_figure_8_old_term_entry_is_not_committed_by_counting():
    outcomes = {}
    for bug in (None, "commit_old_term"):
        c = Cluster(5, RaftConfig(pre_vote=False, check_quorum=False,
                                  max_entries_per_message=1), bug=bug)
        c.restore(1, 3, [(1, 1), (2, 2)], commit=1)
        c.restore(2, 3, [(1, 1)], commit=1)
        c.restore(3, 3, [(1, 1)], commit=1)
        c.restore(4, 3, [(1, 1)], commit=1)
        c.restore(5, 4, [(1, 1), (2, 3)], commit=1)

        # Node 1 leads term 4 and copies its term-2 entry to 2, 3 and 4 (one
        # entry per message); then it crashes before its no-op gets out.
        c.isolate(5)
        c.node(1).campaign()
        for _ in range(6):  # votes, leadership, reject, back-off, append, acks
            c.deliver()
        assert [c.node(i).log.term(2) for i in (1, 2, 3)] == [2, 2, 2]
        assert c.node(1).log.last_index() == 3
        applied_by_1 = {e.index: e.term for e in c.applied[1]}
        c.inbox = [m for m in c.inbox if m.src != 1]
        c.crash(1)

        # Node 5, whose index 2 is from term 3, wins term 5 and overwrites it.
        c.heal()
        c.node(5).campaign()
        c.settle()
        c.heartbeat()
        assert c.node(5).role is Role.LEADER
        applied_by_2 = {e.index: e.term for e in c.applied[2]}
        outcomes[bug] = (applied_by_1.get(2), applied_by_2.get(2))

    # Correct Raft: node 1 never applied index 2, so no disagreement.
    assert outcomes[None] == (None, 3)
    # Counting an old-term entry: node 1 applied term 2, node 2 later term 3.
    assert outcomes["commit_old_term"] == (2, 3)


def test_snapshot_install_to_a_lagging_follower():
    c = Cluster(3)
    c.elect(1)
    c.isolate(3)
    c.propose(1, *[b"e%d" % k for k in range(10)])
    c.heartbeat()
    n1 = c.node(1)
    assert n1.log.committed == 11 and n1.log.applied == 11

    snap = n1.compact(9, b"state@9")
    assert n1.log.first_index() == 10 and snap.term == 1

    c.heal()
    c.heartbeat(rounds=5)
    n3 = c.node(3)
    assert any(m.type is MessageType.SNAP and m.dst == 3 for m in c.delivered)
    assert c.stores[3].snapshot == snap
    assert [e.index for e in c.stores[3].entries] == [10, 11]
    assert n3.log.committed == 11
    # The state machine restarted from the snapshot, then applied 10 and 11.
    assert [e.data for e in c.applied[3]][-3:] == [b"state@9", b"e8", b"e9"]


def test_restart_restores_term_vote_log_and_reapplies_committed_entries():
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"a", b"b")
    c.heartbeat()
    before = c.node(2)
    c.crash(2)
    n2 = c.restart(2)
    assert (n2.term, n2.vote) == (before.term, before.vote) == (1, 1)
    assert n2.log.last_index() == 3 and n2.log.committed == 3
    rd = n2.ready()
    assert [e.data for e in rd.committed_entries] == [b"", b"a", b"b"]
    n2.advance(rd)

    # It rejoins as a follower and keeps replicating.
    c.propose(1, b"c")
    c.heartbeat()
    assert c.node(2).log.committed == 4


# ---- the contract -----------------------------------------------------------


def test_leader_counts_its_own_entry_only_after_persisting_it():
    c = Cluster(3)
    n1 = c.elect(1)
    c.heartbeat()
    n1.propose(b"x")
    assert n1.persisted_index == 1  # entry 2 is only in memory so far

    rd = n1.ready()
    assert [e.index for e in rd.entries] == [2]
    assert types(rd.messages) == [MessageType.APP] * 2
    c.stores[1].save(rd)
    n1.advance(rd)
    assert n1.persisted_index == 2 and n1.log.committed == 1  # 1 of 3 copies

    c.inbox.extend(rd.messages)
    c.settle()
    assert n1.log.committed == 2


def test_calls_between_ready_and_advance_are_refused():
    c = Cluster(3)
    n1 = c.node(1)
    n1.campaign()
    rd = n1.ready()
    with pytest.raises(RuntimeError):
        n1.tick()
    n1.advance(rd)
    with pytest.raises(RuntimeError):
        n1.advance(rd)


def test_compact_refuses_unapplied_index():
    c = Cluster(3)
    n1 = c.elect(1)
    with pytest.raises(ValueError, match="beyond applied"):
        n1.compact(5, b"")


def test_restore_refuses_commit_beyond_persisted_log():
    with pytest.raises(ValueError, match="beyond the persisted log"):
        RaftNode.restore(1, (1, 2, 3), HardState(2, None, 5), None,
                         [Entry(1, 1, E.NOOP, b"")], random.Random(0))


def test_unknown_planted_bug_is_refused():
    assert "vote_not_persisted" in core.KNOWN_BUGS
    with pytest.raises(ValueError, match="unknown planted bug"):
        RaftNode(1, (1, 2, 3), random.Random(0), _bug="nope")

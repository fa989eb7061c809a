"""Three Raft replicas on durable storage building the ledger, with a crash,
a restart from disk, log compaction and a snapshot sent to a lagging replica."""

from __future__ import annotations

import hashlib
import random

import pytest

from ledger import entries as E
from ledger.genesis import make_consortium
from ledger.storage import DurableStorage
from ledger.store import Ledger, verify_replica

core = pytest.importorskip("ledger.raft.core")
messages = pytest.importorskip("ledger.raft.messages")


class Replica:
    """One replica: Raft node, its storage and its ledger, run the Ready way."""

    def __init__(self, node_id, voters, directory, genesis, seed, restart=False):
        self.id = node_id
        self.storage = DurableStorage(directory / "raft")
        self.ledger = Ledger(directory, genesis)
        rng = random.Random(seed)
        if restart:
            hard, snap, entries = self.storage.load()
            snapshot = messages.Snapshot(*snap) if snap else None
            if snap and snap.index > self.ledger.applied_raft_index:
                self.ledger.restore(snap.data)
            log_entries = [messages.Entry(e.index, e.term, messages.EntryType(e.type),
                                          e.data) for e in entries]
            self.node = core.RaftNode.restore(
                node_id, voters, messages.HardState(*hard), snapshot, log_entries,
                rng, applied=self.ledger.applied_raft_index,
            )
        else:
            self.node = core.RaftNode(node_id, voters, rng)

    def step_ready(self) -> list:
        if not self.node.has_ready():
            return []
        rd = self.node.ready()
        self.storage.save(rd.snapshot, rd.entries, rd.hard_state)
        self.storage.fsync()
        snap = rd.snapshot
        if snap is not None and snap.index > self.ledger.applied_raft_index:
            self.ledger.restore(snap.data)
        for entry in rd.committed_entries:
            data = entry.data if entry.type == messages.EntryType.NORMAL else b""
            self.ledger.apply_raft_entry(entry.index, data)
        self.node.advance(rd)
        return list(rd.messages)

    def close(self):
        self.storage.close()
        self.ledger.close()


def run(replicas: dict, steps: int, down: frozenset = frozenset()) -> None:
    """Tick and deliver messages synchronously, skipping replicas that are down."""
    for _ in range(steps):
        for rid, rep in replicas.items():
            if rid not in down:
                rep.node.tick()
        queue = []
        for rid, rep in replicas.items():
            if rid not in down:
                queue.extend(rep.step_ready())
        while queue:
            msg = queue.pop(0)
            if msg.dst in down or msg.src in down:
                continue
            replicas[msg.dst].node.step(msg)
            queue.extend(replicas[msg.dst].step_ready())


def leader(replicas, down=frozenset()):
    for rid, rep in replicas.items():
        if rid not in down and rep.node.role == messages.Role.LEADER:
            return rep
    return None


def h(tag):
    return hashlib.sha256(tag.encode()).hexdigest()


def test_three_replicas_agree_through_crash_restart_and_snapshot(tmp_path):
    consortium = make_consortium(tmp_path / "consortium", hospitals=3)
    s, genesis = consortium.signers, consortium.genesis
    voters = (1, 2, 3)
    dirs = {i: tmp_path / f"replica-{i}" for i in voters}
    replicas = {i: Replica(i, voters, dirs[i], genesis, seed=i) for i in voters}
    run(replicas, 60)
    assert leader(replicas) is not None

    def propose_round(r, base, down=frozenset()):
        t = 1_700_000_000.0 + 100 * r
        lead = leader(replicas, down)
        opening = [E.round_open(s["coordinator"], round=r, base_model_hash=base,
                                timestamp=t)]
        updates = [E.model_update(s[f"hospital-0{k}"], round=r, base_model_hash=base,
                                  update_hash=h(f"{r}-{k}"), num_samples=50,
                                  timestamp=t + k) for k in range(3)]
        lead.node.propose(E.encode_batch(opening + updates + updates[:1]))
        run(replicas, 5, down)
        model = h(f"model-{r}")
        lead = leader(replicas, down)
        lead.node.propose(E.encode_batch([E.global_model(
            s["coordinator"], round=r, model_hash=model,
            update_hashes=[h(f"{r}-{k}") for k in range(3)], timestamp=t + 9)]))
        run(replicas, 5, down)
        return model

    base = propose_round(0, "00" * 32)

    # Replica 3 crashes; the others go on, compact their logs, and replica 3
    # comes back from its own disk and must catch up through a snapshot.
    replicas[3].close()
    down = frozenset({3})
    for r in range(1, 4):
        base = propose_round(r, base, down)
    for rid in (1, 2):
        rep = replicas[rid]
        index = rep.ledger.applied_raft_index
        snap = rep.node.compact(index, rep.ledger.snapshot())
        rep.storage.apply_snapshot(snap)
    replicas[3] = Replica(3, voters, dirs[3], genesis, seed=33, restart=True)
    base = propose_round(4, base)
    run(replicas, 40)

    heads = {rid: (rep.ledger.head_hash, rep.ledger.state.state_hash())
             for rid, rep in replicas.items()}
    assert len(set(heads.values())) == 1, heads
    lead = replicas[1].ledger
    assert lead.state.round == 4 and lead.state.latest_model == base
    assert len(lead.records(accepted=False)) == 5  # one replay per round
    assert replicas[3].ledger.height == lead.height
    # Replica 3 caught up by the leader's snapshot, not by replaying the log.
    assert replicas[3].storage.stored_snapshot() is not None
    assert replicas[3].storage.first_index() > 1
    assert len(list(replicas[3].ledger.blocks())) < lead.height
    for rep in replicas.values():
        rep.close()

    # After a restart from disk, every replica still holds the same chain.
    reopened = [Ledger(dirs[i], genesis) for i in voters]
    assert len({(led.head_hash, led.state.state_hash()) for led in reopened}) == 1
    for i in voters:
        assert verify_replica(dirs[i], genesis).ok

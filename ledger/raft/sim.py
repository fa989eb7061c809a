"""Deterministic simulation of a Raft cluster under faults, with safety checks.

One seed drives everything: the network (loss, delay, reordering,
duplication), symmetric and asymmetric partitions that heal, crashes and
restarts (only what reached the simulated disk survives; a crash while a
Ready is being written can tear off the unsynced tail of that batch), tick
skew between nodes, client proposals, and each node's election timeouts.
The same seed replays the same trace; `SimResult.trace_hash` proves it.

A run has a fault phase of `steps` steps, then a heal phase (all faults off,
partitions healed, crashed nodes restarted) that lasts until every node has
applied everything committed, or `heal_steps` pass.

Checked after every step (a violation names the step, nodes and indexes):

- election safety: at most one leader per term;
- log matching: an entry (index, term) is the same entry, preceded by the
  same term, on every node that persists it (by induction this makes logs
  agree on every earlier entry);
- leader completeness: a new leader holds the highest entry known committed;
- state-machine safety: no two nodes apply different entries at one index,
  and each node applies indexes in order (snapshots included, by hash chain);
- durability of acknowledgements: every entry reported committed to a client
  is applied by every node at the end of the heal phase.

The disk model: a Ready's writes go to disk in the order snapshot, entries,
hard state, then one sync; messages leave only after the sync. A "torn"
crash keeps a random strict prefix of those writes and sends nothing.
Besides random crashes (half of them aimed at the leader), two crash points
restart a node within 1-3 steps: right after a new term or vote became
durable and its replies left, and right after a leader applied a commit.

Known shortcoming: in 2,500 seeds the random faults never produced the
figure-8 history that the planted `commit_old_term` bug needs; that bug is
caught by the scripted scenario in tests/test_raft_scenarios.py instead.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import multiprocessing
import random
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from ledger.raft.core import NotLeader, RaftConfig, RaftNode
from ledger.raft.messages import (
    Entry,
    EntryType,
    HardState,
    Message,
    Ready,
    Role,
    Snapshot,
)

log = logging.getLogger(__name__)

ALL_FAULTS = frozenset(
    {"loss", "delay", "duplicate", "partition", "crash", "torn", "skew"}
)

_LEADER = Role.LEADER
_NORMAL = EntryType.NORMAL


@dataclass
class SimResult:
    """SimResult summarises one seeded run; `violations` empty means safe."""

    seed: int
    nodes: int
    violations: list[str]
    committed: int  # highest index applied by any node
    elections: int  # distinct terms that had a leader
    trace_hash: str
    acknowledged: int = 0  # client proposals reported committed
    partitions: int = 0
    crashes: int = 0
    torn_crashes: int = 0
    snapshots_installed: int = 0
    messages: int = 0
    steps: int = 0


@dataclass
class _Disk:
    """_Disk is what survives a crash: the synced writes of one node."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    def write(self, rd: Ready, keep: int | None = None) -> None:
        """write applies a Ready's writes in order; `keep` limits how many of
        them (snapshot, each entry, hard state) land before a crash."""
        ops = 0
        if rd.snapshot is not None:
            if keep is not None and ops >= keep:
                return
            self.snapshot = rd.snapshot
            self.entries = []
            ops += 1
        if rd.entries:
            base = self.snapshot.index if self.snapshot else 0
            del self.entries[rd.entries[0].index - base - 1 :]
            if keep is None:
                self.entries.extend(rd.entries)
            else:
                room = keep - ops
                self.entries.extend(rd.entries[: max(room, 0)])
                ops += len(rd.entries)
                if ops > keep:
                    return
        if rd.hard_state is not None:
            if keep is not None and ops >= keep:
                return
            self.hard_state = rd.hard_state

    def compact(self, snap: Snapshot) -> None:
        """compact stores a local snapshot and drops the entries it covers."""
        base = self.snapshot.index if self.snapshot else 0
        del self.entries[: snap.index - base]
        self.snapshot = snap


class _Replica:
    """_Replica is one simulated server: a node, its disk and its state machine."""

    __slots__ = (
        "id",
        "node",
        "disk",
        "rate",
        "acc",
        "sm_index",
        "sm_hash",
        "restart_at",
        "tear_next",
        "last_vote",
    )

    def __init__(self, node_id: int, node: RaftNode, rate: float) -> None:
        self.id = node_id
        self.node: RaftNode | None = node
        self.disk = _Disk()
        self.rate = rate
        self.acc = 0.0
        self.sm_index = 0
        self.sm_hash = 0
        self.restart_at = -1
        self.tear_next = False
        self.last_vote: tuple[int, int | None] = (0, None)


class _Violation(Exception):
    pass


class Simulation:
    """Simulation runs one seeded cluster; use `simulate()` unless stepping by hand."""

    def __init__(
        self,
        seed: int,
        nodes: int = 3,
        steps: int = 600,
        faults: Iterable[str] | str = "all",
        bug: str | None = None,
        heal_steps: int = 400,
        config: RaftConfig | None = None,
    ) -> None:
        if faults == "all":
            faults = ALL_FAULTS
        elif faults == "none":
            faults = frozenset()
        self.faults = frozenset(faults)
        unknown = self.faults - ALL_FAULTS
        if unknown:
            raise ValueError(
                f"unknown faults {sorted(unknown)}; known: {sorted(ALL_FAULTS)}"
            )
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")

        self.seed = seed
        self.steps = steps
        self.heal_steps = heal_steps
        self.bug = bug
        self.rng = random.Random(seed)
        r = self.rng

        # Timing and batching vary per seed: short timeouts against long
        # delays give split votes; one entry per message opens the window in
        # which a leader holds an old-term entry on a majority without its own.
        self.config = config or RaftConfig(
            election_ticks=r.choice((4, 6, 10)),
            heartbeat_ticks=r.choice((1, 2)),
            max_entries_per_message=r.choice((1, 4, 64)),
        )
        self.voters = tuple(range(1, nodes + 1))
        self.now = 0

        # Fault intensities are drawn per seed so seeds cover mild and harsh runs.
        has = self.faults.__contains__
        self.p_loss = r.choice((0.0, 0.02, 0.05, 0.1)) if has("loss") else 0.0
        self.p_dup = r.choice((0.0, 0.02, 0.05)) if has("duplicate") else 0.0
        self.max_delay = r.choice((0, 1, 2, 3)) if has("delay") else 0
        self.p_long_delay = 0.01 if has("delay") else 0.0
        self.p_partition = r.choice((0.01, 0.02, 0.04)) if has("partition") else 0.0
        self.p_crash = r.choice((0.005, 0.01, 0.02)) if has("crash") else 0.0
        self.p_torn = 0.5 if has("torn") else 0.0
        # A crash right after a term or vote became durable (and its replies
        # left) is where forgetting a vote would show.
        self.p_crash_after_vote = r.choice((0.05, 0.2, 0.5)) if has("crash") else 0.0
        # A leader dying right after it applied a commit, before its next
        # messages leave, is where a wrongly counted commit would show.
        self.p_crash_after_commit = r.choice((0.0, 0.02, 0.1)) if has("crash") else 0.0
        self.p_propose = r.choice((0.2, 0.4, 0.7))
        self.snapshot_every = r.choice((8, 16, 32))

        self.replicas: dict[int, _Replica] = {}
        for nid in self.voters:
            rate = r.uniform(0.6, 1.4) if has("skew") else 1.0
            node = self._new_node(nid)
            self.replicas[nid] = _Replica(nid, node, rate)

        self.net: list[tuple[int, int, Message]] = []
        self.seq = 0
        self.blocked: set[tuple[int, int]] = set()
        self.heal_at = -1
        self.client_leader: int | None = None
        self.next_value = 0

        self.trace: list[tuple] = []
        self.violations: list[str] = []
        self.leaders: dict[int, int] = {}  # term -> leader id
        self.registry: dict[tuple[int, int], tuple] = {}  # (index, term) -> entry
        self.applied: dict[int, tuple[int, int, bytes]] = {}  # index -> entry
        self.chain: dict[int, int] = {0: 0}  # index -> state hash after it
        self.pending: dict[bytes, tuple[int, int, int]] = {}  # data -> (node, i, t)
        self.acked: dict[int, bytes] = {}
        self.top = 0  # highest index applied anywhere
        self.stats = dict(partitions=0, crashes=0, torn=0, snapshots=0, messages=0)

    # ---- driving ----------------------------------------------------------

    def run(self) -> SimResult:
        """run plays the fault phase then the heal phase and returns the result."""
        try:
            for _ in range(self.steps):
                self._step(faulty=True)
            self._enter_heal_phase()
            for _ in range(self.heal_steps):
                self._step(faulty=False)
                if self._converged():
                    break
            self._final_checks()
        except _Violation:
            pass
        except Exception as exc:  # a node's own assertion is a finding too
            self.violations.append(f"step {self.now}: exception {exc!r}")
        return self._result()

    def _step(self, faulty: bool) -> None:
        now = self.now
        if faulty:
            self._inject_faults()
        elif self.heal_at >= 0 or self.blocked:
            self._heal()
        self._restart_due()

        # Deliver every message due by now, in (time, send order).
        net = self.net
        replicas = self.replicas
        blocked = self.blocked
        trace = self.trace
        while net and net[0][0] <= now:
            _, _, m = heapq.heappop(net)
            rep = replicas[m.dst]
            if rep.node is None or (blocked and (m.src, m.dst) in blocked):
                continue
            trace.append(
                (now, m.src, m.dst, m.type._value_, m.term, m.index, len(m.entries))
            )
            rep.node.step(m)

        # Ticks, with skew: a node ticks `rate` times per step on average.
        for rep in replicas.values():
            if rep.node is None:
                continue
            rep.acc += rep.rate
            while rep.acc >= 1.0:
                rep.acc -= 1.0
                rep.node.tick()

        if self.rng.random() < self.p_propose:
            self._propose()

        for rep in replicas.values():
            for _ in range(3):
                if rep.node is None or not rep.node.has_ready():
                    break
                self._handle_ready(rep)

        self._check_leaders()
        self.now = now + 1

    # ---- faults -----------------------------------------------------------

    def _inject_faults(self) -> None:
        r = self.rng
        now = self.now
        if self.heal_at >= 0 and now >= self.heal_at:
            self.blocked = set()
            self.heal_at = -1
            self.trace.append((now, "heal"))
        elif self.heal_at < 0 and r.random() < self.p_partition:
            self._partition()

        if r.random() < self.p_crash:
            up = [rep for rep in self.replicas.values() if rep.node is not None]
            leaders = [rep for rep in up if rep.node.role is _LEADER]
            if up:
                # Leaders are the interesting victims: half the crashes hit one.
                rep = r.choice(leaders if leaders and r.random() < 0.5 else up)
                if r.random() < self.p_torn:
                    rep.tear_next = True  # crash inside its next write
                else:
                    self._crash(rep, torn=False)

    def _partition(self) -> None:
        r = self.rng
        ids = list(self.voters)
        r.shuffle(ids)
        kind = r.randrange(3)
        blocked: set[tuple[int, int]] = set()
        if kind == 0:
            # Symmetric split into a minority and a majority.
            cut = r.randrange(1, len(ids) // 2 + 1)
            side = ids[:cut]
            for a in side:
                for b in ids[cut:]:
                    blocked.add((a, b))
                    blocked.add((b, a))
        elif kind == 1:
            # One node can send but not receive (or the reverse).
            a = ids[0]
            for b in ids[1:]:
                blocked.add((b, a) if r.random() < 0.5 else (a, b))
        else:
            # Random one-way link failures.
            for a in ids:
                for b in ids:
                    if a != b and r.random() < 0.3:
                        blocked.add((a, b))
        self.blocked = blocked
        self.heal_at = self.now + r.randint(5, 60)
        self.stats["partitions"] += 1
        self.trace.append((self.now, "partition", tuple(sorted(blocked))))

    def _enter_heal_phase(self) -> None:
        self.p_loss = self.p_dup = self.p_long_delay = self.p_propose = 0.0
        self._heal()
        self.trace.append((self.now, "heal phase"))

    def _heal(self) -> None:
        self.blocked = set()
        self.heal_at = -1
        for rep in self.replicas.values():
            rep.tear_next = False
            if rep.node is None:
                rep.restart_at = self.now

    def _crash(self, rep: _Replica, torn: bool, quick: bool = False) -> None:
        rep.node = None
        rep.tear_next = False
        rep.restart_at = self.now + (
            self.rng.randint(1, 3) if quick else self.rng.randint(3, 40)
        )
        self.stats["crashes"] += 1
        if torn:
            self.stats["torn"] += 1
        self.trace.append((self.now, "crash", rep.id, torn))

    def _restart_due(self) -> None:
        for rep in self.replicas.values():
            if rep.node is None and 0 <= rep.restart_at <= self.now:
                self._restart(rep)

    def _restart(self, rep: _Replica) -> None:
        disk = rep.disk
        rep.node = RaftNode.restore(
            rep.id,
            self.voters,
            disk.hard_state,
            disk.snapshot,
            list(disk.entries),
            random.Random(self.rng.getrandbits(64)),
            self.config,
            _bug=self.bug,
        )
        rep.restart_at = -1
        rep.sm_index, rep.sm_hash = 0, 0
        if disk.snapshot is not None:
            self._load_snapshot(rep, disk.snapshot, "restart")
        self.trace.append((self.now, "restart", rep.id, disk.hard_state))

    def _new_node(self, nid: int) -> RaftNode:
        return RaftNode(
            nid,
            self.voters,
            random.Random(self.rng.getrandbits(64)),
            self.config,
            _bug=self.bug,
        )

    # ---- clients ----------------------------------------------------------

    def _propose(self) -> None:
        target = self.client_leader
        if target is None or self.replicas[target].node is None:
            target = self.rng.choice(self.voters)
        node = self.replicas[target].node
        if node is None:
            return
        data = b"v%d" % self.next_value
        try:
            prop = node.propose(data)
        except NotLeader as exc:
            self.client_leader = exc.leader
            return
        self.next_value += 1
        self.client_leader = target
        self.pending[data] = (target, prop.index, prop.term)

    # ---- the Ready loop ---------------------------------------------------

    def _handle_ready(self, rep: _Replica) -> None:
        node = rep.node
        rd = node.ready()
        self._check_log_matching(rep, rd)

        if rep.tear_next and rd.must_sync:
            writes = len(rd.entries) + (rd.snapshot is not None) + (
                rd.hard_state is not None
            )
            rep.disk.write(rd, keep=self.rng.randrange(writes))
            self._crash(rep, torn=True)
            return
        rep.disk.write(rd)

        # Sync happened; only now may the messages leave.
        self._send(rd.messages)

        if rd.snapshot is not None:
            self._load_snapshot(rep, rd.snapshot, "install")
            self.stats["snapshots"] += 1
        for e in rd.committed_entries:
            self._apply(rep, e)
        node.advance(rd)

        if (
            rd.committed_entries
            and node.role is _LEADER
            and self.rng.random() < self.p_crash_after_commit
        ):
            self._crash(rep, torn=False, quick=True)
            return
        if self.p_crash_after_vote and rd.hard_state is not None:
            key = (node.term, node.vote)
            if key != rep.last_vote:
                rep.last_vote = key
                if self.rng.random() < self.p_crash_after_vote:
                    self._crash(rep, torn=False, quick=True)
                    return

        if rep.sm_index - node.log.snapshot_index >= self.snapshot_every:
            snap = node.compact(rep.sm_index, b"%d:%d" % (rep.sm_index, rep.sm_hash))
            rep.disk.compact(snap)

    def _send(self, messages: tuple[Message, ...]) -> None:
        r = self.rng
        now = self.now
        net = self.net
        self.stats["messages"] += len(messages)
        for m in messages:
            if self.p_loss and r.random() < self.p_loss:
                continue
            copies = 2 if self.p_dup and r.random() < self.p_dup else 1
            for _ in range(copies):
                delay = 1
                if self.max_delay:
                    delay += r.randrange(self.max_delay + 1)
                if self.p_long_delay and r.random() < self.p_long_delay:
                    delay += r.randint(5, 30)
                self.seq += 1
                heapq.heappush(net, (now + delay, self.seq, m))

    def _apply(self, rep: _Replica, e: Entry) -> None:
        if e.index != rep.sm_index + 1:
            self._fail(
                f"node {rep.id} applied index {e.index} after {rep.sm_index} "
                "(state machine must apply in order)"
            )
        h = zlib.crc32(b"%d:%d:" % (e.index, e.term) + e.data, rep.sm_hash)
        known = self.applied.get(e.index)
        if known is None:
            self.applied[e.index] = (e.term, e.type, e.data)
            self.top = e.index if e.index > self.top else self.top
            self.chain[e.index] = h
        elif known != (e.term, e.type, e.data) or self.chain[e.index] != h:
            self._fail(
                f"state machine safety: node {rep.id} applied {e!r} at index "
                f"{e.index}, another node applied term {known[0]} data {known[2]!r}"
            )
        rep.sm_index, rep.sm_hash = e.index, h
        self.trace.append((self.now, "apply", rep.id, e.index, e.term))

        if e.type is _NORMAL:
            owner = self.pending.get(e.data)
            if owner is not None and owner == (rep.id, e.index, e.term):
                del self.pending[e.data]
                self.acked[e.index] = e.data

    def _load_snapshot(self, rep: _Replica, snap: Snapshot, why: str) -> None:
        index_s, hash_s = snap.data.split(b":")
        index, h = int(index_s), int(hash_s)
        if index != snap.index or self.chain.get(index) != h:
            self._fail(
                f"state machine safety: node {rep.id} loaded ({why}) a snapshot at "
                f"index {snap.index} whose state differs from what was applied"
            )
        rep.sm_index, rep.sm_hash = index, h

    # ---- invariants -------------------------------------------------------

    def _check_log_matching(self, rep: _Replica, rd: Ready) -> None:
        if not rd.entries:
            return
        lg = rep.node.log
        registry = self.registry
        for e in rd.entries:
            key = (e.index, e.term)
            value = (e.type, e.data, lg.term(e.index - 1))
            known = registry.get(key)
            if known is None:
                registry[key] = value
            elif known != value:
                self._fail(
                    f"log matching: node {rep.id} persists entry index {e.index} "
                    f"term {e.term} as {value!r}, elsewhere it is {known!r}"
                )

    def _check_leaders(self) -> None:
        for rep in self.replicas.values():
            node = rep.node
            if node is None or node.role is not _LEADER:
                continue
            holder = self.leaders.get(node.term)
            if holder is None:
                self.leaders[node.term] = rep.id
                self.trace.append((self.now, "leader", rep.id, node.term))
                self._check_completeness(rep)
            elif holder != rep.id:
                self._fail(
                    f"election safety: nodes {holder} and {rep.id} both led "
                    f"term {node.term}"
                )

    def _check_completeness(self, rep: _Replica) -> None:
        top = self.top
        if top == 0:
            return
        lg = rep.node.log
        if top <= lg.snapshot_index:
            return  # its snapshot was checked against the chain when loaded
        term = lg.term(top)
        if term != self.applied[top][0]:
            self._fail(
                f"leader completeness: node {rep.id} leads term {rep.node.term} "
                f"without committed index {top} (term {self.applied[top][0]}; "
                f"it holds term {term})"
            )

    def _converged(self) -> bool:
        leader = None
        for rep in self.replicas.values():
            if rep.node is None:
                return False
            if rep.node.role is _LEADER:
                leader = rep.node
        if leader is None or leader.log.term(leader.log.committed) != leader.term:
            return False
        target = leader.log.committed
        return all(rep.sm_index == target for rep in self.replicas.values())

    def _final_checks(self) -> None:
        if not self._converged():
            states = {
                rep.id: (rep.node.role.value if rep.node else "down", rep.sm_index)
                for rep in self.replicas.values()
            }
            self.violations.append(
                f"liveness: cluster did not converge within {self.heal_steps} heal "
                f"steps after step {self.steps}: {states}"
            )
        for index, data in self.acked.items():
            for rep in self.replicas.values():
                if rep.sm_index < index:
                    self.violations.append(
                        f"durability: acknowledged index {index} ({data!r}) not "
                        f"applied by node {rep.id} at the end (applied {rep.sm_index})"
                    )
                    return
            if self.applied.get(index, (0, 0, None))[2] != data:
                self.violations.append(
                    f"durability: acknowledged index {index} ({data!r}) was "
                    f"replaced by {self.applied.get(index)!r}"
                )
                return
        for rep in self.replicas.values():
            if self.chain.get(rep.sm_index) != rep.sm_hash:
                self.violations.append(
                    f"state machine safety: node {rep.id} ends with a state that "
                    f"differs from the agreed one at index {rep.sm_index}"
                )

    def _fail(self, what: str) -> None:
        self.violations.append(f"step {self.now}: {what}")
        raise _Violation(what)

    def _result(self) -> SimResult:
        digest = hashlib.blake2b(repr(self.trace).encode(), digest_size=16)
        return SimResult(
            seed=self.seed,
            nodes=len(self.voters),
            violations=list(self.violations),
            committed=self.top,
            elections=len(self.leaders),
            trace_hash=digest.hexdigest(),
            acknowledged=len(self.acked),
            partitions=self.stats["partitions"],
            crashes=self.stats["crashes"],
            torn_crashes=self.stats["torn"],
            snapshots_installed=self.stats["snapshots"],
            messages=self.stats["messages"],
            steps=self.now,
        )


def simulate(
    seed: int,
    *,
    nodes: int = 3,
    steps: int = 600,
    faults: Iterable[str] | str = "all",
    bug: str | None = None,
    heal_steps: int = 400,
    config: RaftConfig | None = None,
) -> SimResult:
    """simulate runs one cluster of `nodes` voters for `steps` faulty steps.

    faults: "all", "none", or any of ALL_FAULTS. bug: a planted bug name from
    ledger.raft.core.KNOWN_BUGS, for testing that the checks catch it.
    Same arguments, same result and trace_hash.
    """
    return Simulation(
        seed,
        nodes=nodes,
        steps=steps,
        faults=faults,
        bug=bug,
        heal_steps=heal_steps,
        config=config,
    ).run()


def _run_one(args: tuple) -> SimResult:
    seed, nodes, steps, faults, bug = args
    return simulate(seed, nodes=nodes, steps=steps, faults=faults, bug=bug)


def run_seeds(
    count: int,
    start: int = 0,
    nodes: int | None = None,
    steps: int = 600,
    *,
    faults: Iterable[str] | str = "all",
    bug: str | None = None,
    workers: int = 1,
) -> dict:
    """run_seeds simulates seeds start..start+count-1 and summarises them.

    nodes: 3 or 5 for all seeds; None alternates (even seeds 3, odd seeds 5).
    workers: processes to spread seeds over (1 runs in this process).
    Returns {"seeds", "violations" (failing seeds), "first_failing_seed",
    "first_violation", "seconds", "committed_entries", and per-seed averages
    "avg_elections", "avg_partitions", "avg_crashes", "avg_torn_crashes",
    "avg_snapshots_installed", "avg_committed", "avg_acknowledged"}.
    """
    began = time.perf_counter()
    fault_arg = faults if isinstance(faults, str) else tuple(sorted(faults))
    jobs = [
        (s, nodes or (3 if s % 2 == 0 else 5), steps, fault_arg, bug)
        for s in range(start, start + count)
    ]
    if workers > 1 and count > 1:
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(workers) as pool:
            results = pool.map(_run_one, jobs, chunksize=max(1, count // (workers * 8)))
    else:
        results = [_run_one(j) for j in jobs]

    failing = [r for r in results if r.violations]
    n = max(len(results), 1)
    summary = {
        "seeds": len(results),
        "violations": len(failing),
        "first_failing_seed": failing[0].seed if failing else None,
        "first_violation": failing[0].violations[0] if failing else None,
        "seconds": round(time.perf_counter() - began, 3),
        "committed_entries": sum(r.committed for r in results),
        "avg_elections": sum(r.elections for r in results) / n,
        "avg_partitions": sum(r.partitions for r in results) / n,
        "avg_crashes": sum(r.crashes for r in results) / n,
        "avg_torn_crashes": sum(r.torn_crashes for r in results) / n,
        "avg_snapshots_installed": sum(r.snapshots_installed for r in results) / n,
        "avg_committed": sum(r.committed for r in results) / n,
        "avg_acknowledged": sum(r.acknowledged for r in results) / n,
    }
    if failing:
        log.warning(
            "raft simulation: %d of %d seeds violated safety; first seed %d: %s",
            len(failing),
            len(results),
            failing[0].seed,
            failing[0].violations[0],
        )
    return summary

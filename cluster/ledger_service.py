"""Start and stop a replicated ledger of N replicas for a job.

Layout under the ledger directory (what ``medfed ledger verify --dir`` reads)::

    <dir>/genesis.json        the consortium (written once, never replaced)
    <dir>/keys/<member>.pem   members' signing keys
    <dir>/replica-<i>/        replica i's blocks.log (and state.snap)
    <dir>/replica-<i>/raft/   replica i's Raft log, hard state and snapshot

Placement: the replicas share one placement group. With at least as many
alive nodes as replicas it is STRICT_SPREAD (one replica per node, so a node
loss costs one replica); otherwise PACK, and the replicas share a node, which
protects against process crashes but not against losing that node (the
driver logs a warning).

Requires a running Ray (``cluster.runtime.ray_session``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.ledger_client import LedgerClient
from actors.ledger_replica import (
    REPLICA_CPUS, LedgerReplica, ReplicaConfig, replica_name,
)
from ledger.genesis import (
    GENESIS_FILE, Genesis, hospital_id, load_signer, make_consortium,
)
from ledger.identity import (
    ADMIN, AUDITOR, COORDINATOR, HOSPITAL, SERVER, Member, Signer, generate_key,
    public_key_hex, save_private_key,
)

log = logging.getLogger(__name__)


def _write_named_consortium(directory: Path, hospitals: list[str], replicas: int,
                            name: str) -> Genesis:
    """Like ``make_consortium`` but with the hospitals' own member ids."""
    if len(set(hospitals)) != len(hospitals) or not hospitals:
        raise ValueError(f"hospital names must be distinct and non-empty: {hospitals}")
    plan = [(h, HOSPITAL) for h in hospitals]
    plan += [("coordinator", COORDINATOR), ("server", SERVER),
             ("auditor", AUDITOR), ("admin", ADMIN)]
    members = []
    for member_id, role in plan:
        key = generate_key()
        save_private_key(key, directory / "keys" / f"{member_id}.pem")
        members.append(Member(member_id, member_id, role, public_key_hex(key)))
    genesis = Genesis(name, [f"replica-{i}" for i in range(replicas)], members)
    genesis.save(directory / GENESIS_FILE)
    return genesis


def _ensure_genesis(directory: Path, replicas: int, hospitals: int | list[str],
                    name: str) -> Genesis:
    """Load the genesis, or write it with fresh keys when absent."""
    if (directory / GENESIS_FILE).exists():
        genesis = Genesis.load(directory / GENESIS_FILE)
        if len(genesis.voters) != replicas:
            raise ValueError(
                f"{directory / GENESIS_FILE} names {len(genesis.voters)} replicas, "
                f"not {replicas}; start with replicas={len(genesis.voters)}"
            )
        return genesis
    if isinstance(hospitals, int):
        return make_consortium(directory, hospitals, replicas, name).genesis
    defaults = [hospital_id(i) for i in range(len(hospitals))]
    if list(hospitals) == defaults:
        return make_consortium(directory, len(hospitals), replicas, name).genesis
    genesis = _write_named_consortium(directory, list(hospitals), replicas, name)
    log.info("consortium %r created in %s: hospitals %s, %d replicas",
             name, directory, hospitals, replicas)
    return genesis


@dataclass
class LedgerService:
    """A running ledger: its directory, genesis, replica actors and a client.

    Use as a context manager, or call `stop()`.
    """

    dir: Path
    genesis: Genesis
    ledger_id: str
    replicas: list[Any]
    client: LedgerClient
    config: ReplicaConfig
    group: Any = None
    strategy: str = "PACK"
    _signers: dict[str, Signer] = field(default_factory=dict)
    _stopped: bool = False

    def replica_dir(self, index: int) -> Path:
        return self.dir / f"replica-{index}"

    def signer(self, member_id: str) -> Signer:
        """The signer of `member_id` from the ledger's `keys/` folder."""
        if member_id not in self._signers:
            self._signers[member_id] = load_signer(self.dir, member_id)
        return self._signers[member_id]

    def _options(self, index: int) -> dict:
        options: dict[str, Any] = {"name": replica_name(self.ledger_id, index)}
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=index
            )
        return options

    def start_replica(self, index: int) -> Any:
        """Create replica `index`'s actor (again); it restores from its directory."""
        handle = LedgerReplica.options(**self._options(index)).remote(
            self.ledger_id, index, len(self.replicas), str(self.replica_dir(index)),
            self.config,
        )
        self.replicas[index] = handle
        self.client.replicas[index] = handle
        return handle

    def kill_replica(self, index: int, restart: bool = True) -> None:
        """Kill replica `index`'s process; with `restart`, Ray restarts it.

        Without `restart` the actor is gone until `start_replica(index)`.
        """
        handle = self.replicas[index]
        ray.kill(handle, no_restart=not restart)
        if not restart:
            _wait_dead(handle)
        log.info("replica %d killed (%s)", index,
                 "Ray restarts it" if restart else "stays down")

    def stop(self) -> None:
        """Stop every replica (files closed), then remove the placement group.

        Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        refs = []
        for handle in self.replicas:
            if handle is not None:
                refs.append(handle.stop.remote())
        try:
            ray.wait(refs, num_returns=len(refs), timeout=5.0)
        finally:
            for handle in self.replicas:
                if handle is not None:
                    ray.kill(handle, no_restart=True)
            if self.group is not None:
                remove_placement_group(self.group)
                self.group = None
        log.info("ledger %s stopped", self.dir)

    def __enter__(self) -> "LedgerService":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_dead(handle: Any, timeout_s: float = 10.0) -> None:
    """Wait until calls to `handle` fail: the actor's name is free again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.status.remote(), timeout=1.0)
        except Exception:  # any failure means the actor is gone
            return
        time.sleep(0.05)


def _placement(replicas: int) -> tuple[Any, str]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    strategy = "STRICT_SPREAD" if len(nodes) >= replicas else "PACK"
    if strategy == "PACK" and replicas > 1:
        log.warning(
            "%d alive node(s) for %d ledger replicas: they share a node, so "
            "losing it loses the ledger's majority", len(nodes), replicas,
        )
    group = placement_group([{"CPU": REPLICA_CPUS}] * replicas, strategy=strategy)
    ray.get(group.ready(), timeout=60)
    return group, strategy


def start_ledger(
    directory: str | Path, replicas: int = 3,
    hospitals: int | list[str] = 3, *, name: str = "medfed",
    config: ReplicaConfig | None = None, leader_timeout_s: float = 30.0,
    placement: bool = True,
) -> LedgerService:
    """Start (or restart from disk) the ledger in `directory`; wait for a leader.

    Writes the genesis and keys when absent (`hospitals` is a count, giving
    hospital-00..., or a list of member ids). `replicas` must match the
    genesis. Raises NoLeader when no leader emerges in `leader_timeout_s`.
    """
    if replicas not in (3, 5):
        raise ValueError(f"replicas={replicas}; a ledger runs 3 or 5 replicas")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    genesis = _ensure_genesis(directory, replicas, hospitals, name)
    ledger_id = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    config = config or ReplicaConfig()

    group, strategy = _placement(replicas) if placement else (None, "none")
    service = LedgerService(
        directory, genesis, ledger_id, [None] * replicas,
        LedgerClient([None] * replicas), config, group, strategy,
    )
    try:
        for index in range(replicas):
            service.replica_dir(index).mkdir(exist_ok=True)
            service.start_replica(index)
        leader = service.client.wait_for_leader(leader_timeout_s)
    except BaseException:
        service.stop()
        raise
    log.info("ledger %s started: %d replicas (%s), leader replica %d",
             directory, replicas, strategy, leader)
    return service

"""The genesis file: who the consortium is, before any entry is committed.

``genesis.json`` names the consortium, the Raft voters (replica ids) and the
members with roles and public keys. Its hash is the ``prev_hash`` of block 1,
so a chain belongs to exactly one genesis. ``make_consortium`` creates a
complete consortium for runs and tests: keys for N hospitals, a coordinator, a
server, an auditor and an admin.

Layout written by ``make_consortium(dir)``::

    dir/genesis.json
    dir/keys/<member id>.pem   (mode 0600)
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ledger.entries import canonical
from ledger.identity import (
    ADMIN, AUDITOR, COORDINATOR, HOSPITAL, SERVER, Member, Signer, generate_key,
    public_key_hex, save_private_key,
)
from ledger.recordlog import atomic_write

log = logging.getLogger(__name__)

GENESIS_FILE = "genesis.json"


@dataclass(frozen=True)
class Genesis:
    """The consortium's founding record."""

    consortium: str
    voters: list[str]
    members: list[Member]

    def __post_init__(self) -> None:
        if len(self.voters) not in (1, 3, 5, 7):
            raise ValueError(
                f"genesis names {len(self.voters)} voters {self.voters}; use 3 or 5 "
                "(1 for a single-replica test)"
            )
        ids = [m.id for m in self.members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"genesis repeats a member id: {ids}")
        if not any(m.role == ADMIN for m in self.members):
            raise ValueError("genesis has no admin; members could never change")

    def to_dict(self) -> dict:
        return {
            "consortium": self.consortium,
            "voters": list(self.voters),
            "members": [m.to_dict() for m in self.members],
        }

    def hash(self) -> str:
        """SHA-256 hex of the canonical genesis; block 1's ``prev_hash``."""
        return hashlib.sha256(canonical(self.to_dict())).hexdigest()

    def save(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(Path(path), text.encode())

    @classmethod
    def load(cls, path: str | Path) -> "Genesis":
        path = Path(path)
        if path.is_dir():
            path = path / GENESIS_FILE
        if not path.exists():
            raise FileNotFoundError(f"genesis file {path} not found")
        try:
            raw = json.loads(path.read_text())
            return cls(
                str(raw["consortium"]),
                [str(v) for v in raw["voters"]],
                [Member.from_dict(m) for m in raw["members"]],
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a genesis file ({exc})") from exc


@dataclass
class Consortium:
    """A generated consortium: its genesis, where it lives, and every signer."""

    dir: Path
    genesis: Genesis
    signers: dict[str, Signer] = field(default_factory=dict)

    @property
    def hospitals(self) -> list[str]:
        return [m.id for m in self.genesis.members if m.role == HOSPITAL]


def hospital_id(index: int) -> str:
    """The member id of hospital ``index``, matching the data's hospital names."""
    return f"hospital-{index:02d}"


def make_consortium(
    directory: str | Path, hospitals: int = 3, replicas: int = 3,
    name: str = "medfed", overwrite: bool = False,
) -> Consortium:
    """Generate keys and write ``genesis.json`` plus ``keys/*.pem`` under ``directory``.

    Members: ``hospital-00`` ... (role hospital), ``coordinator``, ``server``,
    ``auditor``, ``admin``. Voters: ``replica-0`` ... ``replica-{replicas-1}``.
    Refuses to replace an existing genesis unless ``overwrite``: new keys
    would orphan every chain built on the old one.
    """
    if hospitals < 1:
        raise ValueError(f"hospitals={hospitals}; a consortium needs at least one")
    directory = Path(directory)
    if (directory / GENESIS_FILE).exists() and not overwrite:
        raise ValueError(
            f"{directory / GENESIS_FILE} already exists; use load_consortium() to "
            "reuse it, or overwrite=True to replace it and its keys"
        )
    plan = [(hospital_id(i), HOSPITAL) for i in range(hospitals)]
    plan += [("coordinator", COORDINATOR), ("server", SERVER),
             ("auditor", AUDITOR), ("admin", ADMIN)]

    signers: dict[str, Signer] = {}
    members: list[Member] = []
    for member_id, role in plan:
        key = generate_key()
        save_private_key(key, directory / "keys" / f"{member_id}.pem")
        signers[member_id] = Signer(member_id, key)
        members.append(Member(member_id, member_id, role, public_key_hex(key)))

    genesis = Genesis(name, [f"replica-{i}" for i in range(replicas)], members)
    genesis.save(directory / GENESIS_FILE)
    log.info(
        "consortium %r created in %s: %d hospitals, %d replicas",
        name, directory, hospitals, replicas,
    )
    return Consortium(directory, genesis, signers)


def load_signer(directory: str | Path, member_id: str) -> Signer:
    """The signer of ``member_id`` from a consortium directory's ``keys/``."""
    return Signer.load(member_id, Path(directory) / "keys" / f"{member_id}.pem")


def load_consortium(directory: str | Path) -> Consortium:
    """Reload what ``make_consortium`` wrote (genesis and every key present)."""
    directory = Path(directory)
    genesis = Genesis.load(directory / GENESIS_FILE)
    signers = {
        m.id: load_signer(directory, m.id)
        for m in genesis.members
        if (directory / "keys" / f"{m.id}.pem").exists()
    }
    return Consortium(directory, genesis, signers)

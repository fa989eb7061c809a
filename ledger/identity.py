"""Consortium identities: members with roles and Ed25519 keys.

A member is an organisation acting in one role. Public keys travel as 64 hex
characters (the raw 32-byte Ed25519 key); private keys are stored as
unencrypted PKCS#8 PEM files readable only by their owner (mode 0600).
Signatures are over bytes the caller has already encoded canonically
(``ledger.entries.canonical``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

HOSPITAL = "hospital"
COORDINATOR = "coordinator"
SERVER = "server"
AUDITOR = "auditor"
ADMIN = "admin"
ROLES = (HOSPITAL, COORDINATOR, SERVER, AUDITOR, ADMIN)


@dataclass(frozen=True)
class Member:
    """A consortium member: id (e.g. "hospital-00"), organisation, role, public key."""

    id: str
    org: str
    role: str
    public_key: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(
                f"member {self.id!r}: unknown role {self.role!r}; use one of {ROLES}"
            )
        public_key_from_hex(self.public_key)

    def to_dict(self) -> dict:
        return {
            "id": self.id, "org": self.org, "role": self.role,
            "public_key": self.public_key,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "Member":
        try:
            return cls(str(raw["id"]), str(raw["org"]), str(raw["role"]),
                       str(raw["public_key"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"member record {raw!r} lacks a field: {exc}") from exc


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 lowercase hex characters."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return raw.hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a 64-hex-character Ed25519 public key; ValueError naming it if bad."""
    try:
        raw = bytes.fromhex(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"public key {text!r} is not hex") from exc
    if len(raw) != 32:
        raise ValueError(f"public key {text!r} has {len(raw)} bytes, expected 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def save_private_key(key: Ed25519PrivateKey, path: str | Path) -> None:
    """Write ``key`` as PKCS#8 PEM, created with mode 0600 (never world-readable)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"private key {path} not found")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def verify(public_key: str, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    try:
        public_key_from_hex(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Signer:
    """A member's private key, used to sign canonical bytes."""

    def __init__(self, member_id: str, key: Ed25519PrivateKey) -> None:
        self.member_id = member_id
        self._key = key
        self.public_key = public_key_hex(key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    @classmethod
    def load(cls, member_id: str, path: str | Path) -> "Signer":
        return cls(member_id, load_private_key(path))

    def __repr__(self) -> str:
        return f"Signer({self.member_id!r}, public_key={self.public_key[:16]}...)"

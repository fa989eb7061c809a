"""Signed ledger entries: canonical encoding, schema of each type, signing helpers.

An entry on the wire is the canonical JSON (sorted keys, no spaces, UTF-8, no
NaN) of::

    {"v": 1, "type": T, "signer": ID, "nonce": HEX, "timestamp": SECONDS,
     "body": {...}, "sig": HEX}

``sig`` is the signer's Ed25519 signature over the canonical JSON of the same
object without ``sig``. Bytes inside bodies are hex strings. The timestamp is
supplied by the caller (Unix seconds); the rules never read a clock. An
entry's id is the SHA-256 (hex) of its exact bytes, so any byte string, even a
malformed one, has an id. ``parse`` accepts only the canonical encoding, so one
entry has exactly one id.

Raft carries a batch of entries per log entry (``encode_batch``/``decode_batch``).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Callable

from ledger.identity import ROLES, Signer, public_key_from_hex

VERSION = 1

MODEL_UPDATE = "model_update"
GLOBAL_MODEL = "global_model"
PRIVACY_SPEND = "privacy_spend"
PREDICTION_AUDIT = "prediction_audit"
MEMBER_CHANGE = "member_change"
ROUND_OPEN = "round_open"
TYPES = (
    MODEL_UPDATE, GLOBAL_MODEL, PRIVACY_SPEND, PREDICTION_AUDIT, MEMBER_CHANGE,
    ROUND_OPEN,
)


class MalformedEntry(ValueError):
    """Bytes that are not a well-formed canonical entry; the message says why."""


def canonical(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, compact separators, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def entry_id(raw: bytes) -> str:
    """The id of an entry: SHA-256 hex of its exact bytes."""
    return hashlib.sha256(raw).hexdigest()


# -- body schema -------------------------------------------------------------

def _is_hash(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64
        and all(c in "0123456789abcdef" for c in value)
    )


def _check_hash(value: Any) -> str | None:
    return None if _is_hash(value) else "must be 64 lowercase hex characters"


def _check_round(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be an integer >= 0"


def _check_count(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return None if ok else "must be an integer > 0"


def _check_number(value: Any) -> str | None:
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and value >= 0
    )
    return None if ok else "must be a finite number >= 0"


def _check_delta(value: Any) -> str | None:
    if _check_number(value) is not None or value >= 1:
        return "must be a number in [0, 1)"
    return None


def _check_text(value: Any) -> str | None:
    ok = isinstance(value, str) and 0 < len(value) <= 200
    return None if ok else "must be a non-empty string of at most 200 characters"


def _check_privacy(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"epsilon", "delta"}:
        return "must be null or {epsilon, delta}"
    return _check_number(value["epsilon"]) or _check_delta(value["delta"])


def _check_hash_list(value: Any) -> str | None:
    if not isinstance(value, list) or not all(_is_hash(v) for v in value):
        return "must be a list of 64-hex-character hashes"
    if len(set(value)) != len(value):
        return "must not repeat a hash"
    return None


def _check_action(value: Any) -> str | None:
    return None if value in ("add", "remove") else "must be 'add' or 'remove'"


def _check_member(value: Any) -> str | None:
    if not isinstance(value, dict) or set(value) != {"id", "org", "role", "public_key"}:
        return "must be {id, org, role, public_key}"
    if _check_text(value["id"]) or _check_text(value["org"]):
        return "id and org must be non-empty strings"
    if value["role"] not in ROLES:
        return f"role {value['role']!r} is not one of {ROLES}"
    try:
        public_key_from_hex(value["public_key"])
    except ValueError as exc:
        return str(exc)
    return None


Check = Callable[[Any], "str | None"]
SCHEMA: dict[str, dict[str, Check]] = {
    MODEL_UPDATE: {
        "hospital": _check_text, "round": _check_round,
        "base_model_hash": _check_hash, "update_hash": _check_hash,
        "num_samples": _check_count, "privacy_spent": _check_privacy,
    },
    GLOBAL_MODEL: {
        "round": _check_round, "model_hash": _check_hash,
        "update_hashes": _check_hash_list,
    },
    PRIVACY_SPEND: {
        "hospital": _check_text, "round": _check_round, "epsilon": _check_number,
        "delta": _check_delta, "accountant": _check_text,
    },
    PREDICTION_AUDIT: {
        "root": _check_hash, "count": _check_count, "model_hash": _check_hash,
    },
    MEMBER_CHANGE: {"action": _check_action, "member": _check_member},
    ROUND_OPEN: {"round": _check_round, "base_model_hash": _check_hash},
}


def check_body(kind: str, body: Any) -> None:
    """Raise ``MalformedEntry`` unless ``body`` fits the schema of ``kind``."""
    if kind not in SCHEMA:
        raise MalformedEntry(f"unknown entry type {kind!r}; known: {TYPES}")
    if not isinstance(body, dict):
        raise MalformedEntry(
            f"{kind} body must be an object, got {type(body).__name__}"
        )
    fields = SCHEMA[kind]
    missing = sorted(set(fields) - set(body))
    extra = sorted(set(body) - set(fields))
    if missing or extra:
        raise MalformedEntry(f"{kind} body: missing {missing}, unexpected {extra}")
    for name, check in fields.items():
        why = check(body[name])
        if why:
            raise MalformedEntry(f"{kind}.{name}={body[name]!r} {why}")


# -- entries -----------------------------------------------------------------

@dataclass(frozen=True)
class SignedEntry:
    """A parsed entry. ``raw`` holds its exact canonical bytes."""

    type: str
    signer: str
    nonce: str
    timestamp: float
    body: dict
    signature: bytes
    raw: bytes

    @property
    def id(self) -> str:
        return entry_id(self.raw)

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers (the entry without ``sig``)."""
        return canonical(_unsigned(self.type, self.signer, self.nonce,
                                   self.timestamp, self.body))


def _unsigned(kind: str, signer: str, nonce: str, timestamp: float, body: dict) -> dict:
    return {
        "v": VERSION, "type": kind, "signer": signer, "nonce": nonce,
        "timestamp": timestamp, "body": body,
    }


_TOP = {"v", "type", "signer", "nonce", "timestamp", "body", "sig"}


def parse(raw: bytes) -> SignedEntry:
    """Decode and check an entry's structure; does NOT verify the signature.

    Raises ``MalformedEntry`` naming the first problem found.
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedEntry(f"not UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedEntry(f"entry must be a JSON object, got {type(obj).__name__}")
    if set(obj) != _TOP:
        raise MalformedEntry(
            f"entry fields: missing {sorted(_TOP - set(obj))}, "
            f"unexpected {sorted(set(obj) - _TOP)}"
        )
    if obj["v"] != VERSION:
        raise MalformedEntry(f"entry version {obj['v']!r}; this ledger reads {VERSION}")
    for name in ("signer", "nonce"):
        if _check_text(obj[name]):
            raise MalformedEntry(f"{name}={obj[name]!r} must be a non-empty string")
    if _check_number(obj["timestamp"]):
        raise MalformedEntry(f"timestamp={obj['timestamp']!r} must be a number >= 0")
    check_body(obj["type"], obj["body"])
    try:
        signature = bytes.fromhex(obj["sig"])
    except (TypeError, ValueError) as exc:
        raise MalformedEntry(f"sig is not hex: {obj['sig']!r}") from exc
    if canonical(obj) != raw:
        raise MalformedEntry(
            "entry is not in canonical encoding (sorted, compact JSON)"
        )
    return SignedEntry(
        obj["type"], obj["signer"], obj["nonce"], obj["timestamp"], obj["body"],
        signature, raw,
    )


def sign_entry(
    signer: Signer, kind: str, body: dict, *, timestamp: float,
    nonce: str | None = None,
) -> bytes:
    """Build, check and sign an entry; returns its canonical bytes.

    ``timestamp`` is Unix seconds chosen by the caller; ``nonce`` defaults to
    16 random bytes in hex and must be unique per signer.
    """
    check_body(kind, body)
    nonce = secrets.token_hex(16) if nonce is None else nonce
    unsigned = _unsigned(kind, signer.member_id, nonce, timestamp, body)
    signature = signer.sign(canonical(unsigned))
    return canonical({**unsigned, "sig": signature.hex()})


def model_update(
    signer: Signer, *, round: int, base_model_hash: str, update_hash: str,
    num_samples: int, privacy_spent: dict | None = None, timestamp: float,
    nonce: str | None = None,
) -> bytes:
    """A hospital's update for ``round``, built on ``base_model_hash``."""
    body = {
        "hospital": signer.member_id, "round": round,
        "base_model_hash": base_model_hash, "update_hash": update_hash,
        "num_samples": num_samples, "privacy_spent": privacy_spent,
    }
    return sign_entry(signer, MODEL_UPDATE, body, timestamp=timestamp, nonce=nonce)


def global_model(
    signer: Signer, *, round: int, model_hash: str, update_hashes: list[str],
    timestamp: float, nonce: str | None = None,
) -> bytes:
    """The coordinator's aggregate for ``round`` and the updates it used."""
    body = {"round": round, "model_hash": model_hash,
            "update_hashes": list(update_hashes)}
    return sign_entry(signer, GLOBAL_MODEL, body, timestamp=timestamp, nonce=nonce)


def privacy_spend(
    signer: Signer, *, round: int, epsilon: float, delta: float, accountant: str,
    timestamp: float, nonce: str | None = None,
) -> bytes:
    """A hospital's cumulative privacy spent after ``round`` (epsilon at delta)."""
    body = {"hospital": signer.member_id, "round": round, "epsilon": epsilon,
            "delta": delta, "accountant": accountant}
    return sign_entry(signer, PRIVACY_SPEND, body, timestamp=timestamp, nonce=nonce)


def prediction_audit(
    signer: Signer, *, root: str, count: int, model_hash: str, timestamp: float,
    nonce: str | None = None,
) -> bytes:
    """A server's Merkle root over ``count`` predictions made with ``model_hash``."""
    body = {"root": root, "count": count, "model_hash": model_hash}
    return sign_entry(signer, PREDICTION_AUDIT, body, timestamp=timestamp, nonce=nonce)


def member_change(
    signer: Signer, *, action: str, member_id: str, org: str, role: str,
    public_key: str, timestamp: float, nonce: str | None = None,
) -> bytes:
    """An admin adds or removes a member."""
    body = {"action": action, "member": {"id": member_id, "org": org, "role": role,
                                         "public_key": public_key}}
    return sign_entry(signer, MEMBER_CHANGE, body, timestamp=timestamp, nonce=nonce)


def round_open(
    signer: Signer, *, round: int, base_model_hash: str, timestamp: float,
    nonce: str | None = None,
) -> bytes:
    """The coordinator opens ``round``; updates must be built on ``base_model_hash``."""
    body = {"round": round, "base_model_hash": base_model_hash}
    return sign_entry(signer, ROUND_OPEN, body, timestamp=timestamp, nonce=nonce)


# -- batches (the data of one Raft log entry) ----------------------------------

_BATCH_MAGIC = b"MFB1"


def encode_batch(entries: list[bytes]) -> bytes:
    """Pack entries into one Raft entry's data: magic, count, length-prefixed items."""
    parts = [_BATCH_MAGIC, struct.pack(">I", len(entries))]
    for raw in entries:
        parts.append(struct.pack(">I", len(raw)))
        parts.append(bytes(raw))
    return b"".join(parts)


def decode_batch(data: bytes) -> list[bytes]:
    """Inverse of ``encode_batch``; raises ``MalformedEntry`` on bad framing."""
    if data[:4] != _BATCH_MAGIC or len(data) < 8:
        raise MalformedEntry(f"batch does not start with {_BATCH_MAGIC!r}")
    (count,) = struct.unpack_from(">I", data, 4)
    offset, out = 8, []
    for position in range(count):
        if offset + 4 > len(data):
            raise MalformedEntry(f"batch ends inside the length of item {position}")
        (length,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise MalformedEntry(f"batch item {position} runs past the end")
        out.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise MalformedEntry(f"{len(data) - offset} trailing bytes after the batch")
    return out

"""Signing and checking per-round key advertisements.

Each hospital signs its fresh per-round X25519 public keys with its long-term
Ed25519 identity key; every receiver checks the signature against a directory
of identity keys it trusts, so a relaying coordinator cannot substitute keys
and sit in the middle of a pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from federation.secagg.errors import InvalidAdvert
from federation.secagg.messages import SignedAdvert

Directory = Mapping[int, Ed25519PublicKey | bytes]
"""Identity public key of every hospital, by hospital id: a key object or its
32 raw bytes (raw bytes pickle; key objects do not, so pass bytes to actors)."""


def load_directory(directory: Directory) -> dict[int, Ed25519PublicKey]:
    """Returns the directory with every entry as an ``Ed25519PublicKey``."""
    loaded = {}
    for hospital, key in directory.items():
        if isinstance(key, (bytes, bytearray)):
            try:
                key = Ed25519PublicKey.from_public_bytes(bytes(key))
            except ValueError:
                raise ValueError(
                    f"identity key of hospital {hospital} is not 32 raw Ed25519 "
                    f"public-key bytes (got {len(key)} bytes)"
                ) from None
        loaded[int(hospital)] = key
    return loaded


def load_identity(key: Ed25519PrivateKey | bytes) -> Ed25519PrivateKey:
    """Returns an identity signing key given as a key object or 32 raw bytes."""
    if isinstance(key, (bytes, bytearray)):
        return Ed25519PrivateKey.from_private_bytes(bytes(key))
    return key


def seed_commitment(seed: bytes, round_number: int, hospital: int) -> bytes:
    """SHA-256 commitment to a 32-byte self-mask seed (the seed has full entropy)."""
    return hashlib.sha256(
        b"medfed/secagg/seed/v1"
        + round_number.to_bytes(8, "big")
        + hospital.to_bytes(4, "big")
        + seed
    ).digest()


def sign_advert(
    identity_key: Ed25519PrivateKey,
    hospital: int,
    round_number: int,
    mask_public: bytes,
    share_public: bytes,
    commitment: bytes,
) -> SignedAdvert:
    """Returns the advert with its Ed25519 signature."""
    unsigned = SignedAdvert(
        hospital, round_number, mask_public, share_public, commitment, b""
    )
    signature = identity_key.sign(unsigned.signed_bytes())
    return SignedAdvert(
        hospital, round_number, mask_public, share_public, commitment, signature
    )


def verify_advert(
    advert: SignedAdvert, directory: Directory, round_number: int
) -> None:
    """Raises ``InvalidAdvert`` unless the advert is well formed, for this
    round, from a known hospital, and signed by that hospital's identity key."""
    if advert.round != round_number:
        raise InvalidAdvert(
            f"advert of hospital {advert.hospital} is for round {advert.round}, "
            f"expected {round_number}; discard stale adverts"
        )
    identity = directory.get(advert.hospital)
    if identity is None:
        raise InvalidAdvert(
            f"advert from hospital {advert.hospital}, which is not in the identity "
            "directory; register its identity key first"
        )
    if not (
        len(advert.mask_public) == len(advert.share_public) == 32
        and len(advert.seed_commitment) == 32
    ):
        raise InvalidAdvert(f"advert of hospital {advert.hospital} has malformed keys")
    try:
        identity.verify(advert.signature, advert.signed_bytes())
    except InvalidSignature:
        raise InvalidAdvert(
            f"advert of hospital {advert.hospital} for round {round_number} has an "
            "invalid signature: its keys were forged or altered in transit"
        ) from None

"""Mask keys and their expansion into mask vectors.

Every mask comes from a cryptographic stream cipher: a 32-byte ChaCha20 key,
derived by HKDF-SHA256 from a secret (an X25519 shared secret or a self-mask
seed) with the purpose, the round number and the pair of hospitals bound into
the HKDF info, is expanded into a ChaCha20 keystream read as little-endian
64-bit integers. A fresh key per round and per pair means the all-zero nonce
is never reused with one key.
"""

from __future__ import annotations

import functools
import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_DOMAIN = b"medfed/secagg/v1/"
_NONCE = bytes(16)


def derive_key(secret: bytes, purpose: str, round_number: int, *parties: int) -> bytes:
    """Derives a 32-byte key from ``secret`` bound to purpose, round and parties.

    purpose: ``"pairwise-mask"``, ``"self-mask"`` or ``"share-encryption"``;
        distinct purposes give independent keys from one secret.
    parties: hospital ids; pass pairs sorted so both ends derive the same key.
    """
    info = _DOMAIN + purpose.encode() + round_number.to_bytes(8, "big")
    for party in parties:
        info += party.to_bytes(4, "big")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        secret
    )


@functools.lru_cache(maxsize=2)
def _zeros(nbytes: int) -> bytes:
    """A shared zero plaintext; encrypting it yields the bare keystream."""
    return bytes(nbytes)


def expand(key: bytes, length: int, out: bytearray | None = None) -> np.ndarray:
    """Expands ``key`` into ``length`` pseudo-random uint64 values (the keystream).

    out: optional buffer of at least ``8 * length + 16`` bytes to write into,
        reused by callers that expand many keys of one length; the returned
        array is a view of it and is overwritten by the next call with it.
    Returns a writable little-endian uint64 array; 8 bytes per value.
    """
    nbytes = 8 * length
    if out is None or len(out) < nbytes + 16:
        out = bytearray(nbytes + 16)
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()

    # Encrypting zeros yields the keystream without a Python-level loop.
    encryptor.update_into(_zeros(nbytes), out)
    return np.frombuffer(out, dtype="<u8", count=length)


def pairwise_mask_key(shared_secret: bytes, round_number: int, a: int, b: int) -> bytes:
    """Key of the mask hospitals ``a`` and ``b`` share in a round (order-free)."""
    pair = (min(a, b), max(a, b))
    return derive_key(shared_secret, "pairwise-mask", round_number, *pair)


def self_mask_key(seed: bytes, round_number: int, hospital: int) -> bytes:
    """Key of a hospital's self mask, from its 32-byte self-mask seed."""
    return derive_key(seed, "self-mask", round_number, hospital)

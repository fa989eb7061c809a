"""Messages exchanged in a masked round, with their sizes on the wire.

The coordinator only relays adverts and encrypted shares; it reads masked
inputs and the shares hospitals reveal for unmasking. ``nbytes`` is the size
of the message's payload as it would be sent (ids, keys, ciphertexts, vector
bytes), used for cost accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from federation.secagg.shamir import SHARE_BYTES

_ID_BYTES = 4
_ROUND_BYTES = 8


@dataclass(frozen=True)
class SignedAdvert:
    """One hospital's per-round public keys, signed with its identity key.

    mask_public: X25519 public key for pairwise masks (32 bytes).
    share_public: X25519 public key for encrypting shares (32 bytes).
    seed_commitment: SHA-256 commitment to the self-mask seed (32 bytes), so
        the coordinator can check a rebuilt seed.
    signature: Ed25519 signature over ``signed_bytes()`` (64 bytes).
    """

    hospital: int
    round: int
    mask_public: bytes
    share_public: bytes
    seed_commitment: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        return (
            b"medfed/secagg/advert/v1"
            + self.round.to_bytes(_ROUND_BYTES, "big")
            + self.hospital.to_bytes(_ID_BYTES, "big")
            + self.mask_public
            + self.share_public
            + self.seed_commitment
        )

    def nbytes(self) -> int:
        return _ID_BYTES + _ROUND_BYTES + 32 * 3 + len(self.signature)


@dataclass(frozen=True)
class EncryptedShare:
    """A hospital's shares of its two secrets, encrypted to one neighbour.

    ciphertext: ChaCha20-Poly1305 over (key share, seed share); the round,
        sender and recipient are authenticated as associated data.
    """

    sender: int
    recipient: int
    round: int
    ciphertext: bytes

    def nbytes(self) -> int:
        return 2 * _ID_BYTES + _ROUND_BYTES + len(self.ciphertext)


@dataclass(frozen=True)
class MaskedInput:
    """A hospital's masked, quantised, weighted update mod 2^k.

    data: uint64 residues, the update's values then the weight (length d + 1).
    clipped: how many values were clipped into range (always 0 in error mode).
    """

    hospital: int
    round: int
    data: np.ndarray
    clipped: int

    def nbytes(self) -> int:
        return 2 * _ID_BYTES + _ROUND_BYTES + int(self.data.nbytes)


@dataclass(frozen=True)
class UnmaskResponse:
    """Shares a surviving hospital reveals: seed shares of survivors, key
    shares of dropped hospitals, each ``{owner: field element}``."""

    hospital: int
    round: int
    seed_shares: dict[int, int]
    key_shares: dict[int, int]

    def nbytes(self) -> int:
        count = len(self.seed_shares) + len(self.key_shares)
        return _ID_BYTES + _ROUND_BYTES + count * (_ID_BYTES + SHARE_BYTES)

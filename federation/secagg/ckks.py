"""Homomorphic summation of weighted updates with CKKS (TenSEAL).

Roles, so that no single party both sees individual updates and holds the key:

- the key holder (a hospital or a separate party, never the coordinator)
  makes the CKKS keys and hands out a public context without the secret key;
- each hospital encrypts weight * update, with its weight in one extra slot,
  under the public context;
- the coordinator, holding only the public context, adds ciphertexts;
- the key holder decrypts the one sum per round it is given and returns it.

Parameters: polynomial modulus degree 8192, coefficient moduli [60, 40, 40,
60] bits, scale 2^40: 4096 slots per ciphertext, so a vector is split into
chunks of 4096 and recombined after decryption. CKKS is approximate: a
decrypted sum carries a relative error of about 1e-7 for these parameters.

Known shortcomings: the key holder can decrypt any ciphertext it obtains, so
the coordinator must not pass it anything but the sum (it decrypts at most
one sum per round and at least ``min_contributors`` contributions, but cannot
prove what was summed); a key holder colluding with the coordinator sees
every update. TenSEAL has no threshold decryption that would remove this.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters; the defaults are TenSEAL's usual ones for sums."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    scale_bits: int = 40

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.poly_modulus_degree // 2


@dataclass(frozen=True)
class EncryptedVector:
    """A vector encrypted chunk by chunk.

    round: the round it belongs to.
    chunks: serialized CKKS ciphertexts, ``slots`` values each (the last may
        be shorter).
    length: values in the plain vector (update values plus the weight slot).
    contributors: how many hospitals' vectors were added into it.
    """

    round: int
    chunks: tuple[bytes, ...]
    length: int
    contributors: int = 1

    def nbytes(self) -> int:
        """Bytes on the wire (the serialized ciphertexts)."""
        return sum(len(c) for c in self.chunks)


class CKKSKeyHolder:
    """Makes the CKKS keys and decrypts the round's sum, once per round.

    params: the CKKS parameters.
    min_contributors: fewest hospitals a sum must contain to be decrypted.
    """

    def __init__(
        self, params: CKKSParams | None = None, min_contributors: int = 2
    ) -> None:
        self.params = CKKSParams() if params is None else params
        self.min_contributors = min_contributors
        self._context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=self.params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes),
        )
        self._context.global_scale = 2.0**self.params.scale_bits
        self._decrypted_rounds: set[int] = set()

    def public_context(self) -> bytes:
        """The serialized context without the secret key, for hospitals and
        the coordinator."""
        return self._context.serialize(save_secret_key=False)

    def decrypt_sum(self, total: EncryptedVector) -> tuple[np.ndarray, float]:
        """Returns (sum of weight * values as float32, total weight).

        The total weight is approximate like every CKKS value (off by about
        1e-9 relative); round it when weights are integers.

        Refuses a second sum for one round and a sum of fewer than
        ``min_contributors`` contributions.
        """
        if total.round in self._decrypted_rounds:
            raise PermissionError(
                f"a sum for round {total.round} was already decrypted; the key holder "
                "decrypts one sum per round"
            )
        if total.contributors < self.min_contributors:
            raise PermissionError(
                f"sum of {total.contributors} contributions, fewer than "
                f"min_contributors {self.min_contributors}: it could be one update"
            )
        self._decrypted_rounds.add(total.round)

        parts = [
            ts.ckks_vector_from(self._context, chunk).decrypt()
            for chunk in total.chunks
        ]
        plain = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])
        if plain.size != total.length:
            raise ValueError(f"decrypted {plain.size} values, expected {total.length}")
        return plain[:-1].astype(np.float32), float(plain[-1])


class CKKSClient:
    """A hospital's encryptor, holding only the public context.

    public_context: from ``CKKSKeyHolder.public_context()``.
    params: must match the key holder's; they fix the chunk size.
    """

    def __init__(self, public_context: bytes, params: CKKSParams | None = None) -> None:
        self._context = ts.context_from(public_context)
        self.slots = (CKKSParams() if params is None else params).slots

    def encrypt(self, values: np.ndarray, weight: float, round: int) -> EncryptedVector:
        """Encrypts weight * values followed by the weight, chunk by chunk."""
        plain = np.empty(np.asarray(values).size + 1, dtype=np.float64)
        plain[:-1] = np.asarray(values, dtype=np.float64).ravel() * weight
        plain[-1] = weight
        if not np.isfinite(plain).all():
            raise ValueError(
                "update contains non-finite values; fix it before encrypting"
            )

        chunks = tuple(
            ts.ckks_vector(self._context, plain[start : start + self.slots]).serialize()
            for start in range(0, plain.size, self.slots)
        )
        return EncryptedVector(round, chunks, plain.size)


class CKKSAggregator:
    """The coordinator: adds encrypted vectors under the public context only."""

    def __init__(self, public_context: bytes, round: int) -> None:
        self._context = ts.context_from(public_context)
        if self._context.is_private():
            raise ValueError(
                "the coordinator was given a context with the secret key; pass "
                "CKKSKeyHolder.public_context() instead"
            )
        self.round = round
        self._sum: list | None = None
        self._length = 0
        self._contributors = 0
        self.bytes_in = 0

    def add(self, update: EncryptedVector) -> None:
        """Adds one hospital's encrypted vector into the running sum."""
        if update.round != self.round:
            raise ValueError(f"update for round {update.round}, expected {self.round}")
        if self._sum is not None and update.length != self._length:
            raise ValueError(
                f"encrypted vector of length {update.length}, expected {self._length}"
            )
        self.bytes_in += update.nbytes()

        vectors = [ts.ckks_vector_from(self._context, chunk) for chunk in update.chunks]
        if self._sum is None:
            self._sum, self._length = vectors, update.length
        else:
            for total, vector in zip(self._sum, vectors):
                total.add_(vector)
        self._contributors += 1

    def total(self) -> EncryptedVector:
        """The encrypted sum, serialized for the key holder."""
        if self._sum is None:
            raise ValueError(f"no encrypted updates were added in round {self.round}")
        chunks = tuple(v.serialize() for v in self._sum)
        logger.info(
            "round %d: CKKS sum of %d hospitals, %d ciphertexts, %d bytes in",
            self.round, self._contributors, len(chunks), self.bytes_in,
        )
        return EncryptedVector(self.round, chunks, self._length, self._contributors)


def run_ckks_round(
    holder: CKKSKeyHolder,
    values: Sequence[np.ndarray],
    weights: Sequence[float],
    round: int,
) -> tuple[np.ndarray, float, dict]:
    """Runs one CKKS round in-process: every hospital encrypts, the
    coordinator adds, the key holder decrypts the sum.

    Returns (sum of weight * values as float32, total weight, report) where
    the report holds ``hospital_bytes_out`` (per hospital, in order),
    ``coordinator_bytes_in`` and ``ciphertexts_per_hospital``.
    """
    public = holder.public_context()
    client = CKKSClient(public, holder.params)
    coordinator = CKKSAggregator(public, round)
    sent = []
    for x, w in zip(values, weights):
        update = client.encrypt(x, w, round)
        sent.append(update.nbytes())
        coordinator.add(update)
    encrypted = coordinator.total()
    total, weight = holder.decrypt_sum(encrypted)
    report = {
        "hospital_bytes_out": sent,
        "coordinator_bytes_in": coordinator.bytes_in,
        "ciphertexts_per_hospital": len(encrypted.chunks),
    }
    return total, weight, report

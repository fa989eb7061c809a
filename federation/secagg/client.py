"""The hospital side of SecAgg+ masking (Bell et al. 2020, after Bonawitz et
al. 2017), one object per hospital per round.

Stages, each one call, each answered through the coordinator:

1. ``advertise``: fresh X25519 key pairs (one for masks, one for encrypting
   shares) and a commitment to a fresh self-mask seed, signed with the
   hospital's Ed25519 identity key.
2. ``share_keys``: checks the neighbours' signed adverts, splits the mask
   private key and the self-mask seed into t-of-k Shamir shares and encrypts
   one pair of shares to each neighbour (ChaCha20-Poly1305, key from X25519 +
   HKDF).
3. ``masked_input``: y = w*q(x) + PRG(seed) + sum_{j>i} PRG(s_ij)
   - sum_{j<i} PRG(s_ij) mod 2^k over the neighbours j whose shares arrived,
   with the weight w appended as one more masked coordinate.
4. ``unmask_response``: for each neighbour, reveals its seed share if it
   survived or its key share if it dropped, never both, and answers once.

Known shortcoming: the survivor list is not signed and cross-checked among
hospitals (the consistency round of the malicious-server protocol), so a
coordinator that lies about survivors to different hospitals is only bounded
by the threshold being above half the degree. In clip mode the number of
clipped values of each hospital is reported to the coordinator in the clear.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from federation.secagg import shamir
from federation.secagg.adverts import (
    Directory,
    load_directory,
    load_identity,
    seed_commitment,
    sign_advert,
    verify_advert,
)
from federation.secagg.config import MaskingConfig
from federation.secagg.errors import AggregationAborted, InvalidAdvert, InvalidShare
from federation.secagg.messages import (
    EncryptedShare,
    MaskedInput,
    SignedAdvert,
    UnmaskResponse,
)
from federation.secagg.neighbours import neighbourhoods
from federation.secagg.prg import derive_key, expand, pairwise_mask_key, self_mask_key

logger = logging.getLogger(__name__)


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def share_cipher(
    shared_secret: bytes, round_number: int, a: int, b: int
) -> ChaCha20Poly1305:
    """AEAD for the shares hospitals ``a`` and ``b`` exchange in a round."""
    pair = (min(a, b), max(a, b))
    key = derive_key(shared_secret, "share-encryption", round_number, *pair)
    return ChaCha20Poly1305(key)


def share_header(round_number: int, sender: int, recipient: int) -> tuple[bytes, bytes]:
    """(nonce, associated data) of one share; the sender makes the nonce unique
    under the pair's key, which both directions use."""
    nonce = sender.to_bytes(12, "big")
    aad = b"medfed/secagg/share/v1" + round_number.to_bytes(8, "big")
    return nonce, aad + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")


class MaskingClient:
    """One hospital in one masked round.

    hospital_id: this hospital's id in 0..config.n-1.
    identity_key: its long-term Ed25519 signing key (object or 32 raw bytes).
    config: the round's shared parameters.
    round: the round number; keys, masks and graph are fresh per round.
    rng: source of secret random bytes, ``os.urandom`` when None. Pass a
        deterministic source only in tests: masks are exactly as secret as it.
    directory: identity public keys of all hospitals, by id.

    The object holds secret keys and does not pickle: build it where the
    hospital runs (inside its actor), one per round.
    """

    def __init__(
        self,
        hospital_id: int,
        identity_key: Ed25519PrivateKey | bytes,
        config: MaskingConfig,
        round: int,
        rng: Callable[[int], bytes] | None = None,
        *,
        directory: Directory,
    ) -> None:
        if not 0 <= hospital_id < config.n:
            raise ValueError(
                f"hospital_id must lie in [0, {config.n}), got {hospital_id}"
            )
        self.hospital_id = hospital_id
        self.config = config
        self.round = round
        self.directory = load_directory(directory)
        self._identity_key = load_identity(identity_key)
        self._randbytes = os.urandom if rng is None else rng
        graph = neighbourhoods(config.n, config.degree, config.graph_seed, round)
        self.neighbours = graph[hospital_id]

        self._mask_key = X25519PrivateKey.from_private_bytes(self._randbytes(32))
        self._share_key = X25519PrivateKey.from_private_bytes(self._randbytes(32))
        self._seed = self._randbytes(32)
        self._adverts: dict[int, SignedAdvert] = {}
        self._held: dict[int, tuple[int, int]] = {}
        self._stage = "advertise"

    def _enter(self, stage: str, after: str) -> None:
        """Moves to ``stage``; raises unless the previous stage was ``after``.

        Each stage runs once per round and in order: repeating one would
        reuse nonces or masks, or reveal more shares than the protocol allows.
        """
        if self._stage != after:
            raise AggregationAborted(
                f"hospital {self.hospital_id}, round {self.round}: {stage} called "
                f"when the last stage was {self._stage}; it must follow {after} and "
                "runs once per round (make a new client for a new round)"
            )
        self._stage = stage

    def advertise(self) -> SignedAdvert:
        """Stage 1: returns this round's public keys, signed."""
        return sign_advert(
            self._identity_key,
            self.hospital_id,
            self.round,
            _raw_public(self._mask_key),
            _raw_public(self._share_key),
            seed_commitment(self._seed, self.round, self.hospital_id),
        )

    def share_keys(self, adverts: Iterable[SignedAdvert]) -> list[EncryptedShare]:
        """Stage 2: checks the relayed adverts and encrypts shares to neighbours.

        Raises ``InvalidAdvert`` if any relayed advert fails its checks (the
        coordinator must not relay those), ``AggregationAborted`` if fewer than
        ``threshold`` neighbours advertised. Runs once per round: sharing twice
        would reuse AEAD nonces and hand out two independent sharings.
        """
        self._enter("share_keys", "advertise")
        for advert in adverts:
            verify_advert(advert, self.directory, self.round)
            known = self._adverts.get(advert.hospital)
            if known is not None and known != advert:
                raise InvalidAdvert(
                    f"two different adverts from hospital {advert.hospital} in round "
                    f"{self.round}; refusing to share keys"
                )
            if advert.hospital in self.neighbours:
                self._adverts[advert.hospital] = advert

        holders = sorted(self._adverts)
        if len(holders) < self.config.threshold:
            raise AggregationAborted(
                f"hospital {self.hospital_id}: only {len(holders)} of "
                f"{len(self.neighbours)} neighbours advertised keys, fewer than the "
                f"threshold {self.config.threshold}",
                {"hospital": self.hospital_id, "neighbours_advertised": len(holders)},
            )

        # Share points are holder id + 1 so that no holder gets x = 0.
        xs = [j + 1 for j in holders]
        mask_secret = int.from_bytes(self._mask_key.private_bytes_raw(), "big")
        seed_secret = int.from_bytes(self._seed, "big")
        t = self.config.threshold
        key_shares = shamir.split(mask_secret, t, xs, self._randbytes)
        seed_shares = shamir.split(seed_secret, t, xs, self._randbytes)

        shares = []
        for j in holders:
            peer = X25519PublicKey.from_public_bytes(self._adverts[j].share_public)
            cipher = share_cipher(
                self._share_key.exchange(peer), self.round, self.hospital_id, j
            )
            nonce, aad = share_header(self.round, self.hospital_id, j)
            plaintext = shamir.encode(key_shares[j + 1])
            plaintext += shamir.encode(seed_shares[j + 1])
            ciphertext = cipher.encrypt(nonce, plaintext, aad)
            shares.append(EncryptedShare(self.hospital_id, j, self.round, ciphertext))
        return shares

    def _accept_shares(self, received: Iterable[EncryptedShare]) -> None:
        """Decrypts and keeps the neighbours' shares addressed to this hospital."""
        for share in received:
            if share.recipient != self.hospital_id or share.round != self.round:
                raise InvalidShare(
                    f"share from {share.sender} addressed to {share.recipient} in "
                    f"round {share.round} reached hospital {self.hospital_id} in "
                    f"round {self.round}"
                )
            advert = self._adverts.get(share.sender)
            if advert is None:
                raise InvalidShare(
                    f"share from hospital {share.sender}, which is not a neighbour of "
                    f"{self.hospital_id} with a verified advert"
                )
            peer = X25519PublicKey.from_public_bytes(advert.share_public)
            secret = self._share_key.exchange(peer)
            cipher = share_cipher(secret, self.round, share.sender, self.hospital_id)
            nonce, aad = share_header(self.round, share.sender, self.hospital_id)
            try:
                plaintext = cipher.decrypt(nonce, share.ciphertext, aad)
            except InvalidTag:
                raise InvalidShare(
                    f"share from hospital {share.sender} to {self.hospital_id} failed "
                    "authentication: it was altered in transit"
                ) from None
            size = shamir.SHARE_BYTES
            self._held[share.sender] = (
                shamir.decode(plaintext[:size]),
                shamir.decode(plaintext[size:]),
            )

    def masked_input(
        self,
        values: np.ndarray,
        weight: int,
        received_shares: Sequence[EncryptedShare],
    ) -> MaskedInput:
        """Stage 3: returns the masked weighted update.

        values: the flat update (e.g. local minus global weights), float.
        weight: integer weight in [1, max_weight], typically num_samples.
        received_shares: the encrypted shares neighbours addressed to this
            hospital; this hospital masks with exactly their senders.

        Runs once per round: two masked inputs under the same masks would
        reveal the difference of their updates.
        """
        if isinstance(weight, (bool, np.bool_)) or int(weight) != weight or not (
            1 <= weight <= self.config.max_weight
        ):
            raise ValueError(
                f"weight must be an integer in [1, {self.config.max_weight}], got "
                f"{weight!r}; raise max_weight in MaskingConfig if this is genuine"
            )
        self._enter("masked_input", "share_keys")
        self._accept_shares(received_shares)

        levels, clipped = self.config.quantiser.quantise(values)
        if clipped:
            logger.warning(
                "hospital %d round %d: %d values clipped to ±%s before masking",
                self.hospital_id, self.round, clipped, self.config.clip_range,
            )
        plain = np.empty(levels.size + 1, dtype=np.int64)
        np.multiply(levels, int(weight), out=plain[:-1])
        plain[-1] = int(weight)

        # uint64 arithmetic wraps mod 2^64, and 2^k divides 2^64, so one
        # reduction at the end gives the residue mod 2^k.
        masked = plain.view(np.uint64)
        buffer = bytearray(8 * plain.size + 16)
        seed_key = self_mask_key(self._seed, self.round, self.hospital_id)
        masked += expand(seed_key, plain.size, buffer)
        for j in sorted(self._held):
            peer = X25519PublicKey.from_public_bytes(self._adverts[j].mask_public)
            secret = self._mask_key.exchange(peer)
            key = pairwise_mask_key(secret, self.round, self.hospital_id, j)
            if j > self.hospital_id:
                masked += expand(key, plain.size, buffer)
            else:
                masked -= expand(key, plain.size, buffer)
        masked &= np.uint64(self.config.modulus_mask)
        return MaskedInput(self.hospital_id, self.round, masked, clipped)

    def unmask_response(
        self, survivors: Iterable[int], dropped: Iterable[int]
    ) -> UnmaskResponse:
        """Stage 4: reveals, per neighbour whose shares this hospital holds, the
        seed share if it survived or the key share if it dropped.

        Refuses (``AggregationAborted``) a second request, a request listing a
        hospital as both survivor and dropped, one that lists this hospital as
        dropped, and one with fewer than ``min_survivors`` survivors.
        """
        survivors, dropped = frozenset(survivors), frozenset(dropped)
        if self._stage == "unmask_response":
            raise AggregationAborted(
                f"hospital {self.hospital_id} already answered the unmasking request "
                f"of round {self.round}; a second request could reveal both secrets"
            )
        both = survivors & dropped
        if both:
            raise AggregationAborted(
                f"hospitals {sorted(both)} listed as both survived and dropped; "
                "revealing both shares would expose their updates"
            )
        if self.hospital_id not in survivors:
            raise AggregationAborted(
                f"hospital {self.hospital_id} is alive but not listed as a survivor"
            )
        if len(survivors) < self.config.min_survivors:
            raise AggregationAborted(
                f"only {len(survivors)} survivors, fewer than min_survivors "
                f"{self.config.min_survivors}: the sum would expose too few updates"
            )
        self._enter("unmask_response", "masked_input")

        seed_shares, key_shares = {}, {}
        for owner, (key_share, seed_share) in self._held.items():
            if owner in survivors:
                seed_shares[owner] = seed_share
            elif owner in dropped:
                key_shares[owner] = key_share
        return UnmaskResponse(self.hospital_id, self.round, seed_shares, key_shares)

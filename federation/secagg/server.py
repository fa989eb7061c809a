"""The coordinator side of SecAgg+ masking: relay, sum, unmask.

The coordinator relays signed adverts and encrypted shares it cannot read,
adds masked inputs as they arrive, asks the survivors for shares, rebuilds
the self-mask seeds of hospitals whose inputs arrived and the mask keys of
hospitals that dropped after sharing keys, and removes those masks. Masks
between two survivors cancel in the sum and are never expanded, so the
unmasking cost is one keystream per survivor plus one per (dropped hospital,
surviving neighbour) pair.

Sums and mask removal run through ``ModularSum``: numpy on "cpu", torch on
"cuda" (chosen by "auto" when present) or "torch-cpu", with bit-identical
results on all three.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from federation.secagg import shamir
from federation.secagg.adverts import (
    Directory,
    load_directory,
    seed_commitment,
    verify_advert,
)
from federation.secagg.config import MaskingConfig
from federation.secagg.errors import AggregationAborted, InvalidAdvert
from federation.secagg.messages import (
    EncryptedShare,
    MaskedInput,
    SignedAdvert,
    UnmaskResponse,
)
from federation.secagg.modsum import ModularSum, resolve_device
from federation.secagg.neighbours import neighbourhoods
from federation.secagg.prg import expand, pairwise_mask_key, self_mask_key

logger = logging.getLogger(__name__)


class MaskingServer:
    """The coordinator in one masked round.

    config, round: as given to every hospital's ``MaskingClient``.
    directory: identity public keys of all hospitals, by id.
    device: "auto", "cpu", "torch-cpu" or "cuda" for the sum and unmasking
        arithmetic (see ``federation.secagg.modsum``).
    """

    def __init__(
        self,
        config: MaskingConfig,
        round: int,
        directory: Directory,
        device: str = "auto",
    ) -> None:
        self.config = config
        self.round = round
        self.directory = load_directory(directory)
        self.device = resolve_device(device)
        self.neighbours = neighbourhoods(
            config.n, config.degree, config.graph_seed, round
        )
        self.quantised_sum: np.ndarray | None = None

        self._adverts: dict[int, SignedAdvert] = {}
        self._rejected: dict[int, str] = {}
        self._shared: set[int] = set()
        self._routed: dict[int, set[int]] = {}
        self._inputs: set[int] = set()
        self._clipped: dict[int, int] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._sum: ModularSum | None = None
        self._buffer = bytearray()
        self._unmask_request: tuple[frozenset[int], frozenset[int]] | None = None
        self._bytes_in = 0
        self._bytes_out = 0
        self._sum_seconds = 0.0

    def receive_adverts(self, adverts: Iterable[SignedAdvert]) -> list[SignedAdvert]:
        """Stage 1: verifies adverts; returns the accepted ones, by hospital id.

        A forged or malformed advert is rejected (logged, listed in the report
        under ``rejected``); its hospital takes no further part in the round.
        Send each hospital ``relay_for(hospital)``, its neighbours' adverts only.
        """
        for advert in adverts:
            self._bytes_in += advert.nbytes()
            try:
                verify_advert(advert, self.directory, self.round)
                if advert.hospital in self._adverts:
                    raise InvalidAdvert(
                        f"second advert from hospital {advert.hospital}"
                    )
            except InvalidAdvert as error:
                self._rejected[advert.hospital] = str(error)
                self._adverts.pop(advert.hospital, None)
                logger.warning("round %d: rejected advert: %s", self.round, error)
                continue
            if advert.hospital not in self._rejected:
                self._adverts[advert.hospital] = advert
        return [a for _, a in sorted(self._adverts.items())]

    def relay_for(self, hospital: int) -> list[SignedAdvert]:
        """The accepted adverts of ``hospital``'s neighbours, to relay to it."""
        wanted = self.neighbours[hospital]
        relay = [a for h, a in sorted(self._adverts.items()) if h in wanted]
        self._bytes_out += sum(a.nbytes() for a in relay)
        return relay

    def route_shares(
        self, bundles: Iterable[Iterable[EncryptedShare]]
    ) -> dict[int, list[EncryptedShare]]:
        """Stage 2: takes each hospital's encrypted shares, returns them by recipient.

        A hospital counts as having shared keys once its bundle arrives; shares
        to non-neighbours or from hospitals without a verified advert are dropped.
        """
        routed: dict[int, list[EncryptedShare]] = {}
        for bundle in bundles:
            bundle = list(bundle)
            if not bundle:
                continue
            sender = bundle[0].sender
            if sender not in self._adverts or any(s.sender != sender for s in bundle):
                logger.warning("round %d: dropped shares from %d", self.round, sender)
                continue
            for share in bundle:
                self._bytes_in += share.nbytes()
                wanted = share.recipient in self.neighbours[sender]
                if wanted and share.round == self.round:
                    routed.setdefault(share.recipient, []).append(share)
                    self._routed.setdefault(sender, set()).add(share.recipient)
                    self._bytes_out += share.nbytes()
            self._shared.add(sender)
        return routed

    def receive_masked_input(self, masked: MaskedInput) -> None:
        """Stage 3: adds one masked input into the running sum mod 2^k."""
        h = masked.hospital
        if self._unmask_request is not None:
            raise ValueError(
                f"masked input of hospital {h} arrived after the unmasking request; "
                "it counts as dropped in this round and cannot join the sum"
            )
        if h not in self._shared or h in self._inputs or masked.round != self.round:
            raise ValueError(
                f"unexpected masked input from hospital {h} for round {masked.round}: "
                "it did not share keys in this round or already sent its input"
            )
        if self._sum is None:
            self._sum = ModularSum(
                masked.data.shape[0], self.config.modulus_bits, self.device
            )
        if masked.data.shape != (self._sum.length,) or masked.data.dtype != np.uint64:
            raise ValueError(
                f"masked input of hospital {h} has shape {masked.data.shape} and dtype "
                f"{masked.data.dtype}, expected ({self._sum.length},) uint64; all "
                "hospitals must send one length"
            )
        self._bytes_in += masked.nbytes()

        # An input is not trusted to be reduced: ModularSum reduces it first.
        start = time.perf_counter()
        self._sum.add(masked.data)
        self._sum_seconds += time.perf_counter() - start
        self._inputs.add(h)
        self._clipped[h] = int(masked.clipped)
        if masked.clipped:
            logger.warning(
                "round %d: hospital %d clipped %d values into range",
                self.round, h, masked.clipped,
            )

    def unmask_request(self) -> tuple[frozenset[int], frozenset[int]]:
        """Stage 4a: returns (survivors, dropped) to send to every survivor.

        survivors: hospitals whose masked input arrived.
        dropped: hospitals that shared keys but sent no masked input.
        Raises ``AggregationAborted`` if fewer than ``min_survivors`` inputs
        arrived.
        """
        survivors = frozenset(self._inputs)
        dropped = frozenset(self._shared - self._inputs)
        if len(survivors) < self.config.min_survivors:
            raise AggregationAborted(
                f"round {self.round}: only {len(survivors)} masked inputs arrived, "
                f"fewer than min_survivors {self.config.min_survivors}",
                {"survivors": sorted(survivors), "dropped": sorted(dropped)},
            )
        self._unmask_request = (survivors, dropped)
        self._bytes_out += len(survivors) * 4 * (len(survivors) + len(dropped))
        return survivors, dropped

    def receive_unmask(self, response: UnmaskResponse) -> None:
        """Stage 4b: stores one survivor's revealed shares."""
        asked = self._unmask_request is not None and (
            response.hospital in self._unmask_request[0]
        )
        if not asked:
            raise ValueError(
                f"unmask response from hospital {response.hospital}, which was not "
                "asked: call unmask_request first and accept survivors only"
            )
        self._bytes_in += response.nbytes()
        self._responses[response.hospital] = response

    def _rebuild(self, kind: str, owners: Iterable[int]) -> dict[int, int]:
        """Rebuilds one secret per owner from ``threshold`` revealed shares."""
        t = self.config.threshold
        collected: dict[int, dict[int, int]] = {owner: {} for owner in owners}
        for responder, response in self._responses.items():
            shares = response.seed_shares if kind == "seed" else response.key_shares
            for owner, value in shares.items():
                if owner in collected:
                    collected[owner][responder + 1] = value

        short = {o: len(s) for o, s in collected.items() if len(s) < t}
        if short:
            raise AggregationAborted(
                f"round {self.round}: cannot rebuild the {kind} of hospitals "
                f"{sorted(short)}: shares available {short}, threshold {t}; more "
                "hospitals dropped than the threshold tolerates, no sum is returned",
                {"kind": kind, "shares_available": short, "threshold": t},
            )
        return {
            owner: shamir.reconstruct(dict(sorted(shares.items())[:t]))
            for owner, shares in collected.items()
        }

    def _remove(self, total: ModularSum, key: bytes, sign: int) -> None:
        """Adds (sign +1) or subtracts (sign -1) the mask expanded from ``key``."""
        if len(self._buffer) < 8 * total.length + 16:
            self._buffer = bytearray(8 * total.length + 16)
        mask = expand(key, total.length, self._buffer)
        np.bitwise_and(mask, np.uint64(self.config.modulus_mask), out=mask)
        total.add(mask, sign, reduced=True)

    def aggregate(self) -> tuple[np.ndarray, int, dict]:
        """Stage 5: removes the masks; returns (sum of weight * values as
        float32, total weight, report).

        The report holds ``survivors``, ``dropped`` (shared keys, no input),
        ``silent`` (input arrived, no unmask answer), ``rejected`` adverts,
        ``clipped`` per hospital and ``clipped_total``, ``bytes_in`` and
        ``bytes_out`` at the coordinator, ``sum_seconds`` (adding masked inputs
        as they arrived), ``unmask_seconds`` (this call) and ``device``.
        Raises ``AggregationAborted`` when a needed secret cannot be rebuilt.
        """
        if self._unmask_request is None or self._sum is None:
            raise AggregationAborted(
                f"round {self.round}: no masked inputs to aggregate"
            )
        start = time.perf_counter()
        survivors, dropped = self._unmask_request
        total = self._sum

        seeds = self._rebuild("seed", survivors)
        keys = self._rebuild("key", dropped)

        for h, value in seeds.items():
            seed = value.to_bytes(32, "big") if value < 2**256 else b""
            if seed_commitment(seed, self.round, h) != self._adverts[h].seed_commitment:
                raise AggregationAborted(
                    f"round {self.round}: rebuilt self-mask seed of hospital {h} does "
                    "not match its commitment; a revealed share is corrupt",
                    {"hospital": h},
                )
            self._remove(total, self_mask_key(seed, self.round, h), -1)

        for j, value in keys.items():
            private = self._private_key(j, value)
            # Exactly the survivors that received j's shares masked with j.
            for i in sorted(self._routed.get(j, set()) & survivors):
                peer = X25519PublicKey.from_public_bytes(self._adverts[i].mask_public)
                key = pairwise_mask_key(private.exchange(peer), self.round, i, j)

                # Survivor i added the pair's mask when j > i, subtracted it otherwise.
                self._remove(total, key, -1 if j > i else 1)

        # Residues at or above 2^(k-1) stand for negative sums.
        levels = total.signed()
        self._sum = None
        self.quantised_sum = levels[:-1].copy()
        total_weight = int(levels[-1])
        values = self.config.quantiser.dequantise(levels[:-1]).astype(np.float32)
        seconds = time.perf_counter() - start

        silent = survivors - set(self._responses)
        report = {
            "round": self.round,
            "survivors": sorted(survivors),
            "dropped": sorted(dropped),
            "silent": sorted(silent),
            "rejected": dict(self._rejected),
            "clipped": dict(self._clipped),
            "clipped_total": sum(self._clipped.values()),
            "bytes_in": self._bytes_in,
            "bytes_out": self._bytes_out,
            "sum_seconds": self._sum_seconds,
            "unmask_seconds": seconds,
            "device": self.device,
        }
        logger.info(
            "round %d: masked sum of %d hospitals (%d dropped, %d clipped values) "
            "unmasked in %.3f s on %s",
            self.round, len(survivors), len(dropped), report["clipped_total"],
            seconds, self.device,
        )
        return values, total_weight, report

    def _private_key(self, hospital: int, value: int) -> X25519PrivateKey:
        """Turns a rebuilt integer into hospital's mask key; checks it against
        the advertised public key."""
        try:
            private = X25519PrivateKey.from_private_bytes(value.to_bytes(32, "big"))
        except (OverflowError, ValueError):
            private = None
        public = (
            None
            if private is None
            else private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        if public != self._adverts[hospital].mask_public:
            raise AggregationAborted(
                f"round {self.round}: rebuilt mask key of hospital {hospital} does not "
                "match its advertised public key; a revealed share is corrupt",
                {"hospital": hospital},
            )
        return private

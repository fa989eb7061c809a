"""A hospital's secure-aggregation agent: the actor that holds its secrets.

A hospital is a group of Ray actors. Its trainer holds the patients and
trains; its ``HospitalAgent`` holds what must never reach the coordinator:
the long-term Ed25519 identity key, the per-round ``MaskingClient`` (X25519
secrets, self-mask seed, neighbours' shares; built inside this actor because
it does not pickle) and, for CKKS, a public-context encryptor or, on the one
designated key-holder hospital, the ``CKKSKeyHolder`` with the secret key.

The raw update reaches the agent by one of two paths:

- ``train``: the agent calls its trainer's ``fit`` itself and keeps the
  returned update, handing the coordinator only the sample count and the
  metrics. This is the path that keeps the update out of the coordinator's
  process: Ray returns a task result smaller than its inline threshold
  (``max_direct_call_object_size``, 100 KiB by default) straight into the
  memory of the process that submitted the task, so a coordinator that
  calls ``trainer.fit.remote`` holds every small update in its own memory
  even if it never calls ``ray.get``.
- an ``ObjectRef`` (or an array) passed as a top-level argument of
  ``masked_input`` / ``ckks_encrypt``: Ray resolves it inside the agent.
  Safe only for references the coordinator does not own (see above).

Stages mirror ``MaskingClient``: ``begin_round``, ``advertise``,
``share_keys``, ``masked_input``, ``unmask_response``; CKKS:
``ckks_public_context`` and ``ckks_decrypt_sum`` (key holder only) and
``ckks_encrypt``. ``actors.secure_round`` drives them from the coordinator.

Distributed DP (``NoiseConfig``): the agent adds its noise share before the
update leaves, either a discrete Gaussian on the integer ring or a Gaussian
on the float values before quantisation (see ``NoiseConfig``).

Test-only fault injection: ``AgentFault`` (constructor or ``inject_fault``)
makes the agent raise, exit its process or stall at a chosen stage. It
exists to test dropout handling and is never set by a real run.

Known shortcoming: the agent is not restarted (``max_restarts=0``): a
replacement has lost the round state, the identity key (unless one was
passed in) and, on the key holder, the CKKS secret key, so hospitals must
re-encrypt under the new public context.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import ray
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from federation.secagg.ckks import (
    CKKSClient,
    CKKSKeyHolder,
    CKKSParams,
    EncryptedVector,
)
from federation.secagg.client import MaskingClient
from federation.secagg.config import MaskingConfig
from federation.secagg.messages import (
    EncryptedShare,
    MaskedInput,
    SignedAdvert,
    UnmaskResponse,
)

log = logging.getLogger(__name__)

# Masking a 100k-weight update takes a few tens of milliseconds of one core;
# a small share lets ten agents sit beside ten trainers on 2 CPUs.
AGENT_CPUS = 0.05

STAGES = (
    "begin_round", "advertise", "share_keys", "masked_input", "unmask_response",
    "train", "ckks_public_context", "ckks_encrypt", "ckks_decrypt_sum",
)
FAULT_MODES = ("raise", "exit", "hang")
NOISE_KINDS = ("discrete", "gaussian")


@dataclass(frozen=True)
class NoiseConfig:
    """Distributed-DP noise share each agent adds before its update leaves.

    kind: ``"discrete"``: a discrete Gaussian on the integer ring of the
        masked sum, in quantisation steps (Kairouz et al. 2021), added to
        the masked residues; since masking is addition mod 2^k this is the
        same message as adding it before masking. Masking only.
        ``"gaussian"``: a float Gaussian added to weight * update before
        quantisation (or before CKKS encryption), as ``update + noise /
        weight``; open to floating-point attacks (Mironov 2012).
    sigma_total: standard deviation of the total noise in the summed weighted
        update (units of the update times the weight) when all
        ``n_expected`` hospitals complete; each adds
        ``sigma_total / sqrt(n_expected)``. Hospitals that drop take their
        share with them (``federation.distributed_dp.effective_noise``).
    n_expected: hospitals expected to complete the round.
    clip_norm: L2 bound applied to the update (before weighting) ahead of
        the noise; None clips nothing, and then no epsilon can be claimed.
    seed: test-only: seeds a numpy Generator per (seed, hospital, round),
        which is reproducible and NOT secret. None draws from the operating
        system's CSPRNG, which is what privacy needs.

    With ``"gaussian"`` and ``MaskingConfig(clip_mode="error")`` a noisy
    value outside ``clip_range`` aborts that hospital's input: declare a
    range that covers the noise or use ``clip_mode="clip"``.
    """

    kind: str
    sigma_total: float
    n_expected: int
    clip_norm: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(
                f"noise kind must be one of {NOISE_KINDS}, got {self.kind!r}"
            )
        if not (math.isfinite(self.sigma_total) and self.sigma_total > 0):
            raise ValueError(
                f"sigma_total must be finite and positive, got {self.sigma_total}"
            )
        if self.n_expected < 1:
            raise ValueError(f"n_expected must be at least 1, got {self.n_expected}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm}")

    @property
    def sigma_share(self) -> float:
        """One hospital's noise standard deviation (weighted-update units)."""
        return self.sigma_total / math.sqrt(self.n_expected)


def noise_from_config(config) -> NoiseConfig | None:
    """The noise share of a ``cluster.config.RunConfig``'s ``secure_agg``.

    ``n_expected`` is the hospitals sampled per round; None without noise.
    """
    sa = config.secure_agg
    if sa.noise == "none":
        return None
    return NoiseConfig(
        kind=sa.noise, sigma_total=float(sa.noise_sigma),
        n_expected=config.sampled_per_round(), clip_norm=sa.noise_clip_norm,
    )


@dataclass(frozen=True)
class AgentFault:
    """Test-only: a failure the agent injects when a stage begins.

    stage: one of ``STAGES``.
    mode: ``"raise"`` (the call raises RuntimeError), ``"exit"`` (the actor
        process exits, like a crashed host) or ``"hang"`` (the call stalls
        ``seconds`` before running normally).
    rounds: the rounds it applies to; None means every round.
    """

    stage: str
    mode: str = "raise"
    seconds: float = 30.0
    rounds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"fault stage must be one of {STAGES}, got {self.stage!r}")
        if self.mode not in FAULT_MODES:
            raise ValueError(
                f"fault mode must be one of {FAULT_MODES}, got {self.mode!r}"
            )


def _configure_logging() -> None:
    """Gives the actor process INFO logs on stderr, forwarded to the driver."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )


@ray.remote(num_cpus=AGENT_CPUS, max_restarts=0, max_task_retries=0)
class HospitalAgent:
    """One hospital's secret-holding actor.

    hospital_id: the hospital's id in masked rounds (0..n-1, fixed for a run).
    name: the hospital's name, for logs.
    trainer: handle of the hospital's trainer actor (for ``train``), or None.
    identity_key: 32 raw Ed25519 private-key bytes, or None to make a fresh
        key inside the actor (it then never leaves the actor).
    ckks_key_holder: True on the one hospital that makes the CKKS keys and
        decrypts sums; ``ckks_min_contributors`` is the fewest hospitals a
        sum must hold for it to decrypt.
    noise: distributed-DP noise share, or None for none.
    fault: test-only failure injection.
    """

    def __init__(
        self,
        hospital_id: int,
        name: str,
        trainer=None,
        identity_key: bytes | None = None,
        ckks_key_holder: bool = False,
        ckks_params: CKKSParams | None = None,
        ckks_min_contributors: int = 2,
        noise: NoiseConfig | None = None,
        fault: AgentFault | None = None,
    ) -> None:
        _configure_logging()
        self.hospital_id = int(hospital_id)
        self.name = name
        self._trainer = trainer
        if identity_key is None:
            self._identity = Ed25519PrivateKey.generate()
        else:
            self._identity = Ed25519PrivateKey.from_private_bytes(bytes(identity_key))
        self._identity_public = self._identity.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )
        self._ckks_params = CKKSParams() if ckks_params is None else ckks_params
        self._ckks_key_holder = bool(ckks_key_holder)
        self._ckks_min_contributors = ckks_min_contributors
        self._holder: CKKSKeyHolder | None = None
        self._ckks_clients: dict[bytes, CKKSClient] = {}
        self._noise = noise
        if noise is not None:
            # Imported here, not inside a timed stage: opacus takes seconds.
            import federation.distributed_dp  # noqa: F401
        self._fault = fault
        self._client: MaskingClient | None = None
        self._round: int | None = None
        # Updates from ``train``, by round; dropped once used or superseded.
        self._held: dict[int, tuple[np.ndarray, int]] = {}

    # --- identity and test hooks ---------------------------------------------

    def ping(self) -> dict:
        """Liveness: ``{"hospital", "hospital_id", "pid"}``."""
        return {"hospital": self.name, "hospital_id": self.hospital_id,
                "pid": os.getpid()}

    def identity_public(self) -> bytes:
        """The 32 raw bytes of the identity public key, for the directory."""
        return self._identity_public

    def attach_trainer(self, trainer) -> None:
        """Sets the trainer actor whose ``fit`` ``train`` calls."""
        self._trainer = trainer

    def inject_fault(self, fault: AgentFault | None) -> None:
        """Test-only: sets (or clears, with None) the injected failure."""
        self._fault = fault

    def _inject(self, stage: str, round: int | None) -> None:
        fault = self._fault
        if fault is None or fault.stage != stage:
            return
        if fault.rounds is not None and round not in fault.rounds:
            return
        log.warning("%s: injected %s at %s, round %s", self.name, fault.mode,
                    stage, round)
        if fault.mode == "raise":
            raise RuntimeError(
                f"{self.name}: injected failure at {stage} in round {round}"
            )
        if fault.mode == "exit":
            os._exit(1)
        time.sleep(fault.seconds)

    # --- the update ----------------------------------------------------------

    def train(
        self,
        round: int,
        global_weights,
        epochs: int | None = None,
        config: dict | None = None,
        dim: int | None = None,
    ) -> dict:
        """Calls the trainer's ``fit`` and keeps the update inside this actor.

        global_weights: an array, or a one-element list holding an
            ``ObjectRef`` (a list keeps Ray from resolving it here; the
            trainer resolves it instead, so the weights are fetched once).
        dim: the global model's length; when given, the update is screened
            here (``federation.aggregation.check_update``: shape, finite
            values, sample count, round), since under secure aggregation no
            one else can.
        Returns ``{"hospital", "round", "num_samples", "metrics"}``, never the
        delta; ``masked_input`` / ``ckks_encrypt`` with ``source=None`` use
        the kept update of their round. When the trainer declines the round
        the answer is ``{"hospital", "round", "declined": reason,
        "privacy"}``; when screening fails, ``{"hospital", "round",
        "rejected": reason, "metrics"}``, and nothing is kept.
        """
        self._inject("train", round)
        if self._trainer is None:
            raise RuntimeError(
                f"{self.name}: train called on an agent built without a trainer; "
                "pass trainer=<handle> to HospitalAgent"
            )
        if isinstance(global_weights, (list, tuple)) and len(global_weights) == 1:
            global_weights = global_weights[0]

        update = ray.get(
            self._trainer.fit.remote(round, global_weights, epochs, config)
        )
        self._held = {}
        if not hasattr(update, "delta"):
            # The trainer declined the round (e.g. its privacy budget is spent).
            return {"hospital": self.name, "round": round,
                    "declined": getattr(update, "reason", str(update)),
                    "privacy": getattr(update, "privacy", None)}
        if dim is not None:
            from federation.updates import check_update

            # The coordinator never sees this update, so it is screened here.
            reason = check_update(update, dim, expected_round=round)
            if reason is not None:
                log.warning("%s: round %d update fails screening, not sent: %s",
                            self.name, round, reason)
                return {"hospital": self.name, "round": round,
                        "rejected": reason, "metrics": dict(update.metrics)}
        delta = np.asarray(update.delta, dtype=np.float32)
        self._held = {round: (delta, int(update.num_samples))}
        log.info("%s: round %d update of %d samples kept for masking", self.name,
                 round, update.num_samples)
        return {"hospital": self.name, "round": round,
                "num_samples": int(update.num_samples),
                "metrics": dict(update.metrics)}

    def _resolve(self, source, weight, round: int) -> tuple[np.ndarray, int]:
        """Returns (flat float update, weight) from an array, an object with
        ``delta``/``num_samples`` (e.g. ``federation.aggregation.Update``),
        or None (the update kept by ``train`` for this round)."""
        if source is None:
            if round not in self._held:
                raise RuntimeError(
                    f"{self.name}: no update kept for round {round}; call train "
                    "first or pass the update"
                )
            values, samples = self._held.pop(round)
        elif hasattr(source, "delta"):
            values, samples = source.delta, getattr(source, "num_samples", None)
        else:
            values, samples = source, None
        if weight is None:
            weight = samples
        if weight is None:
            raise ValueError(
                f"{self.name}: no weight given and the update carries no "
                "num_samples; pass weight"
            )
        values = np.asarray(values, dtype=np.float32).ravel()
        return values, int(weight)

    def _rng(self, round: int) -> np.random.Generator | None:
        seed = self._noise.seed if self._noise is not None else None
        if seed is None:
            return None
        return np.random.default_rng([seed, self.hospital_id, round])

    def _float_noise(
        self, values: np.ndarray, weight: int, round: int
    ) -> np.ndarray:
        """Clips (if configured) and, for Gaussian noise, adds the share so
        that weight * result = weight * update + noise."""
        noise = self._noise
        if noise is None:
            return values

        from federation.distributed_dp import clip_l2, sample_gaussian

        if noise.clip_norm is not None:
            values, factor = clip_l2(values, noise.clip_norm)
            if factor < 1.0:
                log.info("%s: round %d update clipped to L2 %.4g (factor %.4g)",
                         self.name, round, noise.clip_norm, factor)
        if noise.kind != "gaussian":
            return values
        share = sample_gaussian(noise.sigma_share, values.size, self._rng(round))
        return (values.astype(np.float64) + share / weight).astype(np.float32)

    # --- masking stages --------------------------------------------------------

    def begin_round(
        self, round: int, config: MaskingConfig, directory: dict[int, bytes]
    ) -> None:
        """Makes this round's ``MaskingClient`` (fresh keys, seed and graph).

        directory: identity public keys of all hospitals by id, as raw bytes.
        """
        self._inject("begin_round", round)
        if self._noise is not None and self._noise.kind == "discrete":
            self._check_noise_headroom(config)
        self._client = MaskingClient(
            self.hospital_id, self._identity, config, round, directory=directory
        )
        self._round = round

    def _check_noise_headroom(self, config: MaskingConfig) -> None:
        """Refuses a ring too small for the sum plus ten standard deviations
        of the total discrete noise, so noise cannot wrap a sum around."""
        steps = self._noise.sigma_total * 2.0**config.frac_bits
        bound = config.n * config.quantiser.max_level * config.max_weight
        limit = 2 ** (config.modulus_bits - 1) - 1
        if bound + 10 * steps > limit:
            raise ValueError(
                f"{self.name}: ring 2^{config.modulus_bits} has no room for noise "
                f"of sigma {self._noise.sigma_total} ({steps:.3g} steps) on top of "
                f"sums up to ±{bound}; raise modulus_bits or lower max_weight"
            )

    def _stage_client(self, round: int) -> MaskingClient:
        if self._client is None or self._round != round:
            raise RuntimeError(
                f"{self.name}: no masking client for round {round} (current: "
                f"{self._round}); call begin_round first"
            )
        return self._client

    def advertise(self, round: int) -> SignedAdvert:
        """Stage 1: this round's public keys, signed with the identity key."""
        self._inject("advertise", round)
        return self._stage_client(round).advertise()

    def share_keys(
        self, round: int, adverts: list[SignedAdvert]
    ) -> list[EncryptedShare]:
        """Stage 2: checks neighbours' adverts, returns encrypted shares."""
        self._inject("share_keys", round)
        return self._stage_client(round).share_keys(adverts)

    def masked_input(
        self,
        round: int,
        source,
        weight: int | None,
        shares: list[EncryptedShare],
    ) -> MaskedInput:
        """Stage 3: masks weight * update (plus this hospital's noise share).

        source: the update as an array, an ``Update``-like object, a
            top-level ``ObjectRef`` to either (Ray resolves it here), or None
            for the update ``train`` kept. weight: integer weight, None to use
            the update's ``num_samples``.
        """
        self._inject("masked_input", round)
        client = self._stage_client(round)
        values, weight = self._resolve(source, weight, round)
        values = self._float_noise(values, weight, round)
        masked = client.masked_input(values, weight, shares)
        del values

        if self._noise is not None and self._noise.kind == "discrete":
            masked = self._add_discrete_noise(masked, client.config, round)
        return masked

    def _add_discrete_noise(
        self, masked: MaskedInput, config: MaskingConfig, round: int
    ) -> MaskedInput:
        from federation.distributed_dp import sample_discrete_gaussian

        sigma = self._noise.sigma_share * 2.0**config.frac_bits
        if sigma < 1.0:
            log.warning("%s: discrete noise share of %.3g steps is below one step; "
                        "its privacy accounting is loose", self.name, sigma)
        noise = np.zeros(masked.data.size, dtype=np.int64)
        # The last coordinate is the weight, which stays exact.
        noise[:-1] = sample_discrete_gaussian(sigma, masked.data.size - 1,
                                              self._rng(round))
        data = masked.data + noise.view(np.uint64)
        data &= np.uint64(config.modulus_mask)
        return dataclasses.replace(masked, data=data)

    def unmask_response(
        self, round: int, survivors: list[int], dropped: list[int]
    ) -> UnmaskResponse:
        """Stage 4: reveals seed shares of survivors, key shares of dropped."""
        self._inject("unmask_response", round)
        response = self._stage_client(round).unmask_response(survivors, dropped)
        # The round is over for this hospital: its secrets are no longer needed.
        self._client = None
        return response

    # --- CKKS ----------------------------------------------------------------

    def _key_holder(self) -> CKKSKeyHolder:
        if not self._ckks_key_holder:
            raise PermissionError(
                f"{self.name} is not the CKKS key holder; ask the hospital built "
                "with ckks_key_holder=True"
            )
        if self._holder is None:
            self._holder = CKKSKeyHolder(self._ckks_params,
                                         self._ckks_min_contributors)
            log.info("%s: CKKS keys made (key holder)", self.name)
        return self._holder

    def ckks_public_context(self) -> bytes:
        """Key holder only: the serialized context without the secret key."""
        self._inject("ckks_public_context", None)
        return self._key_holder().public_context()

    def ckks_encrypt(
        self, source, weight: int | None, round: int, public_context: bytes
    ) -> EncryptedVector:
        """Encrypts weight * update (and the weight) under the public context.

        source, weight: as for ``masked_input``. Gaussian noise, if
        configured, is added first; discrete noise is refused (CKKS sums
        are real-valued, not on an integer ring).
        """
        self._inject("ckks_encrypt", round)
        if self._noise is not None and self._noise.kind == "discrete":
            raise ValueError(
                f"{self.name}: discrete noise shares apply to masking only; use "
                "NoiseConfig(kind='gaussian') with CKKS"
            )
        values, weight = self._resolve(source, weight, round)
        values = self._float_noise(values, weight, round)

        # A cache keyed by the context bytes: decoding one costs tens of ms.
        client = self._ckks_clients.get(public_context)
        if client is None:
            client = CKKSClient(public_context, self._ckks_params)
            self._ckks_clients = {public_context: client}
        return client.encrypt(values, weight, round)

    def ckks_decrypt_sum(self, total: EncryptedVector) -> tuple[np.ndarray, float]:
        """Key holder only: decrypts the round's sum, once per round (the
        ``CKKSKeyHolder`` refuses a second sum and too few contributors)."""
        self._inject("ckks_decrypt_sum", total.round)
        result = self._key_holder().decrypt_sum(total)
        log.info("%s: decrypted the CKKS sum of round %d (%d contributors)",
                 self.name, total.round, total.contributors)
        return result

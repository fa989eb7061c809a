"""Distributed differential privacy for secure aggregation: noise shares.

With secure aggregation the coordinator sees only the sum of the hospitals'
updates, so no one party needs to add all the noise. Each of the ``n_expected``
hospitals adds its *share* before masking: independent Gaussian shares of
standard deviation ``sigma_total / sqrt(n_expected)`` sum to a Gaussian of
standard deviation ``sigma_total``. The same holds, up to a tiny divergence,
for discrete Gaussian shares on the integers, which is what a fixed-point
quantised update needs (Kairouz, Liu, Steinke 2021, "The Distributed Discrete
Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML). The
discrete Gaussian sampler is the exact one of Canonne, Kamath, Steinke 2020,
"The Discrete Gaussian for Differential Privacy" (NeurIPS): rational arithmetic
and uniform integers only, no floating point in the sampling decisions.

Randomness. Every sampler takes ``rng``: a ``numpy.random.Generator`` (seeded,
reproducible, NOT cryptographic: for tests and simulations), or None, which
draws from the operating system's CSPRNG through ``secrets``. Real privacy needs
None: an adversary who can predict the generator can subtract the noise.

Accounting (``epsilon_for_rounds``). Stated assumptions, which the report
repeats:

- The privacy unit is one hospital's whole update per round, and each
  hospital clips what it contributes to the sum to L2 norm ``clip_norm``
  before adding noise (``clip_l2``), so the sum's L2 sensitivity is
  ``clip_norm``. If the summed value is ``num_samples * delta`` the bound must
  cover the weight too: ``clip_norm = max_weight * delta_bound``.
- Only hospitals that completed the round (their masked input was unmasked
  into the sum) contribute noise; those that dropped took their share with
  them, so the sum carries ``sigma_share * sqrt(completed)``.
- The sum of discrete Gaussian shares is accounted as a continuous Gaussian
  of the same variance with Opacus's RDP accountant. Kairouz et al. bound the
  difference (``discrete_sum_tau``); it is negligible for shares of standard
  deviation at least 1 quantisation step, and it is NOT added to epsilon here.
  Quantisation error and modular wrap-around (values leaving the ring) are not
  accounted for either: choose the scale and the ring so they do not occur.
- Every hospital is honest about adding its share; a colluding group that
  knows its own shares reduces the noise the others see to the remainder.
- Without client subsampling (``sample_rate = 1``) there is no amplification:
  each round is one full Gaussian mechanism.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

log = logging.getLogger(__name__)

_SYSTEM = secrets.SystemRandom()


# --- sources of uniform integers ----------------------------------------------


def _randbelow(n: int, rng: np.random.Generator | None) -> int:
    """Uniform integer in [0, n): from ``secrets`` when rng is None."""
    if rng is None:
        return secrets.randbelow(n)
    if n <= (1 << 62):
        return int(rng.integers(0, n))

    # Beyond int64: draw enough random bits and reject, which stays exact.
    bits = n.bit_length()
    while True:
        words = rng.integers(0, 1 << 32, size=(bits + 31) // 32, dtype=np.uint64)
        value = 0
        for w in words:
            value = (value << 32) | int(w)
        value >>= 32 * len(words) - bits
        if value < n:
            return value


def _bernoulli(p: Fraction, rng: np.random.Generator | None) -> bool:
    """True with probability ``p`` (a rational in [0, 1]), exactly."""
    return _randbelow(p.denominator, rng) < p.numerator


def _bernoulli_exp(gamma: Fraction, rng: np.random.Generator | None) -> bool:
    """True with probability ``exp(-gamma)`` for rational ``gamma >= 0``.

    Canonne et al. 2020, Algorithm 1: for gamma <= 1 a run of Bernoulli(gamma/k)
    trials whose length is odd with probability exp(-gamma); larger gamma
    splits into whole units.
    """
    while gamma > 1:
        if not _bernoulli_exp(Fraction(1), rng):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gamma / k, rng):
        k += 1
    return k % 2 == 1


def _geometric_exp(s: int, t: int, rng: np.random.Generator | None) -> int:
    """Geometric variate with success probability ``1 - exp(-s/t)``."""
    while True:
        u = _randbelow(t, rng)
        if _bernoulli_exp(Fraction(u, t), rng):
            break
    v = 0
    while _bernoulli_exp(Fraction(1), rng):
        v += 1
    return (u + t * v) // s


def _discrete_laplace(t: int, rng: np.random.Generator | None) -> int:
    """Discrete Laplace variate, P(x) proportional to ``exp(-|x| / t)``."""
    while True:
        negative = _bernoulli(Fraction(1, 2), rng)
        magnitude = _geometric_exp(1, t, rng)
        if negative and magnitude == 0:
            continue
        return -magnitude if negative else magnitude


def _discrete_gaussian_one(sigma2: Fraction, rng: np.random.Generator | None) -> int:
    """One discrete Gaussian variate, P(x) proportional to exp(-x^2 / 2 sigma2).

    Canonne et al. 2020, Algorithm 3: rejection sampling from a discrete
    Laplace of scale ``t = floor(sigma) + 1``.
    """
    t = math.isqrt(sigma2.numerator // sigma2.denominator) + 1
    while True:
        y = _discrete_laplace(t, rng)
        gamma = (abs(y) - sigma2 / t) ** 2 / (2 * sigma2)
        if _bernoulli_exp(gamma, rng):
            return y


def sample_discrete_gaussian(
    sigma: float, size: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Returns ``size`` discrete Gaussian integers (int64) of scale ``sigma``.

    ``sigma`` is in units of the integer lattice (quantisation steps). The
    distribution is P(x) proportional to exp(-x^2 / (2 sigma^2)) over all
    integers; its variance is at most sigma^2, within 3e-7 of it for
    sigma >= 1 (0.035 below it at sigma = 0.5). ``sigma`` is turned into a
    rational with denominator at most 2^20 (a relative change below 1e-6).
    ``rng``: a seeded numpy Generator (reproducible, not cryptographic) or
    None for the ``secrets`` CSPRNG. Pure Python: about 40-60 microseconds per
    value, so a 10,000-weight update takes about half a second.
    """
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    sigma_q = Fraction(sigma).limit_denominator(1 << 20)
    sigma2 = sigma_q * sigma_q
    return np.fromiter(
        (_discrete_gaussian_one(sigma2, rng) for _ in range(size)),
        dtype=np.int64,
        count=size,
    )


def sample_gaussian(
    sigma: float, size: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Returns ``size`` float64 Gaussian values of standard deviation ``sigma``.

    With ``rng`` None the uniforms come from ``secrets`` (53-bit uniforms,
    Box-Muller); floating-point Gaussian noise remains open to the attacks of
    Mironov 2012, so prefer the discrete shares for deployment.
    """
    if not sigma >= 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if rng is not None:
        return rng.normal(0.0, sigma, size=size)

    # Box-Muller on CSPRNG uniforms; 1 - u keeps the logarithm finite.
    pairs = (size + 1) // 2
    raw = np.frombuffer(secrets.token_bytes(16 * pairs), dtype=np.uint64)
    uniforms = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u1, u2 = 1.0 - uniforms[:pairs], uniforms[pairs:]
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2 * np.pi * u2
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
    return sigma * z[:size]


# --- shares -------------------------------------------------------------------


def share_sigma(sigma_total: float, n_expected: int) -> float:
    """Standard deviation of one hospital's share so n shares sum to sigma_total."""
    if not sigma_total > 0:
        raise ValueError(f"sigma_total must be positive, got {sigma_total}")
    if n_expected < 1:
        raise ValueError(f"n_expected must be at least 1, got {n_expected}")
    return sigma_total / math.sqrt(n_expected)


def effective_noise(sigma_share: float, completed: int) -> float:
    """Standard deviation of the noise in a sum over ``completed`` hospitals."""
    if not sigma_share >= 0:
        raise ValueError(f"sigma_share must be >= 0, got {sigma_share}")
    if completed < 0:
        raise ValueError(f"completed must be >= 0, got {completed}")
    return sigma_share * math.sqrt(completed)


def clip_l2(vector: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """Scales ``vector`` down to L2 norm at most ``bound``.

    Returns the clipped float32 copy and the factor applied (1.0 when it was
    within the bound). The accounting below is only valid for clipped inputs.
    """
    if not bound > 0:
        raise ValueError(f"clipping bound must be positive, got {bound}")
    vector = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    factor = 1.0 if norm <= bound else bound / norm
    return (vector * factor).astype(np.float32), factor


def gaussian_share(
    vector: np.ndarray,
    sigma_share: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Returns ``vector`` plus this hospital's Gaussian share, float32.

    ``sigma_share`` from ``share_sigma``; ``rng`` None draws from ``secrets``.
    """
    vector = np.asarray(vector, dtype=np.float64)
    noise = sample_gaussian(sigma_share, vector.size, rng).reshape(vector.shape)
    return (vector + noise).astype(np.float32)


def discrete_gaussian_share(
    quantised: np.ndarray,
    sigma_share: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Returns the int64 quantised vector plus a discrete Gaussian share.

    ``quantised``: the fixed-point update as integers (value * scale, rounded);
    ``sigma_share`` is in the same integer units, i.e. the real-valued share
    times the scale. Reduce modulo the ring after adding the share, before
    masking. ``rng`` None draws from ``secrets``.
    """
    quantised = np.asarray(quantised)
    if not np.issubdtype(quantised.dtype, np.integer):
        raise ValueError(
            f"quantised update must hold integers, got dtype {quantised.dtype}; "
            "scale and round it first"
        )
    noise = sample_discrete_gaussian(sigma_share, quantised.size, rng)
    return quantised.astype(np.int64) + noise.reshape(quantised.shape)


def discrete_sum_tau(sigma_share: float, n: int) -> float:
    """Kairouz et al. 2021's bound tau on how far a sum of ``n`` discrete
    Gaussian shares (scale ``sigma_share``, integer units) is from a discrete
    Gaussian of variance ``n * sigma_share^2``:
    ``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma_share^2 k / (k + 1))``."""
    s2 = sigma_share * sigma_share
    return 10.0 * sum(
        math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, n)
    )


# --- accounting ---------------------------------------------------------------


def epsilon_for_rounds(
    completed_per_round: Sequence[int],
    *,
    sigma_share: float,
    clip_norm: float,
    delta: float,
    sample_rate: float = 1.0,
) -> float:
    """Epsilon at ``delta`` of the aggregate over the rounds run so far.

    completed_per_round: hospitals whose share reached the sum, per round.
    sigma_share: each hospital's noise standard deviation (units of the
        update; divide integer units by the quantisation scale first).
    clip_norm: L2 bound of one hospital's contribution (the sensitivity).
    sample_rate: probability a hospital was invited to a round (1.0 = all).

    Each round is a Gaussian mechanism with noise multiplier
    ``sigma_share * sqrt(completed) / clip_norm``, composed with Opacus's
    ``RDPAccountant``. See the module docstring for the assumptions; a round
    where no hospital completed released nothing and is skipped.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")

    # Imported here: hospital agents use the noise samplers above and should
    # not pay for opacus (and torch) at start.
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for completed in completed_per_round:
        if completed == 0:
            continue
        sigma = effective_noise(sigma_share, completed)
        if sigma == 0:
            return math.inf
        accountant.step(noise_multiplier=sigma / clip_norm, sample_rate=sample_rate)
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))

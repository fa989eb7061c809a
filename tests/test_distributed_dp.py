"""Distributed DP noise shares: samplers, share sums, and accounting by completers.

Statistical checks use fixed seeds and tolerances of several standard errors,
so they are deterministic and far from the edge.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from federation import distributed_dp as ddp


def _exact_variance(sigma: float) -> float:
    """Variance of the discrete Gaussian of scale sigma, summed over its support."""
    xs = np.arange(-60 * math.ceil(sigma), 60 * math.ceil(sigma) + 1, dtype=float)
    weights = np.exp(-(xs**2) / (2 * sigma**2))
    return float(np.sum(xs**2 * weights) / np.sum(weights))


@pytest.mark.parametrize("sigma", [0.6, 2.5])
def test_discrete_gaussian_variance_matches_the_exact_one(sigma):
    x = ddp.sample_discrete_gaussian(sigma, 12_000, np.random.default_rng(11))

    assert x.dtype == np.int64
    var = _exact_variance(sigma)
    # Standard error of a sample variance: about var * sqrt(2 / n).
    se = var * math.sqrt(2 / x.size)
    assert abs(x.var() - var) < 5 * se
    assert abs(x.mean()) < 5 * math.sqrt(var / x.size)


def test_discrete_gaussian_frequencies_follow_the_mass_function():
    sigma, n = 1.5, 12_000
    x = ddp.sample_discrete_gaussian(sigma, n, np.random.default_rng(12))

    support = np.arange(-30, 31)
    pmf = np.exp(-(support**2) / (2 * sigma**2))
    pmf /= pmf.sum()
    for value in range(-3, 4):
        p = pmf[support == value][0]
        observed = np.mean(x == value)
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / n), value


def test_discrete_gaussian_from_the_system_csprng():
    x = ddp.sample_discrete_gaussian(3.0, 3_000, rng=None)

    var = _exact_variance(3.0)
    # Unseeded: a wide bound (8 standard errors) keeps it from ever flaking.
    assert abs(x.var() - var) < 8 * var * math.sqrt(2 / x.size)


def test_sum_of_gaussian_shares_has_the_target_variance():
    n, dim, sigma_total = 10, 40_000, 2.0
    sigma_share = ddp.share_sigma(sigma_total, n)
    rng = np.random.default_rng(13)
    update = np.zeros(dim, dtype=np.float32)

    total = sum(
        ddp.gaussian_share(update, sigma_share, rng).astype(np.float64)
        for _ in range(n)
    )
    se = sigma_total**2 * math.sqrt(2 / dim)
    assert abs(total.var() - sigma_total**2) < 5 * se
    assert sigma_share == pytest.approx(sigma_total / math.sqrt(10))


def test_sum_of_discrete_shares_has_the_target_variance():
    n, dim, sigma_total = 4, 3_000, 6.0
    sigma_share = ddp.share_sigma(sigma_total, n)
    rng = np.random.default_rng(14)
    quantised = np.arange(dim, dtype=np.int64)

    total = sum(
        ddp.discrete_gaussian_share(quantised, sigma_share, rng) - quantised
        for _ in range(n)
    )
    assert total.dtype == np.int64
    se = sigma_total**2 * math.sqrt(2 / dim)
    assert abs(total.var() - sigma_total**2) < 5 * se
    assert ddp.discrete_sum_tau(sigma_share, n) < 1e-6


def test_secure_gaussian_shares_have_the_share_variance():
    x = ddp.sample_gaussian(1.5, 20_001, rng=None)

    assert x.shape == (20_001,)
    assert abs(x.var() - 2.25) < 8 * 2.25 * math.sqrt(2 / x.size)


def test_effective_noise_counts_only_completed_hospitals():
    sigma_share = ddp.share_sigma(4.0, 16)
    assert ddp.effective_noise(sigma_share, 16) == pytest.approx(4.0)
    assert ddp.effective_noise(sigma_share, 4) == pytest.approx(2.0)
    assert ddp.effective_noise(sigma_share, 0) == 0.0


def test_fewer_completed_hospitals_give_a_larger_epsilon():
    sigma_share = ddp.share_sigma(6.0, 10)
    kwargs = {"sigma_share": sigma_share, "clip_norm": 1.0, "delta": 1e-5}

    all_done = ddp.epsilon_for_rounds([10] * 5, **kwargs)
    some_dropped = ddp.epsilon_for_rounds([10, 10, 7, 10, 10], **kwargs)
    many_dropped = ddp.epsilon_for_rounds([6] * 5, **kwargs)
    assert all_done < some_dropped < many_dropped


def test_accounting_equals_opacus_rdp_for_the_completed_noise():
    sigma_share, clip = 0.9, 0.5
    completed = [8, 8, 5, 0, 8]

    reference = RDPAccountant()
    for c in completed:
        if c:
            z = sigma_share * math.sqrt(c) / clip
            reference.step(noise_multiplier=z, sample_rate=1.0)
    eps = ddp.epsilon_for_rounds(
        completed, sigma_share=sigma_share, clip_norm=clip, delta=1e-6
    )
    assert abs(eps - reference.get_epsilon(delta=1e-6)) < 1e-9
    assert ddp.epsilon_for_rounds(
        [], sigma_share=sigma_share, clip_norm=clip, delta=1e-6
    ) == 0.0


def test_client_subsampling_lowers_epsilon():
    kwargs = {"sigma_share": 1.0, "clip_norm": 1.0, "delta": 1e-5}
    full = ddp.epsilon_for_rounds([9] * 10, **kwargs)
    sampled = ddp.epsilon_for_rounds([9] * 10, sample_rate=0.3, **kwargs)
    assert sampled < full


def test_clip_l2_bounds_the_contribution():
    v = np.array([3.0, 4.0], dtype=np.float32)
    clipped, factor = ddp.clip_l2(v, 1.0)
    assert np.linalg.norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert factor == pytest.approx(0.2)
    same, factor = ddp.clip_l2(v, 10.0)
    assert np.array_equal(same, v) and factor == 1.0


def test_large_ranges_stay_uniform_with_a_numpy_generator():
    rng = np.random.default_rng(15)
    n = 3 << 64  # beyond int64: the exact bit-rejection path
    draws = [ddp._randbelow(n, rng) for _ in range(3_000)]
    assert all(0 <= d < n for d in draws)
    thirds = np.bincount([d >> 64 for d in draws], minlength=3)
    assert np.all(np.abs(thirds - 1_000) < 5 * math.sqrt(1_000 * 2 / 3))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: ddp.sample_discrete_gaussian(0.0, 3),
            "sigma must be a positive finite number, got 0.0",
        ),
        (lambda: ddp.share_sigma(1.0, 0), "n_expected must be at least 1, got 0"),
        (lambda: ddp.share_sigma(-1.0, 3), "sigma_total must be positive, got -1.0"),
        (
            lambda: ddp.discrete_gaussian_share(np.zeros(3), 1.0),
            "must hold integers, got dtype float64",
        ),
        (
            lambda: ddp.epsilon_for_rounds(
                [3], sigma_share=1.0, clip_norm=0.0, delta=1e-5
            ),
            "clip_norm must be positive, got 0.0",
        ),
        (
            lambda: ddp.epsilon_for_rounds(
                [3], sigma_share=1.0, clip_norm=1.0, delta=2.0
            ),
            r"delta must lie in \(0, 1\), got 2.0",
        ),
        (lambda: ddp.clip_l2(np.ones(2), 0.0), "clipping bound must be positive"),
    ],
)
def test_invalid_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()

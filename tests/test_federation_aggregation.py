"""Screening updates, FedAvg, FedAdam and their failure modes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from federation.aggregation import (
    FedAdam,
    FedAvg,
    RoundFailed,
    Update,
    build_strategy,
    check_update,
)

DIM = 5


def _update(name="h0", rnd=1, delta=None, n=10):
    if delta is None:
        delta = np.arange(DIM, dtype=np.float32)
    return Update(name, rnd, delta, n, {})


def test_fedavg_weights_by_samples():
    g = np.ones(DIM, dtype=np.float32)
    a = _update("a", delta=np.full(DIM, 1.0, np.float32), n=30)
    b = _update("b", delta=np.full(DIM, -1.0, np.float32), n=10)
    new = FedAvg().aggregate(g, [a, b], expected_round=1)

    assert new.dtype == np.float32
    np.testing.assert_allclose(new, 1 + (30 - 10) / 40)


@pytest.mark.parametrize(
    "update, expected",
    [
        (_update(n=0), "num_samples must be positive, got 0"),
        (_update(n=-3), "num_samples must be positive, got -3"),
        (_update(n=2.5), "num_samples must be an integer"),
        (_update(delta=np.array([0, np.nan, 0, 0, 0], np.float32)), "1 NaN and 0 inf"),
        (_update(delta=np.array([np.inf, 0, -np.inf, 0, 0], np.float32)),
         "0 NaN and 2 infinite"),
        (_update(delta=np.zeros(4, np.float32)), "shape (4,) does not match"),
        (_update(delta=np.zeros((1, DIM), np.float32)), "shape (1, 5) does not match"),
        (_update(delta=np.zeros(DIM, np.float64)),
         "dtype must be float32, got float64"),
        (_update(delta=[0.0] * DIM), "must be a numpy array"),
        (_update(rnd=2), "update is for round 2, expected round 1"),
    ],
)
def test_check_update_states_the_reason(update, expected):
    reason = check_update(update, DIM, expected_round=1)

    assert reason is not None and expected in reason
    assert check_update(_update(), DIM, expected_round=1) is None


def test_rejected_updates_are_left_out_and_listed(caplog):
    g = np.zeros(DIM, dtype=np.float32)
    good = _update("good", delta=np.ones(DIM, np.float32))
    bad = _update("bad", delta=np.full(DIM, 1e3, np.float32), n=0)
    strategy = FedAvg()
    with caplog.at_level(logging.WARNING, logger="federation.aggregation"):
        new = strategy.aggregate(g, [good, bad], expected_round=1)

    np.testing.assert_allclose(new, 1.0)
    assert strategy.last_rejected == [
        {"hospital": "bad", "reason": "num_samples must be positive, got 0"}
    ]
    assert "rejected update from bad" in caplog.text


@pytest.mark.parametrize("strategy_cls", [FedAvg, FedAdam])
def test_round_fails_when_all_rejected_and_global_unchanged(strategy_cls):
    g = np.linspace(0, 1, DIM).astype(np.float32)
    g_before = g.copy()
    strategy = strategy_cls()
    strategy.aggregate(g, [_update()], expected_round=1)
    state_before = strategy.state_dict()

    nan = np.full(DIM, np.nan, np.float32)
    with pytest.raises(RoundFailed, match="no acceptable update out of 2") as err:
        strategy.aggregate(g, [_update("a", 2, nan), _update("b", 2, n=0)], 2)

    assert [r["hospital"] for r in err.value.reasons] == ["a", "b"]
    assert np.array_equal(g, g_before)
    after = strategy.state_dict()
    for key, value in state_before.items():
        assert np.array_equal(after[key], value) if isinstance(value, np.ndarray) \
            else after[key] == value


def test_fedadam_first_step_matches_the_paper():
    g = np.zeros(DIM, dtype=np.float32)
    d = np.array([0.1, -0.2, 0.0, 0.3, 1.0], np.float32)
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    new = FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau).aggregate(g, [_update(delta=d)])

    d64 = d.astype(np.float64)
    m = (1 - b1) * d64
    v = b2 * tau**2 + (1 - b2) * d64**2
    np.testing.assert_allclose(new, lr * m / (np.sqrt(v) + tau), rtol=1e-6)


def test_fedadam_state_persists_and_restores():
    rng = np.random.default_rng(0)
    deltas = [rng.standard_normal(DIM).astype(np.float32) for _ in range(4)]
    g = np.zeros(DIM, dtype=np.float32)
    a = FedAdam(lr=0.1)
    for r in range(2):
        g = a.aggregate(g, [_update(rnd=r, delta=deltas[r])])
    checkpoint = a.state_dict()

    b = FedAdam(lr=0.5, tau=0.1)
    b.load_state_dict(checkpoint)
    fresh = FedAdam(lr=0.1)
    ga = a.aggregate(g, [_update(delta=deltas[2])])
    gb = b.aggregate(g, [_update(delta=deltas[2])])
    gf = fresh.aggregate(g, [_update(delta=deltas[2])])

    assert checkpoint["steps"] == 2 and b.steps == 3
    assert np.array_equal(ga, gb)
    assert not np.allclose(ga, gf)  # momentum from earlier rounds matters


def test_fedadam_refuses_a_checkpoint_of_another_strategy():
    with pytest.raises(ValueError, match="'fedavg', not 'fedadam'"):
        FedAdam().load_state_dict(FedAvg().state_dict())


@pytest.mark.parametrize("strategy_cls", [FedAvg, FedAdam])
def test_apply_on_summed_delta_equals_aggregate(strategy_cls):
    rng = np.random.default_rng(3)
    g = rng.standard_normal(DIM).astype(np.float32)
    ups = [_update(str(k), delta=rng.standard_normal(DIM).astype(np.float32), n=n)
           for k, n in enumerate([5, 17, 40])]
    summed = sum(u.num_samples * u.delta.astype(np.float64) for u in ups)

    via_updates = strategy_cls().aggregate(g, ups)
    via_sum = strategy_cls().apply(g, summed, 62)

    np.testing.assert_allclose(via_updates, via_sum, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="total_samples must be positive, got 0"):
        strategy_cls().apply(g, summed, 0)


def test_fedprox_with_zero_mu_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="federation.aggregation"):
        strategy = build_strategy("fedprox", proximal_mu=0.0)

    assert isinstance(strategy, FedAvg)
    assert "proximal_mu=0" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("strategy_cls", [FedAvg, FedAdam])
def test_cpu_and_cuda_aggregation_agree(strategy_cls):
    rng = np.random.default_rng(11)
    dim = 10_000
    g = rng.standard_normal(dim).astype(np.float32)
    cpu, gpu = strategy_cls(device="cpu"), strategy_cls(device="cuda")
    for r in range(3):
        ups = [Update(str(k), r, rng.standard_normal(dim).astype(np.float32), n, {})
               for k, n in enumerate([100, 250, 7])]
        g_cpu = cpu.aggregate(g, ups, r)
        g_gpu = gpu.aggregate(g, ups, r)
        np.testing.assert_allclose(g_cpu, g_gpu, rtol=1e-6, atol=1e-7)
        g = g_cpu

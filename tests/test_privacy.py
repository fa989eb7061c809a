"""Record-level DP-SGD at a hospital: accounting, budget, validation, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from federation.models import build_model, get_weights
from federation.privacy import BudgetExhausted, DPConfig, PrivateTrainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:Optimal order is the largest alpha:UserWarning"
)


def _separable(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=d)
    y = (X @ w + 0.5 * rng.normal(size=n) > 0).astype(np.float32)
    return X, y


def _initial(d: int) -> np.ndarray:
    return get_weights(build_model("logreg", d, seed=0))


@pytest.mark.parametrize(
    ("accountant", "reference"), [("rdp", RDPAccountant), ("prv", PRVAccountant)]
)
def test_reported_epsilon_matches_an_independent_opacus_accountant(
    accountant, reference
):
    n, batch, rounds, target = 600, 50, 3, 2.0
    X, y = _separable(n, 4, seed=1)
    dp = DPConfig(epsilon=target, accountant=accountant, planned_rounds=rounds)
    trainer = PrivateTrainer("logreg", X, y, dp, batch_size=batch)

    # The noise is calibrated once for the whole planned schedule.
    q = 1 / math.ceil(n / batch)
    per_round = int(1 / q)
    expected_noise = get_noise_multiplier(
        target_epsilon=target, target_delta=dp.delta, sample_rate=q,
        steps=rounds * per_round, accountant=accountant,
    )
    assert trainer.noise_multiplier == expected_noise

    ref = reference()
    weights = _initial(4)
    for _ in range(rounds):
        result = trainer.fit(weights)
        weights = weights + result.delta
        for _ in range(per_round):
            ref.step(noise_multiplier=expected_noise, sample_rate=q)

        assert result.metrics["steps"] == per_round
        assert result.metrics["noise_multiplier"] == expected_noise
        assert result.metrics["delta"] == dp.delta
        assert abs(result.metrics["epsilon"] - ref.get_epsilon(delta=dp.delta)) < 1e-9
        assert result.metrics["epsilon"] <= target
        assert result.metrics["epsilon_round"] > 0

    assert abs(trainer.spent()[0] - ref.get_epsilon(delta=dp.delta)) < 1e-9
    # Calibration lands within Opacus's search tolerance below the target.
    assert target - 0.05 < trainer.spent()[0] <= target


def test_hospital_at_its_budget_refuses_and_keeps_its_weights():
    X, y = _separable(400, 3, seed=2)
    dp = DPConfig(epsilon=1.5, accountant="rdp", planned_rounds=2)
    trainer = PrivateTrainer("logreg", X, y, dp, batch_size=40, name="hospital-07")
    weights = _initial(3)
    for _ in range(2):
        weights = weights + trainer.fit(weights).delta

    before_weights = get_weights(trainer._inner)
    before_history = list(trainer.engine.accountant.history)
    before_eps = trainer.spent()[0]
    with pytest.raises(BudgetExhausted, match=r"hospital-07.*epsilon=1\.5.*would"):
        trainer.fit(weights + 1.0)

    assert np.array_equal(get_weights(trainer._inner), before_weights)
    assert trainer.engine.accountant.history == before_history
    assert trainer.spent()[0] == before_eps <= 1.5


def test_explicit_budget_with_fixed_noise_refuses_the_round_that_would_cross_it():
    X, y = _separable(300, 3, seed=3)
    dp = DPConfig(noise_multiplier=2.0, accountant="rdp")
    trainer = PrivateTrainer("logreg", X, y, dp, batch_size=30, budget_epsilon=2.0)
    weights = _initial(3)

    # No calibration: the given noise is used; rounds run until the next one
    # would cross 2.0, and every completed round stayed within it.
    assert trainer.noise_multiplier == 2.0
    completed = 0
    with pytest.raises(BudgetExhausted, match="epsilon=2 "):
        for _ in range(50):
            would = trainer.epsilon_after(1)
            result = trainer.fit(weights)
            assert would == pytest.approx(result.metrics["epsilon"], abs=1e-12)
            assert result.metrics["epsilon"] <= 2.0
            completed += 1
    assert completed >= 2
    assert trainer.spent()[0] <= 2.0 < trainer.epsilon_after(1)


def test_fixed_noise_without_budget_never_refuses():
    X, y = _separable(200, 2, seed=4)
    dp = DPConfig(noise_multiplier=0.8, accountant="rdp")
    trainer = PrivateTrainer("logreg", X, y, dp, batch_size=50)
    weights = _initial(2)
    for _ in range(3):
        result = trainer.fit(weights)
    assert result.metrics["epsilon"] > 0
    assert result.metrics["loss"] is None  # un-noised loss is not released


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, "epsilon must be positive and finite, got 0.0"),
        ({"epsilon": -1.0}, "epsilon must be positive and finite, got -1.0"),
        ({"epsilon": float("inf")}, "epsilon must be positive and finite, got inf"),
        ({"epsilon": 1.0, "delta": 0.0}, r"delta must lie in \(0, 1\), got 0.0"),
        ({"epsilon": 1.0, "delta": 1.0}, r"delta must lie in \(0, 1\), got 1.0"),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": None},
            "max_grad_norm must be positive, got None.*clipping",
        ),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 0.0},
            "max_grad_norm must be positive, got 0.0",
        ),
        ({}, "needs a budget .*--epsilon.* or fixed noise .*--noise-multiplier"),
        ({"epsilon": 1.0, "accountant": "gdp"}, "unknown accountant 'gdp'.*'prv'"),
        ({"epsilon": 1.0, "accountant": "moments"}, "unknown accountant 'moments'"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be positive, got 0.0"),
        ({"epsilon": 1.0, "planned_rounds": 0}, "planned_rounds must be at least 1"),
    ],
)
def test_invalid_settings_are_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPConfig(**kwargs)


def test_wrong_weight_vector_is_refused_before_spending():
    X, y = _separable(100, 3, seed=5)
    trainer = PrivateTrainer(
        "logreg", X, y, DPConfig(noise_multiplier=1.0, accountant="rdp")
    )
    with pytest.raises(ValueError, match=r"\(7,\).*\(4,\)"):
        trainer.fit(np.zeros(7, dtype=np.float32))
    assert trainer.spent() == (0.0, 1e-5)


def test_dp_training_still_learns_a_separable_problem():
    X, y = _separable(3000, 8, seed=6)
    X_tr, y_tr, X_te, y_te = X[:2400], y[:2400], X[2400:], y[2400:]

    dp = DPConfig(epsilon=4.0, accountant="rdp", planned_rounds=3)
    trainer = PrivateTrainer("logreg", X_tr, y_tr, dp, batch_size=128, lr=0.5)
    weights = _initial(8)
    start = trainer.evaluate(weights, X_te, y_te)["auroc"]
    for _ in range(3):
        weights = weights + trainer.fit(weights).delta

    final = trainer.evaluate(weights, X_te, y_te)["auroc"]
    assert final > 0.7
    assert final > start
    assert trainer.spent()[0] <= 4.0


def test_same_seed_reproduces_the_update():
    X, y = _separable(300, 3, seed=7)
    dp = DPConfig(noise_multiplier=1.0, accountant="rdp")
    a = PrivateTrainer("mlp", X, y, dp, batch_size=30, hidden=4, seed=3)
    b = PrivateTrainer("mlp", X, y, dp, batch_size=30, hidden=4, seed=3)
    w = get_weights(build_model("mlp", 3, hidden=4, seed=3))
    assert np.array_equal(a.fit(w).delta, b.fit(w).delta)


def test_proximal_term_pulls_the_update_toward_the_global_model():
    X, y = _separable(400, 3, seed=8)
    dp = DPConfig(noise_multiplier=1.0, accountant="rdp")
    plain = PrivateTrainer("logreg", X, y, dp, batch_size=40, lr=0.5, seed=1)
    prox = PrivateTrainer(
        "logreg", X, y, dp, batch_size=40, lr=0.5, seed=1, proximal_mu=1.0
    )
    w = _initial(3)
    plain_delta, prox_delta = plain.fit(w).delta, prox.fit(w).delta

    # Same seed, same noise and batches: only the pull differs, and it shrinks
    # the step without costing privacy.
    assert np.linalg.norm(prox_delta) < np.linalg.norm(plain_delta)
    assert prox.spent() == plain.spent()
    with pytest.raises(ValueError, match="optimizer='sgd' only, got 'adam'"):
        PrivateTrainer("logreg", X, y, dp, optimizer="adam", proximal_mu=0.1)


def test_secure_mode_without_its_package_fails_clearly():
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchcsprng is installed: secure mode is available")
    X, y = _separable(100, 2, seed=9)
    with pytest.raises(ValueError, match="secure_mode=True needs the torchcsprng"):
        PrivateTrainer(
            "logreg", X, y, DPConfig(noise_multiplier=1.0), secure_mode=True
        )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_restored_state_gives_the_same_epsilon_and_the_same_next_round(accountant):
    import json

    X, y = _separable(500, 3, seed=6)
    dp = DPConfig(epsilon=2.0, accountant=accountant, planned_rounds=3)
    original = PrivateTrainer("logreg", X, y, dp, batch_size=50, name="h")
    weights = _initial(3)
    for _ in range(2):
        weights = weights + original.fit(weights).delta
    # Through JSON, as the hospital's file keeps it.
    state = json.loads(json.dumps(original.privacy_state()))
    assert state["steps"] == original.steps_taken() > 0
    assert state["rounds"] == 2 and state["accountant"] == accountant

    restored = PrivateTrainer("logreg", X, y, dp, batch_size=50, name="h")
    assert restored.spent()[0] == 0.0
    restored.restore_privacy_state(state)
    assert restored.spent() == original.spent()
    assert restored.steps_taken() == original.steps_taken()
    assert restored.engine.accountant.history == original.engine.accountant.history

    # The generators continue too: the next round is the one the original runs.
    a, b = original.fit(weights), restored.fit(weights)
    assert a.metrics["epsilon"] == b.metrics["epsilon"] > state["epsilon"]
    assert np.array_equal(a.delta, b.delta)


def test_restored_trainer_refuses_at_its_budget_exactly_as_the_original():
    X, y = _separable(300, 3, seed=7)
    dp = DPConfig(noise_multiplier=1.5, accountant="rdp")

    def rounds_until_refused(trainer, weights, limit=40):
        done = 0
        with pytest.raises(BudgetExhausted) as caught:
            for _ in range(limit):
                trainer.fit(weights)
                done += 1
        return done, str(caught.value), trainer.spent()[0]

    original = PrivateTrainer("logreg", X, y, dp, batch_size=30, budget_epsilon=2.5)
    first = PrivateTrainer("logreg", X, y, dp, batch_size=30, budget_epsilon=2.5)
    weights = _initial(3)
    first.fit(weights)
    first.fit(weights)
    restored = PrivateTrainer("logreg", X, y, dp, batch_size=30, budget_epsilon=2.5)
    restored.restore_privacy_state(first.privacy_state())

    total, message, spent = rounds_until_refused(original, weights)
    rest, restored_message, restored_spent = rounds_until_refused(restored, weights)
    assert total >= 3
    assert rest == total - 2
    assert restored_message == message
    assert restored_spent == spent <= 2.5


@pytest.mark.parametrize(("change", "words"), [
    ({"accountant": "prv"}, "'prv' accountant, this run uses 'rdp'"),
    ({"noise_multiplier": 1.7}, "noise_multiplier=1.7, this trainer adds 1.5"),
    ({"delta": 1e-6}, "delta=1e-06"),
    ({"steps": 1}, "its history holds"),
    ({"history": [[1.5, 0.1, -3]]}, "is not [noise_multiplier > 0"),
    ({"version": 99}, "version 99"),
])
def test_a_foreign_or_altered_state_is_refused_and_changes_nothing(change, words):
    from federation.privacy import PrivacyStateError

    X, y = _separable(300, 3, seed=8)
    dp = DPConfig(noise_multiplier=1.5, accountant="rdp")
    trainer = PrivateTrainer("logreg", X, y, dp, batch_size=30, name="h-3")
    trainer.fit(_initial(3))
    state = dict(trainer.privacy_state(), **change)

    fresh = PrivateTrainer("logreg", X, y, dp, batch_size=30, name="h-3")
    with pytest.raises(PrivacyStateError) as caught:
        fresh.restore_privacy_state(state)
    assert words in str(caught.value)
    assert "h-3" in str(caught.value)
    assert fresh.spent()[0] == 0.0 and fresh.steps_taken() == 0

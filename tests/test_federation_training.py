"""Local training: plain SGD steps, FedProx's pull, determinism, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federation.aggregation import FedAvg, Update
from federation.models import build_model, get_weights, set_weights
from federation.training import LocalTrainer, predict_proba


def _data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    w = np.linspace(-1, 1, d)
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ w)))).astype(np.float32)
    return X, y


@pytest.mark.parametrize("model_name", ["logreg", "mlp"])
def test_fedavg_of_one_full_batch_step_equals_pooled_step(model_name):
    sizes = [37, 120, 64, 9]
    parts = [_data(n, 6, seed) for seed, n in enumerate(sizes)]
    global_w = get_weights(build_model(model_name, 6, hidden=8, seed=3))

    updates = []
    for k, (X, y) in enumerate(parts):
        trainer = LocalTrainer(model_name, X, y, batch_size=10_000, lr=0.5, hidden=8)
        fit = trainer.fit(global_w, epochs=1)
        assert fit.metrics["steps"] == 1 and fit.num_samples == sizes[k]
        updates.append(Update(f"hospital-{k}", 1, fit.delta, fit.num_samples, {}))
    federated = FedAvg().aggregate(global_w, updates)

    X_all = np.concatenate([X for X, _ in parts])
    y_all = np.concatenate([y for _, y in parts])
    pooled = LocalTrainer(model_name, X_all, y_all, batch_size=10_000, lr=0.5, hidden=8)
    centralised = global_w + pooled.fit(global_w, epochs=1).delta

    assert not np.allclose(federated, global_w)
    np.testing.assert_allclose(federated, centralised, rtol=0, atol=1e-6)


def test_proximal_term_matches_autograd_reference():
    X, y = _data(50, 4, 0)
    global_w = get_weights(build_model("logreg", 4, seed=1))
    mu, lr = 0.7, 0.3
    trainer = LocalTrainer("logreg", X, y, batch_size=1000, lr=lr, proximal_mu=mu)
    got = global_w + trainer.fit(global_w, epochs=3).delta

    # Reference: three full-batch steps on BCE + mu/2 ||w - w_global||^2.
    model = build_model("logreg", 4)
    set_weights(model, global_w)
    anchor = [p.detach().clone() for p in model.parameters()]
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(3):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(Xt), yt)
        loss = loss + mu / 2 * sum(((p - a) ** 2).sum()
                                   for p, a in zip(model.parameters(), anchor))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad

    np.testing.assert_allclose(got, get_weights(model), atol=1e-6)


def test_fedprox_pulls_toward_the_global_model():
    X, y = _data(600, 5, 4)
    global_w = np.zeros(6, dtype=np.float32)
    plain = LocalTrainer("logreg", X, y, batch_size=32, lr=0.2, seed=5)
    prox = LocalTrainer("logreg", X, y, batch_size=32, lr=0.2, seed=5, proximal_mu=2.0)

    d_plain = plain.fit(global_w, epochs=5).delta
    d_prox = prox.fit(global_w, epochs=5).delta

    assert np.linalg.norm(d_prox) < 0.7 * np.linalg.norm(d_plain)


def test_same_seed_reproduces_and_rounds_reshuffle():
    X, y = _data(300, 5, 1)
    a = LocalTrainer("mlp", X, y, batch_size=16, hidden=4, seed=2)
    w0 = get_weights(a.model)
    b = LocalTrainer("mlp", X, y, batch_size=16, hidden=4, seed=2)

    first_a, first_b = a.fit(w0).delta, b.fit(w0).delta
    second_a = a.fit(w0).delta

    assert np.array_equal(first_a, first_b)
    assert not np.array_equal(first_a, second_a)


def test_training_learns_and_evaluate_scores():
    X, y = _data(4000, 5, 2)
    X_test, y_test = _data(2000, 5, 3)
    trainer = LocalTrainer("logreg", X, y, batch_size=64, lr=0.01, optimizer="adam")
    w = np.zeros(6, dtype=np.float32)
    for _ in range(5):
        w = w + trainer.fit(w).delta
    scores = trainer.evaluate(w, X_test, y_test)
    true_p = 1 / (1 + np.exp(-(X_test @ np.linspace(-1, 1, 5))))

    assert scores["auroc"] > 0.75
    assert abs(scores["auroc"] - trainer.evaluate(w, X_test, y_test)["auroc"]) == 0
    error = np.abs(predict_proba("logreg", w, X_test) - true_p)
    assert error.mean() < 0.03


def test_bad_inputs_raise_with_the_value():
    X, y = _data(10, 3, 0)
    with pytest.raises(ValueError, match="10 rows but y has 9"):
        LocalTrainer("logreg", X, y[:9])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        LocalTrainer("logreg", X, y + 2)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        LocalTrainer("logreg", X, y, optimizer="lbfgs")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            LocalTrainer("logreg", X, y, device="cuda")


def test_adam_matches_torch_optim_adam():
    X, y = _data(200, 4, 6)
    global_w = get_weights(build_model("mlp", 4, hidden=3, seed=2))
    trainer = LocalTrainer("mlp", X, y, batch_size=1000, lr=0.05, optimizer="adam",
                           hidden=3)
    got = global_w + trainer.fit(global_w, epochs=5).delta

    model = build_model("mlp", 4, hidden=3)
    set_weights(model, global_w)
    reference = torch.optim.Adam(model.parameters(), lr=0.05)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(5):
        reference.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(Xt), yt).backward()
        reference.step()

    np.testing.assert_allclose(got, get_weights(model), atol=1e-6)


def test_read_only_arrays_train_and_score_without_warnings(recwarn):
    # Arrays from Ray's object store arrive read-only.
    X, y = _data(100, 3, 8)
    X.setflags(write=False)
    y.setflags(write=False)
    w = np.zeros(4, dtype=np.float32)
    w.setflags(write=False)
    trainer = LocalTrainer("logreg", X, y, proximal_mu=0.1)
    delta = trainer.fit(w).delta
    p = predict_proba("logreg", w + delta, X)

    assert np.abs(delta).sum() > 0 and p.shape == (100,)
    assert not [str(x.message) for x in recwarn.list
                if "not writable" in str(x.message)]

"""Hospital actors: they train and score, and never hand out their patients."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from actors.hospital import (
    HospitalGroup,
    HospitalTrainer,
    reserve_bundles,
    trainer_cpus,
)
from clinical.prepared import load_hospital, prepare
from clinical.spec import DataSpec
from cluster.config import RunConfig
from federation.aggregation import Update
from federation.models import build_model, get_weights

pytestmark = pytest.mark.ray

PUBLIC_METHODS = {"ping", "fit", "evaluate", "train_local_only"}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> RunConfig:
    spec = DataSpec(dataset="synthetic", synthetic_patients=3000, hospitals=2, seed=1)
    cache = str(tmp_path_factory.mktemp("cache"))
    prepare(spec, cache_dir=cache)
    return RunConfig(data=spec, cache_dir=cache, rounds=2, lr=0.5)


@pytest.fixture(scope="module")
def group(ray_local, config):
    placement = reserve_bundles(config.data.hospitals, timeout_s=60)
    made = HospitalGroup(config, 0, "hospital-00", placement)
    yield made
    made.kill()
    ray.util.remove_placement_group(placement)


def _arrays(value):
    """Every numpy array inside a returned value (dicts, lists, dataclasses)."""
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _arrays(v)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _arrays(getattr(value, name))


def test_public_methods_are_the_audited_ones():
    cls = HospitalTrainer.__ray_actor_class__
    public = {name for name in vars(cls) if not name.startswith("_")}
    # A new public method must be added here after checking what it returns.
    assert public == PUBLIC_METHODS


def test_no_method_returns_patient_rows(group, config):
    own = load_hospital(config.data, 0, cache_dir=config.cache_dir)
    n_features = own.X_train.shape[1]
    initial = get_weights(build_model(config.model, n_features, config.hidden, 0))
    row_counts = {len(own.y_train), len(own.y_val)}

    outputs = {
        "ping": ray.get(group.trainer.ping.remote()),
        "fit": ray.get(group.trainer.fit.remote(1, initial, 1)),
        "evaluate": ray.get(group.trainer.evaluate.remote(initial)),
        "train_local_only": ray.get(group.trainer.train_local_only.remote(1)),
    }
    assert set(outputs) == PUBLIC_METHODS
    data_values = [own.X_train, own.y_train, own.X_val, own.y_val]
    for method, value in outputs.items():
        for array in _arrays(value):
            assert array.shape[0] not in row_counts, (method, array.shape)
            assert array.size <= n_features + 1, (method, array.shape)
            for data in data_values:
                assert not (array.shape == data.shape and np.array_equal(array, data))


def test_fit_returns_an_update_that_moves_the_weights(group, config):
    own = load_hospital(config.data, 0, cache_dir=config.cache_dir)
    initial = get_weights(
        build_model(config.model, own.X_train.shape[1], config.hidden, 0)
    )
    update = ray.get(group.trainer.fit.remote(3, initial, 2))
    assert isinstance(update, Update)
    assert update.hospital == "hospital-00" and update.round == 3
    assert update.num_samples == len(own.y_train)
    assert update.delta.dtype == np.float32 and update.delta.shape == initial.shape
    assert np.abs(update.delta).sum() > 0
    assert update.metrics["epochs"] == 2
    assert "val_auroc" in update.metrics and "val_loss" in update.metrics


def test_local_only_model_beats_its_starting_point(group, config):
    own = load_hospital(config.data, 0, cache_dir=config.cache_dir)
    initial = get_weights(
        build_model(config.model, own.X_train.shape[1], config.hidden, config.seed)
    )
    trained = ray.get(group.trainer.train_local_only.remote(5))
    before = ray.get(group.trainer.evaluate.remote(initial))
    after = ray.get(group.trainer.evaluate.remote(trained))
    assert after["loss"] < before["loss"]
    assert after["num_samples"] == len(own.y_val)


def test_cpu_share_shrinks_for_many_hospitals_and_refuses_too_many():
    assert trainer_cpus(10, 2.0, 0.1) == 0.1
    share = trainer_cpus(25, 2.0, 0.1)
    assert share < 0.1 and 25 * share + 0.1 <= 2.0
    with pytest.raises(ValueError, match="500 hospitals"):
        trainer_cpus(500, 2.0, 0.1)


def test_per_round_settings_apply_to_that_round_only(group, config):
    own = load_hospital(config.data, 0, cache_dir=config.cache_dir)
    initial = get_weights(
        build_model(config.model, own.X_train.shape[1], config.hidden, 0)
    )
    tiny = ray.get(group.trainer.fit.remote(1, initial, 1, {"lr": 1e-6}))
    normal = ray.get(group.trainer.fit.remote(2, initial, 1))
    assert np.abs(tiny.delta).sum() * 1000 < np.abs(normal.delta).sum()


def test_group_actors_do_not_load_the_privacy_stack_without_dp(group):
    # The settings a hospital receives must not drag Opacus into its process.
    loaded = ray.get(group.trainer.__ray_call__.remote(
        lambda self: sorted(m for m in __import__("sys").modules
                            if m.split(".")[0] in ("opacus", "scipy"))))
    assert loaded == []


def test_run_config_reaches_actors_without_the_privacy_stack():
    import pickle
    import subprocess
    import sys

    # Actors receive the RunConfig itself; unpickled in a fresh process, a
    # run without DP must load neither Opacus nor PyTorch.
    blob = pickle.dumps(RunConfig())
    code = ("import pickle, sys; s = pickle.loads(sys.stdin.buffer.read()); "
            "print(s.ledger.enabled, s.sampled_per_round(), sorted(m for m in "
            "sys.modules if m.split('.')[0] in ('opacus', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], input=blob,
                         capture_output=True, check=True).stdout.decode()
    assert out.split() == ["True", "10", "[]"]


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_scorer_matches_the_trainers_evaluate(model):
    from actors.scoring import Scorer
    from federation.training import LocalTrainer, predict_proba

    rng = np.random.default_rng(4)
    X = rng.normal(size=(500, 6)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=500) > 0).astype(np.float32)
    trainer = LocalTrainer(model, X, y, hidden=8, lr=0.3)
    start = get_weights(build_model(model, 6, 8, seed=2))
    scorer = Scorer(model, X[:200], y[:200], hidden=8)
    for weights in (start, start + trainer.fit(start, 2).delta):
        assert np.array_equal(scorer.proba(weights),
                              predict_proba(model, weights, X[:200], hidden=8))
        assert scorer.metrics(weights, loss=True) == trainer.evaluate(
            weights, X[:200], y[:200])
    assert "loss" not in scorer.metrics(start)
    with pytest.raises(ValueError, match="weight vector"):
        scorer.proba(start[:-1])

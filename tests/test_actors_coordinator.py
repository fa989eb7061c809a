"""The coordinator under failure: crashes, errors, timeouts, bad updates, resume.

Faults are injected with ``actors.hospital.Fault``, a test-only option of the
hospital actor.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray

from actors.coordinator import Coordinator
from actors.hospital import Fault, HospitalGroup
from clinical.prepared import prepare
from clinical.spec import DataSpec
from cluster.config import RunConfig
from federation.models import weights_hash

def _ray(test):
    """Marks a test that needs the shared local Ray instance."""
    return pytest.mark.ray(pytest.mark.slow(test))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    spec = DataSpec(dataset="synthetic", synthetic_patients=4000, hospitals=4, seed=2)
    cache = str(tmp_path_factory.mktemp("cache"))
    return spec, cache, prepare(spec, cache_dir=cache)


def _config(data, **changes) -> RunConfig:
    spec, cache, _ = data
    base = RunConfig(data=spec, cache_dir=cache, rounds=3, lr=0.5, quorum=0.5,
                     round_timeout_s=20, ping_timeout_s=60)
    return dataclasses.replace(base, **changes)


def _start(config, data, faults, checkpoint_dir, count=None):
    _, _, prepared = data
    groups = [
        HospitalGroup(config, i, f"hospital-{i:02d}", None, faults.get(i))
        for i in range(count or config.data.hospitals)
    ]
    coordinator = Coordinator.remote(
        config, prepared.X_train.shape[1], prepared.X_test, prepared.y_test,
        [(g.name, g.trainer) for g in groups], str(checkpoint_dir),
    )
    return groups, coordinator


def _stop(groups, coordinator):
    ray.kill(coordinator)
    for g in groups:
        g.kill()


def _run(coordinator, rounds):
    return [ray.get(coordinator.run_round.remote(), timeout=180)
            for _ in range(rounds)]


@_ray
def test_failing_hospitals_are_dropped_and_rejoin(ray_local, data, tmp_path):
    config = _config(data, round_timeout_s=3)
    faults = {
        1: Fault("crash", rounds=(2,)),           # process dies mid-round 2
        2: Fault("raise", rounds=(1,)),           # fit raises in round 1
        3: Fault("sleep", rounds=(1,), seconds=6),  # misses the round-1 deadline
    }
    groups, coordinator = _start(config, data, faults, tmp_path)
    try:
        first, second, third = _run(coordinator, 3)
    finally:
        _stop(groups, coordinator)

    dropped = {d["hospital"]: d["reason"] for d in first["dropped"]}
    assert first["status"] == "ok"
    assert "RuntimeError" in dropped["hospital-02"]
    assert "timed out" in dropped["hospital-03"]
    assert first["participants"] == ["hospital-00", "hospital-01"]

    dropped = {d["hospital"]: d["reason"] for d in second["dropped"]}
    assert second["status"] == "ok"
    assert "died" in dropped["hospital-01"]
    assert "hospital-01" not in second["participants"]
    assert "hospital-03" in second["participants"]

    # The crashed actor was restarted by Ray and takes part again.
    assert third["status"] == "ok"
    assert third["participants"] == [f"hospital-{i:02d}" for i in range(4)]
    assert third["dropped"] == []


@_ray
def test_bad_updates_are_rejected_and_an_all_bad_round_fails(ray_local, data,
                                                             tmp_path):
    config = _config(data, rounds=2, quorum=1.0)
    faults = {
        0: Fault("nan", rounds=(2,)),
        1: Fault("nan"),
        2: Fault("zero_samples"),
        3: Fault("wrong_shape"),
    }
    groups, coordinator = _start(config, data, faults, tmp_path)
    try:
        initial = ray.get(coordinator.state.remote())["weights_hash"]
        first, second = _run(coordinator, 2)
        final = ray.get(coordinator.global_weights.remote())
    finally:
        _stop(groups, coordinator)

    reasons = {r["hospital"]: r["reason"] for r in first["rejected"]}
    assert first["status"] == "ok" and first["participants"] == ["hospital-00"]
    assert "NaN" in reasons["hospital-01"]
    assert "num_samples" in reasons["hospital-02"]
    assert "shape" in reasons["hospital-03"]
    assert first["weights_hash"] != initial

    assert second["status"] == "failed"
    assert "rejected" in second["failure"]
    assert len(second["rejected"]) == 4 and second["participants"] == []
    assert second["weights_hash"] == first["weights_hash"] == weights_hash(final)


@_ray
def test_resume_continues_from_the_saved_round(ray_local, data, tmp_path):
    config = _config(data, rounds=3, strategy="fedadam")
    groups, coordinator = _start(config, data, {}, tmp_path, count=2)
    try:
        before = _run(coordinator, 2)
        ray.kill(coordinator)

        resumed_config = dataclasses.replace(config, resume=True)
        _, _, prepared = data
        coordinator = Coordinator.remote(
            resumed_config, prepared.X_train.shape[1], prepared.X_test,
            prepared.y_test, [(g.name, g.trainer) for g in groups], str(tmp_path),
        )
        state = ray.get(coordinator.state.remote())
        assert state["round"] == 2 and state["resumed_from"] == 2
        assert state["weights_hash"] == before[-1]["weights_hash"]
        third = ray.get(coordinator.run_round.remote(), timeout=180)
        records = ray.get(coordinator.round_records.remote())
        ray.kill(coordinator)

        # A checkpoint of another strategy is refused by the first call,
        # with the resume error itself (not the text of a dead actor).
        coordinator = Coordinator.remote(
            dataclasses.replace(resumed_config, strategy="fedavg"),
            prepared.X_train.shape[1], prepared.X_test, prepared.y_test,
            [(g.name, g.trainer) for g in groups], str(tmp_path),
        )
        with pytest.raises(ValueError, match="strategy 'fedadam', this run has"):
            ray.get(coordinator.state.remote())
    finally:
        _stop(groups, coordinator)

    assert third["round"] == 3 and third["status"] == "ok"
    assert [r["round"] for r in records] == [1, 2, 3]
    assert third["weights_hash"] != before[-1]["weights_hash"]
    assert np.isfinite(third["auroc"])


def test_hospital_sample_is_seeded_per_round():
    from actors.coordinator import sample_hospitals

    names = [f"hospital-{i:02d}" for i in range(10)]
    draws = [sample_hospitals(names, 4, seed=7, round=r) for r in range(1, 6)]
    assert all(len(d) == 4 and len(set(d)) == 4 for d in draws)
    assert all(d == sorted(d) and set(d) <= set(names) for d in draws)
    assert draws[0] == sample_hospitals(names, 4, seed=7, round=1)
    assert len({tuple(d) for d in draws}) > 1
    assert sample_hospitals(names, 10, seed=7, round=1) == names


@_ray
def test_small_weights_travel_inline_and_large_ones_once_by_reference(ray_local):
    from actors.coordinator import INLINE_WEIGHTS_BYTES, _broadcast

    small = np.arange(146, dtype=np.float32)
    assert _broadcast(small) is small
    large = np.arange(INLINE_WEIGHTS_BYTES // 4 + 1, dtype=np.float32)
    ref = _broadcast(large)
    assert isinstance(ref, ray.ObjectRef)
    assert np.array_equal(ray.get(ref), large)


# --- checkpoint files (no Ray) -------------------------------------------------


def _saved(folder, strategy_state, **changes):
    from actors import checkpoint

    args = dict(round=4, model="logreg", weights=np.arange(6, dtype=np.float32),
                strategy_state=strategy_state, data_key="k" * 16,
                hospitals=["hospital-00", "hospital-01", "hospital-02"],
                settings={"lr": 0.5},
                records=[{"round": 4, "auroc": np.float32(0.7), "loss": np.nan}])
    args.update(changes)
    return checkpoint.save(folder, **args)


def test_checkpoint_round_trips_fedadam_state_without_pickle(tmp_path):
    from actors import checkpoint
    from federation.aggregation import build_strategy

    strategy = build_strategy("fedadam")
    updates_state = strategy.state_dict()
    updates_state.update(m=np.full(6, 0.25), v=np.full(6, 0.5), steps=4)
    _saved(tmp_path, updates_state, round=3)
    _saved(tmp_path, updates_state)
    meta, weights, state = checkpoint.load(tmp_path)
    assert meta["round"] == 4 and meta["strategy_arrays"] == {"m": [6], "v": [6]}
    assert meta["records"] == [{"round": 4, "auroc": pytest.approx(0.7),
                                "loss": None}]
    assert np.array_equal(weights, np.arange(6, dtype=np.float32))
    assert np.array_equal(state["m"], np.full(6, 0.25)) and state["steps"] == 4
    strategy.load_state_dict(state)
    assert strategy.steps == 4
    # Only the newest arrays file is kept.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-r00004.npz", "checkpoint.json"]


def test_junk_or_tampered_checkpoint_is_refused_naming_the_file(tmp_path):
    import json

    from actors import checkpoint

    meta_path = _saved(tmp_path, {"name": "fedavg"})
    arrays = tmp_path / "checkpoint-r00004.npz"

    # Arrays altered: the hash no longer matches.
    original = arrays.read_bytes()
    arrays.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(checkpoint.CheckpointError, match=str(arrays)):
        checkpoint.load(tmp_path)

    # Arrays replaced by a pickled object array and the hash redone:
    # refused, never unpickled.
    np.savez(arrays, weights=np.array([object()], dtype=object))
    meta = json.loads(meta_path.read_text())
    meta["arrays_sha256"] = checkpoint._sha256(arrays)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(tmp_path)

    meta_path.write_bytes(b"\x80\x04junk")
    with pytest.raises(checkpoint.CheckpointError, match=str(meta_path)):
        checkpoint.load(tmp_path)
    meta_path.write_text(json.dumps({"version": 2, "round": "four"}))
    with pytest.raises(checkpoint.CheckpointError, match="'hospitals'|'round'"):
        checkpoint.load(tmp_path)
    meta_path.unlink()
    (tmp_path / "checkpoint.pkl").write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match="older checkpoint format"):
        checkpoint.load(tmp_path)

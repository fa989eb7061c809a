"""DataSpec validation and the prepared-array cache (prepare, load_hospital)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clinical.errors import DataError
from clinical.prepared import load_hospital, prepare
from clinical.spec import DataSpec

SYNTH = DataSpec(dataset="synthetic", synthetic_patients=20_000, hospitals=5, seed=2)


@pytest.mark.parametrize("field,value", [
    ("dataset", "mimic"), ("target", "death"), ("test_fraction", 1.0),
    ("val_fraction", -0.1), ("hospitals", 0), ("partition", "random"),
    ("alpha", 0.0), ("alpha", "0.5"), ("synthetic_patients", 10), ("seed", 1.5),
])
def test_spec_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError) as err:
        DataSpec(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_spec_key_is_stable_and_covers_every_field():
    assert DataSpec().key() == DataSpec().key()
    assert len(DataSpec().key()) == 16
    keys = {DataSpec().key(), DataSpec(seed=1).key(), DataSpec(alpha=0.6).key(),
            DataSpec(path="/x").key(), DataSpec(hospitals=3).key(),
            DataSpec(val_fraction=0.1).key()}
    assert len(keys) == 6


def _assert_partition(prepared, spec):
    joined = np.concatenate(prepared.parts)
    assert len(prepared.parts) == spec.hospitals
    assert np.array_equal(np.sort(joined), np.arange(len(prepared.y_train)))
    assert [h["name"] for h in prepared.hospitals] == [
        f"hospital-{i:02d}" for i in range(spec.hospitals)]
    for part, info in zip(prepared.parts, prepared.hospitals):
        assert info["size"] == len(part) == info["train"] + info["val"]
        assert info["label_rate"] == pytest.approx(prepared.y_train[part].mean())


def _assert_hospitals_match(prepared, spec, cache_dir):
    for index, part in enumerate(prepared.parts):
        data = load_hospital(spec, index, cache_dir=cache_dir)
        rows = np.concatenate([data.rows_train, data.rows_val])

        assert data.name == f"hospital-{index:02d}"
        assert np.array_equal(np.sort(rows), np.sort(part))
        assert np.array_equal(data.X_train, prepared.X_train[data.rows_train])
        assert np.array_equal(data.y_val, prepared.y_train[data.rows_val])
        assert data.X_train.dtype == np.float32 and data.y_train.dtype == np.float32
        assert set(np.unique(data.y_train)) <= {0.0, 1.0}
        assert len(data.y_val) == pytest.approx(spec.val_fraction * len(part),
                                                rel=0.1, abs=5)


def test_synthetic_prepare_and_hospitals(tmp_path):
    prepared = prepare(SYNTH, cache_dir=tmp_path)

    assert prepared.X_train.shape == (16_000, len(prepared.feature_names))
    assert prepared.X_test.shape[0] == 4_000
    assert "generated" in prepared.partition_note
    assert prepared.test_p_true.shape == (4_000,)
    assert 0.5 < prepared.bayes_auroc < 1.0
    _assert_partition(prepared, SYNTH)
    _assert_hospitals_match(prepared, SYNTH, tmp_path)


def test_cache_is_reused_and_gives_the_same_rows(tmp_path):
    first = prepare(SYNTH, cache_dir=tmp_path)
    meta = tmp_path / SYNTH.key() / "meta.json"
    stamp = meta.stat().st_mtime_ns

    second = prepare(SYNTH, cache_dir=tmp_path)
    rebuilt = prepare(SYNTH, cache_dir=tmp_path / "elsewhere")

    assert meta.stat().st_mtime_ns == stamp
    assert json.loads(meta.read_text())["spec"] == SYNTH.to_dict()
    for other in (second, rebuilt):
        assert np.array_equal(first.X_train, other.X_train)
        assert np.array_equal(first.y_test, other.y_test)
        assert all(np.array_equal(a, b) for a, b in zip(first.parts, other.parts))
        assert other.bayes_auroc == first.bayes_auroc
        assert other.hospitals == first.hospitals


def test_load_hospital_builds_a_missing_cache(tmp_path):
    data = load_hospital(SYNTH, 4, cache_dir=tmp_path)
    prepared = prepare(SYNTH, cache_dir=tmp_path)

    assert np.array_equal(np.sort(np.concatenate([data.rows_train, data.rows_val])),
                          prepared.parts[4])
    with pytest.raises(ValueError, match="hospital index 5"):
        load_hospital(SYNTH, 5, cache_dir=tmp_path)


def test_cache_dir_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(tmp_path))

    prepare(SYNTH)

    assert (tmp_path / SYNTH.key() / "meta.json").exists()
    assert not list((tmp_path / SYNTH.key()).glob("*.tmp"))


def test_missing_data_is_a_data_error(tmp_path):
    spec = DataSpec(path=str(tmp_path / "absent"))

    with pytest.raises(DataError, match="medfed data fetch"):
        prepare(spec, cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def real_natural(diabetes_zip, tmp_path_factory):
    spec = DataSpec(path=str(diabetes_zip), partition="natural", hospitals=6)
    cache = tmp_path_factory.mktemp("cache")
    return spec, cache, prepare(spec, cache_dir=cache)


def test_diabetes_natural_split_is_reported(real_natural):
    spec, cache, prepared = real_natural

    assert "no hospital identifier" in prepared.partition_note
    assert "admission_source_id" in prepared.partition_note
    assert prepared.test_p_true is None and prepared.bayes_auroc is None
    total = len(prepared.y_train) + len(prepared.y_test)
    assert total == 99_343
    assert len(prepared.y_test) / total == pytest.approx(0.2, abs=0.01)
    assert 0.10 < prepared.y_train.mean() < 0.13
    _assert_partition(prepared, spec)
    _assert_hospitals_match(prepared, spec, cache)


def test_diabetes_dirichlet_split_is_skewed(diabetes_zip, tmp_path):
    spec = DataSpec(path=str(diabetes_zip), partition="dirichlet", alpha=0.3,
                    hospitals=4, target="readmit_any")

    prepared = prepare(spec, cache_dir=tmp_path)

    rates = [h["label_rate"] for h in prepared.hospitals]
    assert max(rates) - min(rates) > 0.2
    assert "Dirichlet(alpha=0.3)" in prepared.partition_note
    _assert_partition(prepared, spec)


def test_unknown_natural_attribute_is_a_data_error(diabetes_zip, tmp_path):
    spec = DataSpec(path=str(diabetes_zip), partition="natural", attribute="ward")

    with pytest.raises(DataError, match="'ward'"):
        prepare(spec, cache_dir=tmp_path)


def _hospital_rows(args):
    spec, index, cache = args
    data = load_hospital(spec, index, cache_dir=cache)
    return np.sort(np.concatenate([data.rows_train, data.rows_val])).tolist()


def test_concurrent_first_loads_agree(tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(SYNTH, i % SYNTH.hospitals, str(tmp_path)) for i in range(4)]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=spawn) as pool:
        rows = list(pool.map(_hospital_rows, jobs))

    prepared = prepare(SYNTH, cache_dir=tmp_path)
    for (_, index, _), got in zip(jobs, rows):
        assert got == prepared.parts[index].tolist()
    assert not list((tmp_path / SYNTH.key()).glob("*.tmp"))

"""Prepared arrays for a run, built once per DataSpec and cached on disk.

`prepare` returns what the driver holds (pooled training rows, the held-out
test patients, the hospital partition); `load_hospital` returns what one
hospital actor holds (its own rows only, split into local train and
validation by patient).

Cache layout, under ``cache_dir`` (default ``$MEDFED_CACHE_DIR``, else
``~/.cache/medfed``), in a folder named ``spec.key()``:

- ``hospital-NN.npz``: one hospital's local train/validation arrays,
- ``prepared.npz``: pooled train, test and the partition,
- ``meta.json``: spec, feature names, per-hospital summary; written last, so
  its presence marks a complete cache.

Every file is written to a temporary name and renamed, so a reader never
sees half a file; builders of the same key take an exclusive ``flock`` so
ten actors starting together build once. The same spec gives the same rows
whether it was built in this process or read back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clinical import partition, synthetic
from clinical.split import split_by_patient
from clinical.errors import DataError
from clinical.spec import DataSpec

log = logging.getLogger(__name__)

META = "meta.json"
POOLED = "prepared.npz"


@dataclass
class HospitalData:
    """One hospital's rows: local training and validation, float32.

    X_*: features ``[n, d]``; y_*: labels ``[n]`` in {0, 1}.
    rows_train / rows_val: the same rows as indices into `Prepared.X_train`
    (for checks and audits; the actor needs only the arrays).
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    rows_train: np.ndarray | None = None
    rows_val: np.ndarray | None = None


@dataclass
class Prepared:
    """What the driver holds: pooled training rows, test rows, the partition.

    parts: per hospital, row indices into ``X_train`` (disjoint, covering).
    hospitals: per hospital ``{"name", "size", "label_rate", "train", "val"}``.
    partition_note: which split was used and why it is simulated.
    test_p_true / bayes_auroc: synthetic data only (true onset probability of
        each test patient, and the AUROC of those probabilities); else None.
    """

    spec: DataSpec
    feature_names: list[str]
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    parts: list[np.ndarray]
    hospitals: list[dict]
    partition_note: str
    test_p_true: np.ndarray | None
    bayes_auroc: float | None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns the cache folder: ``cache_dir``, $MEDFED_CACHE_DIR or ~/.cache/medfed."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MEDFED_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medfed"


def hospital_name(index: int) -> str:
    """Returns the name of hospital ``index``: "hospital-00", "hospital-01", ..."""
    return f"hospital-{index:02d}"


def prepare(spec: DataSpec, cache_dir: str | None = None) -> Prepared:
    """Returns the prepared arrays for ``spec``, building and caching them once.

    Raises DataError when the data cannot be read (see
    `clinical.diabetes130.load_raw`) or the spec does not fit the data.
    """
    folder = cache_root(cache_dir) / spec.key()
    cached = _read_pooled(spec, folder)
    if cached is not None:
        return cached

    with _build_lock(folder):
        # Another process may have finished the build while we waited.
        cached = _read_pooled(spec, folder)
        if cached is not None:
            return cached
        started = time.monotonic()
        prepared, hospital_data = _build(spec)
        _write(folder, prepared, hospital_data)
        log.info("prepared %s %s in %.1f s: %d train, %d test rows, %d features, "
                 "cache %s", spec.dataset, spec.key(), time.monotonic() - started,
                 len(prepared.y_train), len(prepared.y_test),
                 len(prepared.feature_names), folder)
    return prepared


def load_hospital(spec: DataSpec, index: int, cache_dir: str | None = None
                  ) -> HospitalData:
    """Returns hospital ``index``'s rows only, from the cache (built if absent).

    Reads one small file when the cache exists. Raises ValueError when
    ``index`` is not in ``0..spec.hospitals-1``.
    """
    if not 0 <= index < spec.hospitals:
        raise ValueError(
            f"hospital index {index} is out of range for {spec.hospitals} hospitals"
        )
    folder = cache_root(cache_dir) / spec.key()
    if not (folder / META).exists():
        prepare(spec, cache_dir)

    name = hospital_name(index)
    try:
        with np.load(folder / f"{name}.npz") as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"cache file {folder / (name + '.npz')} is unreadable ({exc}); delete "
            f"{folder} and run again"
        ) from exc
    return HospitalData(name=name, **arrays)


def _build(spec: DataSpec) -> tuple[Prepared, list[HospitalData]]:
    if spec.dataset == "diabetes130":
        prepared, patients = _build_diabetes(spec)
    else:
        prepared, patients = _build_synthetic(spec)

    hospital_data = []
    for h, rows in enumerate(prepared.parts):
        local_train, local_val = _local_split(patients[rows], spec, h)
        tr, va = rows[local_train], rows[local_val]
        hospital_data.append(HospitalData(
            name=hospital_name(h),
            X_train=prepared.X_train[tr], y_train=prepared.y_train[tr],
            X_val=prepared.X_train[va], y_val=prepared.y_train[va],
            rows_train=tr, rows_val=va,
        ))
        prepared.hospitals.append({
            "name": hospital_name(h),
            "size": int(len(rows)),
            "label_rate": float(prepared.y_train[rows].mean()) if len(rows) else 0.0,
            "train": int(len(tr)),
            "val": int(len(va)),
        })
    return prepared, hospital_data


def _local_split(patients: np.ndarray, spec: DataSpec, h: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Splits one hospital's rows into local train/validation by patient."""
    if spec.val_fraction == 0 or len(np.unique(patients)) < 2:
        return np.arange(len(patients)), np.arange(0)
    return split_by_patient(patients, spec.val_fraction,
                            seed=spec.seed * 1000 + 7 + h)


def _build_diabetes(spec: DataSpec) -> tuple[Prepared, np.ndarray]:
    # Imported here: pandas costs about a second to import, and hospital
    # actors reading a built cache never need it.
    from clinical import diabetes130, preprocess

    frame = preprocess.cohort(diabetes130.load_raw(spec.path))
    if spec.partition == "natural" and spec.attribute not in frame.columns:
        raise DataError(
            f"natural partition attribute {spec.attribute!r} is not a "
            f"Diabetes 130 column; use e.g. admission_source_id or payer_code"
        )
    y = preprocess.target(frame, spec.target)
    train_rows, test_rows = preprocess.split_by_patient(
        frame["patient_nbr"].to_numpy(), spec.test_fraction, spec.seed)
    train, test = frame.iloc[train_rows], frame.iloc[test_rows]

    pre = preprocess.Preprocessor().fit(train)
    X_train, X_test = pre.transform(train), pre.transform(test)
    y_train, y_test = y[train_rows], y[test_rows]

    groups = None
    if spec.partition == "natural":
        groups = train[spec.attribute].astype("string").fillna("missing").to_numpy(str)
    parts = partition.partition(y_train, spec.hospitals, spec.partition,
                                alpha=spec.alpha, groups=groups, seed=spec.seed)

    if spec.partition == "iid":
        how = "an IID random split of training encounters"
    elif spec.partition == "dirichlet":
        how = (f"Dirichlet(alpha={spec.alpha}) label skew over training "
               f"encounters (skew {partition.label_skew(parts, y_train):.3f} mean "
               "total-variation distance)")
    else:
        how = (f"a natural split by {spec.attribute}: each hospital draws mostly "
               "from one value, large groups split, small ones merged")
    note = (f"Diabetes 130 has no hospital identifier, so the {spec.hospitals} "
            f"hospitals are simulated: {how}; train/test split by patient.")

    prepared = Prepared(
        spec=spec, feature_names=pre.feature_names,
        X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test,
        parts=parts, hospitals=[], partition_note=note,
        test_p_true=None, bayes_auroc=None,
    )
    return prepared, frame["patient_nbr"].to_numpy()[train_rows]


def _build_synthetic(spec: DataSpec) -> tuple[Prepared, np.ndarray]:
    cohort = synthetic.generate(spec.synthetic_patients, spec.hospitals, spec.seed)
    train_rows, test_rows = split_by_patient(
        np.arange(len(cohort)), spec.test_fraction, spec.seed)

    stats = synthetic.fit_features(cohort, train_rows)
    X_train = synthetic.features(cohort, train_rows, stats)
    X_test = synthetic.features(cohort, test_rows, stats)
    y_train = cohort.label[train_rows].astype(np.float32)
    y_test = cohort.label[test_rows].astype(np.float32)
    p_true = cohort.p_true[test_rows]

    hospital = cohort.hospital[train_rows]
    parts = [np.flatnonzero(hospital == h) for h in range(spec.hospitals)]
    note = (f"Synthetic consortium: each patient's hospital is generated with "
            f"the patient (hospitals differ in age mix, prevalence and recorded "
            f"measurements), so the {spec.hospitals} hospitals are the generated "
            f"ones and partition={spec.partition!r} is not used.")

    prepared = Prepared(
        spec=spec, feature_names=synthetic.feature_names(),
        X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test,
        parts=parts, hospitals=[], partition_note=note,
        test_p_true=p_true, bayes_auroc=synthetic.auroc(y_test, p_true),
    )
    return prepared, train_rows


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write(path: Path, write) -> None:
    """Writes via ``write(file)`` to a temporary file, then renames onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write(folder: Path, prepared: Prepared, hospital_data: list[HospitalData]) -> None:
    folder.mkdir(parents=True, exist_ok=True)

    for data in hospital_data:
        arrays = {k: getattr(data, k) for k in
                  ("X_train", "y_train", "X_val", "y_val", "rows_train", "rows_val")}
        _atomic_write(folder / f"{data.name}.npz", lambda f, a=arrays: np.savez(f, **a))

    sizes = np.array([len(p) for p in prepared.parts], dtype=np.int64)
    pooled = {
        "X_train": prepared.X_train, "y_train": prepared.y_train,
        "X_test": prepared.X_test, "y_test": prepared.y_test,
        "parts_flat": (np.concatenate(prepared.parts) if prepared.parts
                       else np.zeros(0, np.int64)),
        "parts_sizes": sizes,
    }
    if prepared.test_p_true is not None:
        pooled["test_p_true"] = prepared.test_p_true
    _atomic_write(folder / POOLED, lambda f: np.savez(f, **pooled))

    meta = {
        "spec": prepared.spec.to_dict(),
        "feature_names": prepared.feature_names,
        "hospitals": prepared.hospitals,
        "partition_note": prepared.partition_note,
        "bayes_auroc": prepared.bayes_auroc,
    }
    _atomic_write(folder / META,
                  lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _read_pooled(spec: DataSpec, folder: Path) -> Prepared | None:
    """Returns the cached Prepared, or None when absent or unreadable."""
    if not (folder / META).exists():
        return None
    try:
        meta = json.loads((folder / META).read_text())
        with np.load(folder / POOLED) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("cache %s unreadable (%s); rebuilding", folder, exc)
        return None
    if meta["spec"] != spec.to_dict():
        log.warning("cache %s holds another spec; rebuilding", folder)
        return None

    offsets = np.cumsum(arrays["parts_sizes"])[:-1]
    return Prepared(
        spec=spec, feature_names=list(meta["feature_names"]),
        X_train=arrays["X_train"], y_train=arrays["y_train"],
        X_test=arrays["X_test"], y_test=arrays["y_test"],
        parts=list(np.split(arrays["parts_flat"], offsets)),
        hospitals=list(meta["hospitals"]),
        partition_note=meta["partition_note"],
        test_p_true=arrays.get("test_p_true"),
        bayes_auroc=meta["bayes_auroc"],
    )

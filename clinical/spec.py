"""DataSpec: everything that decides which arrays a run trains and tests on.

Two equal specs give identical arrays; `DataSpec.key` is the cache key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

DATASETS = ("diabetes130", "synthetic")
TARGETS = ("readmit30", "readmit_any")
PARTITIONS = ("iid", "dirichlet", "natural")
# Bump when the cache layout changes, so old caches are not reused.
FORMAT_VERSION = 1
# Bump whenever `clinical.preprocess` changes the features it produces. It
# lives here, not in that module, so that computing a cache key inside a
# hospital actor does not import pandas.
PREPROCESS_VERSION = 2


@dataclass(frozen=True)
class DataSpec:
    """Which data, target, split and hospital partition a run uses.

    dataset: "diabetes130" (real) or "synthetic" (`clinical.synthetic`).
    path: Diabetes 130 zip, CSV or folder; None reads ``$MEDFED_DATA_DIR``.
    target: "readmit30" (readmitted within 30 days) or "readmit_any".
        Ignored for "synthetic", whose label is diabetes onset in six months.
    seed: seeds the patient split, the partition and the synthetic draw.
    test_fraction: share of patients held out for testing, in (0, 1).
    val_fraction: share of each hospital's patients kept for local
        validation, in [0, 1).
    hospitals: number of hospitals, at least 1.
    partition: "iid", "dirichlet" or "natural" (Diabetes 130 only; the
        synthetic data always uses its generated hospitals).
    alpha: Dirichlet concentration, > 0 (small: strong label skew).
    attribute: Diabetes 130 column used by "natural".
    synthetic_patients: patients generated for "synthetic", at least 100.
    Raises ValueError naming the field and the value when one is invalid.
    """

    dataset: str = "diabetes130"
    path: str | None = None
    target: str = "readmit30"
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.15
    hospitals: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.5
    attribute: str = "admission_source_id"
    synthetic_patients: int = 100_000

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(
                f"DataSpec.{name}={getattr(self, name)!r} is invalid: {rule}"
            )

        if self.dataset not in DATASETS:
            raise bad("dataset", f"use one of {DATASETS}")
        if self.path is not None and not isinstance(self.path, str):
            raise bad("path", "give a string path or None")
        if self.target not in TARGETS:
            raise bad("target", f"use one of {TARGETS}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise bad("seed", "give an integer")
        for name in ("test_fraction", "val_fraction", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, "give a number")
        if not 0.0 < self.test_fraction < 1.0:
            raise bad("test_fraction", "must be in (0, 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", "must be in [0, 1)")
        if not isinstance(self.hospitals, int) or self.hospitals < 1:
            raise bad("hospitals", "must be an integer >= 1")
        if self.partition not in PARTITIONS:
            raise bad("partition", f"use one of {PARTITIONS}")
        if not self.alpha > 0:
            raise bad("alpha", "must be > 0")
        if not isinstance(self.attribute, str) or not self.attribute:
            raise bad("attribute", "give a Diabetes 130 column name")
        if (not isinstance(self.synthetic_patients, int)
                or self.synthetic_patients < 100):
            raise bad("synthetic_patients", "must be an integer >= 100")

    def to_dict(self) -> dict:
        """Returns the fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Returns a stable 16-hex-digit hash of all fields and the cache format.

        ``path=None`` hashes as None, not as the directory
        ``$MEDFED_DATA_DIR`` happens to name.
        """
        versions = {"format": FORMAT_VERSION, "preprocess": PREPROCESS_VERSION}
        text = json.dumps({**versions, **self.to_dict()},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

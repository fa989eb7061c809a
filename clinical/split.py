"""Patient-level split: every row of a patient lands on the same side.

Numpy only, so that hospital actors can use it without importing pandas.
"""

from __future__ import annotations

import numpy as np

from clinical.errors import DataError


def split_by_patient(
    patients: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits row indices so that each patient's rows are on one side.

    patients: one patient id per row. test_fraction: share of distinct
    patients put in the test set. The permutation of patients depends only
    on ``seed`` and the set of ids, so a seed reproduces the split.
    Returns (train_rows, test_rows), each sorted ascending.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    unique, inverse = np.unique(patients, return_inverse=True)
    rng = np.random.default_rng([seed, 0x5EED])
    order = rng.permutation(len(unique))
    n_test = int(round(test_fraction * len(unique)))
    is_test_patient = np.zeros(len(unique), dtype=bool)
    is_test_patient[order[:n_test]] = True
    is_test_row = is_test_patient[inverse]
    return np.flatnonzero(~is_test_row), np.flatnonzero(is_test_row)

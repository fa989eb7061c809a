"""Preprocessing: cohort, ICD-9 chapters, patient split, fit on training rows only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clinical import diabetes130, preprocess
from clinical.errors import DataError


@pytest.fixture(scope="module")
def frame(diabetes_zip) -> pd.DataFrame:
    return preprocess.cohort(diabetes130.load_raw(diabetes_zip))


def test_cohort_drops_death_and_hospice(frame):
    assert not frame["discharge_disposition_id"].isin(
        preprocess.DEATH_OR_HOSPICE).any()
    assert len(frame) == 99_343


def test_targets_match_readmitted_column(frame):
    y30 = preprocess.target(frame, "readmit30")
    y_any = preprocess.target(frame, "readmit_any")

    assert y30.dtype == np.float32
    assert y30.sum() == (frame["readmitted"] == "<30").sum()
    assert y_any.sum() == (frame["readmitted"] != "NO").sum()
    assert np.all(y_any >= y30)
    with pytest.raises(DataError, match="'mortality'"):
        preprocess.target(frame, "mortality")


def test_icd9_chapters():
    codes = pd.Series(["250.83", "250", "428", "785", "486", "786", "530", "787",
                       "996", "715", "599", "788", "162", "V57", "E888", "276",
                       np.nan])
    expected = ["diabetes", "diabetes", "circulatory", "circulatory",
                "respiratory", "respiratory", "digestive", "digestive", "injury",
                "musculoskeletal", "genitourinary", "genitourinary", "neoplasms",
                "other", "other", "other", "missing"]

    assert preprocess.icd9_chapter(codes).tolist() == expected


def test_split_puts_each_patient_on_one_side(frame):
    patients = frame["patient_nbr"].to_numpy()

    train, test = preprocess.split_by_patient(patients, 0.2, seed=3)

    assert len(train) + len(test) == len(frame)
    assert not set(patients[train]) & set(patients[test])
    share = len(set(patients[test])) / len(set(patients))
    assert share == pytest.approx(0.2, abs=1e-4)


def test_split_is_deterministic_by_seed(frame):
    patients = frame["patient_nbr"].to_numpy()

    a = preprocess.split_by_patient(patients, 0.2, seed=1)
    b = preprocess.split_by_patient(patients, 0.2, seed=1)
    c = preprocess.split_by_patient(patients, 0.2, seed=2)

    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_fit_uses_training_rows_only(frame):
    train, test = preprocess.split_by_patient(frame["patient_nbr"].to_numpy(),
                                              0.2, seed=0)
    base = preprocess.Preprocessor().fit(frame.iloc[train])

    # Refit with the same training rows but a different test set around them:
    # nothing learned may change, and training features must be identical.
    altered = frame.copy()
    altered.loc[altered.index[test], "num_medications"] = 999
    altered.loc[altered.index[test], "race"] = "Martian"
    again = preprocess.Preprocessor().fit(altered.iloc[train])

    assert again.mean == base.mean and again.std == base.std
    assert again.categories == base.categories
    assert np.array_equal(base.transform(frame.iloc[train]),
                          again.transform(altered.iloc[train]))

    # An unseen category in test rows lands in "other", not in a new column.
    X_test = again.transform(altered.iloc[test])
    other = again.feature_names.index("race=other")
    assert X_test.shape[1] == len(base.feature_names)
    assert np.all(X_test[:, other] == 1)


def test_features_are_standardised_and_rare_levels_grouped(frame):
    pre = preprocess.Preprocessor().fit(frame)
    X = pre.transform(frame)

    assert X.dtype == np.float32 and np.isfinite(X).all()
    numeric = X[:, : len(preprocess.NUMERIC)].astype(np.float64)
    assert np.allclose(numeric.mean(axis=0), 0, atol=1e-3)
    assert np.allclose(numeric.std(axis=0), 1, atol=1e-3)
    # Asian (0.6 % of rows) clears the 0.2 % threshold; Endocrinology (119
    # rows, 0.12 %) and Unknown/Invalid gender (3 rows) do not.
    assert "race=Asian" in pre.feature_names
    assert "medical_specialty=Endocrinology" not in pre.feature_names
    assert "gender=Unknown/Invalid" not in pre.feature_names
    # Each categorical contributes exactly one 1 per row.
    n_num = len(preprocess.NUMERIC)
    assert np.all(X[:, n_num:].sum(axis=1) == len(preprocess.CATEGORICAL))


def test_kept_levels_are_exactly_those_over_the_threshold(frame):
    pre = preprocess.Preprocessor(rare_fraction=0.005).fit(frame)

    for column in ("medical_specialty", "payer_code", "discharge_disposition_id"):
        counts = frame[column].astype("string").fillna("missing").value_counts()
        over = sorted(str(c) for c, k in counts.items() if k >= 0.005 * len(frame))
        assert pre.categories[column] == over, column


def test_counts_are_log1p_and_missing_is_a_level(frame):
    rows = frame.iloc[:2000]
    pre = preprocess.Preprocessor().fit(rows)
    X = pre.transform(rows)

    column = preprocess.NUMERIC.index("number_inpatient")
    logged = np.log1p(rows["number_inpatient"].to_numpy(float))
    expected = (logged - logged.mean()) / logged.std()
    assert np.allclose(X[:, column], expected, atol=1e-5)

    missing = pre.feature_names.index("medical_specialty=missing")
    assert np.array_equal(X[:, missing] == 1,
                          rows["medical_specialty"].isna().to_numpy())


def test_logistic_regression_reaches_reference_auroc(frame):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    train, test = preprocess.split_by_patient(frame["patient_nbr"].to_numpy(),
                                              0.2, seed=0)
    y = preprocess.target(frame, "readmit30")
    pre = preprocess.Preprocessor().fit(frame.iloc[train])

    model = LogisticRegression(max_iter=1000).fit(
        pre.transform(frame.iloc[train]), y[train])
    score = model.predict_proba(pre.transform(frame.iloc[test]))[:, 1]

    # Measured 0.660 at seed 0 (0.656 with the 1 % threshold and no specialty
    # or payer); reference with LR 0.670. Leakage would push it far higher.
    assert 0.655 < roc_auc_score(y[test], score) < 0.70

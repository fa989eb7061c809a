"""Synthetic consortium: plausible rates, a known ceiling, hospitals that differ."""

from __future__ import annotations

import numpy as np
import pytest

from clinical import synthetic


@pytest.fixture(scope="module")
def cohort() -> synthetic.Cohort:
    return synthetic.generate(60_000, hospitals=6, seed=11)


def test_findrisc_points_match_the_published_table():
    # Man, 58, BMI 31, waist 105 cm, inactive, no daily vegetables, on BP
    # medication, high glucose before, a parent with diabetes: 3+3+4+2+1+2+5+5.
    high = synthetic.findrisc_points(
        np.array([58.0]), np.array([31.0]), np.array([105.0]), np.array([True]),
        np.array([False]), np.array([False]), np.array([True]),
        np.array([True]), np.array([2]))
    # Woman, 40, BMI 22, waist 75 cm, active, vegetables daily, nothing else.
    low = synthetic.findrisc_points(
        np.array([40.0]), np.array([22.0]), np.array([75.0]), np.array([False]),
        np.array([True]), np.array([True]), np.array([False]),
        np.array([False]), np.array([0]))
    # Woman, 50, BMI 27, waist 85 cm, active, vegetables, grandparent: 2+1+3+3.
    mid = synthetic.findrisc_points(
        np.array([50.0]), np.array([27.0]), np.array([85.0]), np.array([False]),
        np.array([True]), np.array([True]), np.array([False]),
        np.array([False]), np.array([1]))

    assert high.tolist() == [25] and low.tolist() == [0] and mid.tolist() == [9]


def test_annual_risk_follows_findrisc_bands():
    ten_year = 1 - (1 - synthetic.annual_from_findrisc(np.array([3.5, 9, 13, 23])))**10

    assert ten_year == pytest.approx([0.01, 0.04, 0.17, 0.50], rel=1e-6)


def test_cohort_is_diabetes_free_and_rates_plausible(cohort):
    hba1c = cohort.values["hba1c"]
    fpg = cohort.values["fasting_glucose"]

    assert len(cohort) == 60_000
    assert np.nanmax(hba1c) < 6.5 and np.nanmax(fpg) < 126
    assert 0.01 < cohort.label.mean() < 0.06
    assert cohort.label.mean() == pytest.approx(cohort.p_true.mean(), abs=0.004)
    assert np.all((cohort.p_true >= 0) & (cohort.p_true < 0.5))


def test_prediabetes_progresses_faster(cohort):
    hba1c = cohort.values["hba1c"]
    recorded = ~np.isnan(hba1c)
    annual = 1 - (1 - cohort.p_true) ** 2
    pre = recorded & (hba1c >= 5.7)
    normal = recorded & (hba1c < 5.5)

    # Gerstein 2007: 5-10 %/year; DPP placebo 11/100 person-years.
    assert 0.05 < annual[pre].mean() < 0.15
    assert annual[normal].mean() < 0.03


def test_bayes_auroc_beats_a_simple_model(cohort):
    from sklearn.linear_model import LogisticRegression

    rows = np.arange(len(cohort))
    train, test = rows[:40_000], rows[40_000:]
    stats = synthetic.fit_features(cohort, train)
    model = LogisticRegression(max_iter=500).fit(
        synthetic.features(cohort, train, stats), cohort.label[train])
    simple = synthetic.auroc(
        cohort.label[test],
        model.predict_proba(synthetic.features(cohort, test, stats))[:, 1])
    bayes = synthetic.auroc(cohort.label[test], cohort.p_true[test])

    assert 0.5 < simple < bayes < 1.0
    assert bayes - simple > 0.01


def test_hospitals_differ(cohort):
    h = cohort.hospital
    age = [cohort.values["age"][h == k].mean() for k in range(6)]
    missing = [np.isnan(cohort.values["hba1c"][h == k]).mean() for k in range(6)]
    rate = [cohort.p_true[h == k].mean() for k in range(6)]

    assert set(np.unique(h)) == set(range(6))
    assert max(age) - min(age) > 5
    assert max(missing) - min(missing) > 0.2
    assert max(rate) / min(rate) > 1.3


def test_generation_is_deterministic():
    a = synthetic.generate(2_000, 4, seed=3)
    b = synthetic.generate(2_000, 4, seed=3)
    c = synthetic.generate(2_000, 4, seed=4)

    assert np.array_equal(a.p_true, b.p_true) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.p_true, c.p_true)


def test_features_impute_and_flag_missing(cohort):
    rows = np.arange(5_000)
    stats = synthetic.fit_features(cohort, rows)

    X = synthetic.features(cohort, rows, stats)
    names = synthetic.feature_names()

    assert X.shape == (5_000, len(names)) and np.isfinite(X).all()
    flag = X[:, names.index("hba1c_missing")]
    value = X[:, names.index("hba1c")]
    assert np.array_equal(flag == 1, np.isnan(cohort.values["hba1c"][rows]))
    assert np.all(value[flag == 1] == 0)


def test_auroc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(3_000) < 0.2
    score = np.round(rng.random(3_000) + 0.3 * y, 2)  # with ties

    assert synthetic.auroc(y, score) == pytest.approx(roc_auc_score(y, score))

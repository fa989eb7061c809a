"""Metrics against scikit-learn and against hand-computed calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    roc_auc_score,
)

from federation.metrics import binary_metrics


def test_matches_scikit_learn_on_random_data():
    rng = np.random.default_rng(7)
    y = (rng.random(2000) < 0.2).astype(float)
    p = np.clip(0.2 + 0.3 * (y - 0.2) + 0.2 * rng.standard_normal(2000), 0, 1)
    m = binary_metrics(y, p)

    assert m["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5), abs=1e-12)
    assert m["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_ranking_scores_match_scikit_learn_with_ties(seed, decimals):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 3000))
    y = (rng.random(n) < rng.uniform(0.02, 0.6)).astype(float)
    y[0], y[1] = 0, 1
    p = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    if decimals is not None:
        p = np.round(p, decimals)  # many tied scores
    m = binary_metrics(y, p)

    assert m["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_ranking_scores_extremes():
    y = np.array([0, 0, 1, 1])

    assert binary_metrics(y, np.array([0.1, 0.2, 0.8, 0.9]))["auroc"] == 1.0
    assert binary_metrics(y, np.array([0.9, 0.8, 0.2, 0.1]))["auroc"] == 0.0
    constant = binary_metrics(y, np.full(4, 0.3))
    assert constant["auroc"] == 0.5 and constant["auprc"] == 0.5


def test_ece_and_reliability_curve_by_hand():
    # Bin 1 (0.1-0.2): p 0.15 x2, one positive -> |0.15-0.5| = 0.35
    # Bin 8 (0.8-0.9): p 0.85 x2, both positive -> |0.85-1.0| = 0.15
    # p = 1.0 falls in the last bin; positive -> error 0.
    y = np.array([0, 1, 1, 1, 1])
    p = np.array([0.15, 0.15, 0.85, 0.85, 1.0])
    m = binary_metrics(y, p)
    cal = m["calibration"]

    assert cal["bin_count"] == [0, 2, 0, 0, 0, 0, 0, 0, 2, 1]
    assert cal["bin_mean_p"][1] == pytest.approx(0.15)
    assert cal["bin_frac_pos"][8] == pytest.approx(1.0)
    assert cal["bin_mean_p"][0] is None and cal["bin_frac_pos"][0] is None
    assert m["ece"] == pytest.approx((2 * 0.35 + 2 * 0.15 + 0) / 5)


def test_perfectly_calibrated_has_small_ece():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(float)

    assert binary_metrics(y, p)["ece"] < 0.01


def test_single_class_gives_nan_auroc_not_an_error():
    m = binary_metrics(np.zeros(5), np.full(5, 0.3))

    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"])
    assert m["accuracy"] == 1.0


def test_outcomes_other_than_0_1_rejected():
    with pytest.raises(ValueError, match=r"outcomes must be 0 or 1, found \[1.0, 2"):
        binary_metrics(np.array([1, 2]), np.array([0.2, 0.3]))


def test_logits_instead_of_probabilities_rejected():
    with pytest.raises(ValueError, match="not logits"):
        binary_metrics(np.array([0, 1]), np.array([-2.0, 3.0]))

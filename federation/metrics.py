"""Discrimination and calibration of a binary clinical risk model.

``binary_metrics`` scores predicted probabilities against 0/1 outcomes:

- AUROC and AUPRC (average precision, the step-wise sum of precision times
  recall gained, without interpolation). Both come from one sort of the
  scores, with tied scores forming one threshold; the definitions are those of
  scikit-learn's ``roc_auc_score`` and ``average_precision_score`` and the
  tests check agreement. scikit-learn is not imported: its import alone takes
  1-2 s, paid again by every hospital process, and its input checks make
  each call about ten times slower. On a rare outcome such as 30-day
  readmission (about 11 %), AUPRC is read against the outcome rate, which is
  its value for a random model.
- Accuracy at a 0.5 threshold; on a rare outcome this says little, since
  always answering "no" scores one minus the outcome rate.
- Brier score: mean squared error of the probabilities (lower is better).
- Expected calibration error (ECE) over 10 equal-width probability bins,
  Naeini et al. 2015, "Obtaining Well Calibrated Probabilities Using Bayesian
  Binning" (AAAI): the bin-count-weighted mean of
  ``|mean predicted - observed fraction|``.
- The 10-bin reliability curve behind the ECE, for plots.
"""

from __future__ import annotations

import math

import numpy as np

N_BINS = 10


def ranking_scores(y_true: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Returns ``(auroc, average_precision)`` of scores ``p`` for 0/1 outcomes.

    Both need at least one positive and one negative; the caller checks.
    """
    # Order within a run of tied scores does not matter (a run is one
    # threshold), so the fast unstable sort will do.
    order = np.argsort(-p)
    p_sorted, y_sorted = p[order], y_true[order]

    # One threshold per distinct score: the last index of each run of ties.
    last = np.flatnonzero(np.diff(p_sorted)) if p_sorted.size > 1 else np.empty(0, int)
    last = np.r_[last, p_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    positives, negatives = tps[-1], fps[-1]

    tpr = np.r_[0.0, tps / positives]
    fpr = np.r_[0.0, fps / negatives]
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))

    precision = tps / (tps + fps)
    average_precision = float(np.sum(np.diff(tpr) * precision))
    return auroc, average_precision


def calibration_bins(y_true: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Returns the reliability curve over ``n_bins`` equal-width bins of [0, 1].

    ``{"bin_mean_p", "bin_frac_pos", "bin_count"}``, one entry per bin; an empty
    bin has count 0 and ``None`` for its mean and fraction (JSON-safe).
    Bin ``i`` holds ``i/n <= p < (i+1)/n``; ``p = 1`` falls in the last bin.
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    index = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    sum_p = np.bincount(index, weights=p, minlength=n_bins)
    sum_y = np.bincount(index, weights=y_true, minlength=n_bins)

    mean_p, frac_pos = [], []
    for c, sp, sy in zip(count, sum_p, sum_y):
        mean_p.append(float(sp / c) if c else None)
        frac_pos.append(float(sy / c) if c else None)
    return {
        "bin_mean_p": mean_p,
        "bin_frac_pos": frac_pos,
        "bin_count": [int(c) for c in count],
    }


def expected_calibration_error(curve: dict) -> float:
    """Returns the ECE of a reliability curve from ``calibration_bins``."""
    total = sum(curve["bin_count"])
    if total == 0:
        return math.nan
    err = 0.0
    bins = zip(curve["bin_count"], curve["bin_mean_p"], curve["bin_frac_pos"])
    for c, mp, fp in bins:
        if c:
            err += c * abs(mp - fp)
    return err / total


def binary_metrics(y_true: np.ndarray, p: np.ndarray) -> dict:
    """Scores probabilities ``p`` (in [0, 1]) against outcomes ``y_true`` (0/1).

    Returns ``{"auroc", "auprc", "accuracy", "brier", "ece", "calibration"}``
    with plain Python floats. AUROC and AUPRC are NaN when only one class is
    present (they are undefined there), rather than raising.
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if y_true.shape != p.shape:
        raise ValueError(
            f"{y_true.size} outcomes but {p.size} probabilities; they must match"
        )
    if y_true.size == 0:
        raise ValueError("no rows to score")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError(
            f"probabilities must be finite and in [0, 1], got range "
            f"[{np.nanmin(p)}, {np.nanmax(p)}]; pass sigmoid outputs, not logits"
        )

    if not np.all((y_true == 0) | (y_true == 1)):
        raise ValueError(
            f"outcomes must be 0 or 1, found {np.unique(y_true)[:5].tolist()}"
        )
    both_classes = 0 < y_true.sum() < y_true.size
    auroc, auprc = ranking_scores(y_true, p) if both_classes else (math.nan, math.nan)
    curve = calibration_bins(y_true, p)
    return {
        "auroc": auroc,
        "auprc": auprc,
        "accuracy": float(np.mean((p >= 0.5) == (y_true == 1))),
        "brier": float(np.mean((p - y_true) ** 2)),
        "ece": float(expected_calibration_error(curve)),
        "calibration": curve,
    }

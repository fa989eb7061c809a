"""A synthetic diabetes-onset consortium whose risk comes from published factors.

Each patient is an adult without diabetes at baseline (HbA1c < 6.5 %,
fasting glucose < 126 mg/dL) in one of ``hospitals`` hospitals. The label is
onset of Type 2 diabetes within six months, drawn as Bernoulli(p) from a
true probability ``p`` that every patient carries, so the best possible
AUROC on any test set is known (`bayes_auroc`).

Where the risk comes from:

- FINDRISC (Lindstrom J, Tuomilehto J. The Diabetes Risk Score. Diabetes
  Care 2003;26:725-731). Points: age 45-54: 2, 55-64: 3, >64: 4; BMI 25-30:
  1, >30: 3; waist (men 94-102 / women 80-88 cm): 3, above: 4; less than
  30 minutes of activity a day: 2; no vegetables or fruit every day: 1;
  blood-pressure medication: 2; history of high blood glucose: 5; family
  history second-degree: 3, first-degree: 5. Ten-year risk by score band:
  <7: about 1 %; 7-11: 4 %; 12-14: 17 %; 15-20: 33 %; >20: 50 %.
- ADA/CDC diabetes risk test (Bang H et al. Development and validation of a
  patient self-assessment score for diabetes risk. Ann Intern Med
  2009;151:775-783): men, and black, Hispanic and Asian ethnicity, carry
  higher risk at the same age and BMI; used as hazard ratios here.
- Prediabetes: HbA1c 5.7-6.4 % or fasting glucose 100-125 mg/dL (ADA
  Standards of Care). Progression from prediabetes about 5-10 % a year
  (Gerstein HC et al. Diabetes Res Clin Pract 2007;78:305-312); the DPP
  placebo arm saw 11 cases per 100 person-years (Knowler WC et al. N Engl
  J Med 2002;346:393-403).

The annual hazard is the FINDRISC ten-year risk converted to a yearly one,
1 - (1 - r10)^(1/10), interpolated smoothly between band midpoints, then
multiplied by the glycaemia and ethnicity/sex hazard ratios and by a
hospital factor. Six-month risk is 1 - (1 - annual)^0.5.

Hospitals differ in age mix, ethnic mix, BMI, baseline hazard, and in which
measurements they record: an unrecorded value is missing, and becomes a
missing-indicator feature plus an imputed value in `features`. So a split by
hospital is non-IID by construction, and the hospital of each patient is
generated rather than simulated afterwards.

Known shortcoming: this is a simulation calibrated by construction to the
published figures above, not a validated cohort; correlations between the
factors are simple linear ones chosen to be plausible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

ETHNICITIES = ("white", "black", "hispanic", "asian", "other")
# Hazard ratios relative to white women (after Bang et al. 2009, where male
# sex and non-white ethnicity add points at equal age and BMI).
ETHNICITY_HR = np.array([1.0, 1.5, 1.5, 1.6, 1.2])
MALE_HR = 1.3

# FINDRISC score band midpoints and their ten-year risks (Lindstrom 2003).
FINDRISC_SCORE = np.array([0.0, 3.5, 9.0, 13.0, 17.5, 23.0, 26.0])
FINDRISC_RISK10 = np.array([0.005, 0.01, 0.04, 0.17, 0.33, 0.50, 0.60])

NUMERIC = ("age", "bmi", "waist_cm", "systolic_bp", "diastolic_bp", "hba1c",
           "fasting_glucose")
BINARY = ("male", "family_history_second", "family_history_first",
          "daily_activity", "daily_vegetables", "bp_medication",
          "high_glucose_history")
RECORDED = ("waist_cm", "systolic_bp", "diastolic_bp", "hba1c", "fasting_glucose")


@dataclass
class Cohort:
    """Generated patients: columns as arrays of equal length ``n``.

    values: name -> float array; recorded measurements are NaN where the
        patient's hospital did not record them (see ``RECORDED``).
    ethnicity: int index into ``ETHNICITIES``.
    hospital: int hospital index per patient.
    p_true: six-month onset probability; label: 0/1 draw from it.
    """

    values: dict[str, np.ndarray]
    ethnicity: np.ndarray
    hospital: np.ndarray
    p_true: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def findrisc_points(
    age: np.ndarray, bmi: np.ndarray, waist: np.ndarray, male: np.ndarray,
    activity: np.ndarray, vegetables: np.ndarray, bp_med: np.ndarray,
    high_glucose: np.ndarray, family: np.ndarray,
) -> np.ndarray:
    """Returns the FINDRISC score (0-26) per patient (Lindstrom 2003 points).

    family: 0 none, 1 second-degree relative, 2 first-degree relative.
    """
    points = np.select([age >= 65, age >= 55, age >= 45], [4, 3, 2], 0)
    points += np.select([bmi > 30, bmi >= 25], [3, 1], 0)
    low, high = np.where(male, 94.0, 80.0), np.where(male, 102.0, 88.0)
    points += np.select([waist > high, waist >= low], [4, 3], 0)
    points += np.where(activity, 0, 2)
    points += np.where(vegetables, 0, 1)
    points += np.where(bp_med, 2, 0)
    points += np.where(high_glucose, 5, 0)
    points += np.select([family == 2, family == 1], [5, 3], 0)
    return points


def annual_from_findrisc(score: np.ndarray) -> np.ndarray:
    """Annual hazard from the FINDRISC score, via the band ten-year risks."""
    log_risk = np.interp(score, FINDRISC_SCORE, np.log(FINDRISC_RISK10))
    risk10 = np.exp(log_risk)
    return 1.0 - (1.0 - risk10) ** 0.1


def glycaemia_hr(hba1c: np.ndarray, fpg: np.ndarray) -> np.ndarray:
    """Hazard ratio for measured glycaemia against a normoglycaemic reference.

    Chosen so that, with the FINDRISC baseline, prediabetic patients
    (HbA1c 5.7-6.4 % or fasting glucose 100-125 mg/dL) progress at roughly
    5-15 % a year, bracketing Gerstein 2007 and the DPP placebo arm.
    """
    return np.exp(0.9 * np.clip(hba1c - 5.4, 0, None) / 0.5
                  + 0.5 * np.clip(fpg - 95.0, 0, None) / 15.0)


def generate(n: int, hospitals: int, seed: int = 0) -> Cohort:
    """Generates ``n`` diabetes-free adults spread over ``hospitals`` hospitals.

    Deterministic in (n, hospitals, seed). Vectorised: a million patients
    take 1-3 s on one core and about 350 MB at peak (measured by
    benchmarks/synthetic_generation.py).
    """
    if n < 1 or hospitals < 1:
        raise ValueError(f"need n >= 1 and hospitals >= 1, got n={n}, "
                         f"hospitals={hospitals}")
    rng = np.random.default_rng([seed, 0x5A17])
    site = _hospital_profiles(hospitals, rng)

    # Draw with headroom, keep the diabetes-free ones; repeat if short.
    chunks: list[dict[str, np.ndarray]] = []
    have = 0
    while have < n:
        chunk = _draw(int((n - have) * 1.25) + 64, site, rng)
        chunks.append(chunk)
        have += len(chunk["age"])
    cols = {k: np.concatenate([c[k] for c in chunks])[:n] for k in chunks[0]}

    label = (rng.random(n) < cols["p_true"]).astype(np.int8)
    values = {k: cols[k] for k in (*NUMERIC, *BINARY)}
    for name in RECORDED:
        recorded = rng.random(n) < site["record"][name][cols["hospital"]]
        values[name] = np.where(recorded, values[name], np.nan)

    log.info("synthetic cohort: %d patients, %d hospitals, onset rate %.4f",
             n, hospitals, label.mean())
    return Cohort(values=values, ethnicity=cols["ethnicity"].astype(np.int8),
                  hospital=cols["hospital"].astype(np.int32),
                  p_true=cols["p_true"], label=label)


def _hospital_profiles(hospitals: int, rng: np.random.Generator) -> dict:
    """Per-hospital size, case mix, baseline hazard and recording habits."""
    return {
        "weight": rng.dirichlet(np.full(hospitals, 4.0)),
        "age_mean": rng.uniform(42.0, 64.0, hospitals),
        "bmi_shift": rng.normal(0.0, 1.5, hospitals),
        "ethnic_mix": rng.dirichlet([6.0, 1.5, 1.5, 0.8, 0.5], hospitals),
        "hazard": np.exp(rng.normal(0.0, 0.3, hospitals)),
        "record": {
            "waist_cm": rng.uniform(0.2, 0.9, hospitals),
            "systolic_bp": rng.uniform(0.6, 1.0, hospitals),
            "diastolic_bp": np.ones(hospitals),
            "hba1c": rng.uniform(0.25, 0.95, hospitals),
            "fasting_glucose": rng.uniform(0.2, 0.9, hospitals),
        },
    }


def _draw(m: int, site: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draws ``m`` candidates and returns the diabetes-free ones with p_true."""
    hospitals = len(site["weight"])
    hospital = rng.choice(hospitals, size=m, p=site["weight"])

    # Demographics, following each hospital's case mix.
    age = np.clip(rng.normal(site["age_mean"][hospital], 13.0), 20.0, 90.0)
    male = rng.random(m) < 0.48
    cum = np.cumsum(site["ethnic_mix"], axis=1)[hospital]
    ethnicity = (rng.random(m)[:, None] > cum).sum(axis=1).clip(0, len(ETHNICITIES) - 1)

    # Body size and lifestyle.
    bmi = np.clip(rng.lognormal(np.log(27.0), 0.18, m)
                  + site["bmi_shift"][hospital] + 0.03 * (age - 50), 16.0, 60.0)
    waist = np.clip(25.0 + 2.4 * bmi + 7.0 * male + rng.normal(0, 6.0, m), 55, 170)
    activity = rng.random(m) < np.clip(0.62 - 0.004 * (age - 50)
                                       - 0.015 * (bmi - 27), 0.1, 0.9)
    vegetables = rng.random(m) < 0.55
    family = rng.choice(3, size=m, p=[0.55, 0.15, 0.30])

    # Blood pressure and its treatment.
    sbp_raw = 118 + 0.55 * (age - 45) + 0.9 * (bmi - 27) + rng.normal(0, 13, m)
    bp_med = rng.random(m) < 1 / (1 + np.exp(-(sbp_raw - 142) / 8))
    sbp = np.clip(sbp_raw - 10 * bp_med, 85, 220)
    dbp = np.clip(0.45 * sbp + 18 + rng.normal(0, 7, m), 45, 130)

    # Glycaemia rises with age, adiposity, family history and ethnicity.
    drive = (0.010 * (age - 50) + 0.035 * (bmi - 27) + 0.12 * family
             + 0.12 * (ethnicity > 0) + rng.normal(0, 0.33, m))
    hba1c = np.round(5.3 + drive, 1)
    fpg = np.round(94 + 16 * drive + rng.normal(0, 7, m))
    # FINDRISC's "ever found high glucose": a quarter of prediabetic people
    # have been told so before, a few others after a transient reading.
    prediabetic = (hba1c >= 5.7) | (fpg >= 100)
    high_glucose = rng.random(m) < 0.04 + 0.25 * prediabetic

    # Risk: FINDRISC baseline x glycaemia x Bang 2009 ratios x hospital.
    score = findrisc_points(age, bmi, waist, male, activity, vegetables, bp_med,
                            high_glucose, family)
    annual = (annual_from_findrisc(score) * glycaemia_hr(hba1c, fpg)
              * ETHNICITY_HR[ethnicity] * np.where(male, MALE_HR, 1.0)
              * site["hazard"][hospital])
    annual = np.clip(annual, 0.0, 0.6)
    p_true = 1.0 - (1.0 - annual) ** 0.5

    keep = (hba1c < 6.5) & (fpg < 126)
    cols = {
        "hospital": hospital, "age": age, "male": male, "ethnicity": ethnicity,
        "bmi": bmi, "waist_cm": waist, "systolic_bp": sbp, "diastolic_bp": dbp,
        "hba1c": hba1c, "fasting_glucose": fpg,
        "family_history_second": family == 1, "family_history_first": family == 2,
        "daily_activity": activity, "daily_vegetables": vegetables,
        "bp_medication": bp_med, "high_glucose_history": high_glucose,
        "p_true": p_true,
    }
    return {k: np.asarray(v)[keep] for k, v in cols.items()}


@dataclass
class FeatureStats:
    """Training-only statistics for `features`: mean and std of recorded values."""

    mean: dict[str, float]
    std: dict[str, float]


def fit_features(cohort: Cohort, rows: np.ndarray) -> FeatureStats:
    """Learns imputation and scaling from the given (training) rows only."""
    mean, std = {}, {}
    for name in NUMERIC:
        v = cohort.values[name][rows]
        v = v[~np.isnan(v)]
        mean[name] = float(v.mean()) if len(v) else 0.0
        std[name] = float(v.std()) if len(v) > 1 and v.std() > 0 else 1.0
    return FeatureStats(mean, std)


def feature_names() -> list[str]:
    """Names of the columns `features` returns, in order."""
    return ([*NUMERIC, *BINARY]
            + [f"ethnicity={e}" for e in ETHNICITIES]
            + [f"{name}_missing" for name in RECORDED])


def features(cohort: Cohort, rows: np.ndarray, stats: FeatureStats) -> np.ndarray:
    """Returns float32 features for ``rows``: standardised numbers (missing ones
    imputed with the training mean, i.e. 0), 0/1 flags, one-hot ethnicity and
    one missing indicator per recorded measurement."""
    blocks = []
    for name in NUMERIC:
        v = (cohort.values[name][rows] - stats.mean[name]) / stats.std[name]
        blocks.append(np.nan_to_num(v, nan=0.0))
    for name in BINARY:
        blocks.append(cohort.values[name][rows].astype(float))
    eth = cohort.ethnicity[rows]
    for k in range(len(ETHNICITIES)):
        blocks.append((eth == k).astype(float))
    for name in RECORDED:
        blocks.append(np.isnan(cohort.values[name][rows]).astype(float))
    return np.column_stack(blocks).astype(np.float32)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties
    counted half. Returns NaN if only one class is present."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s))
    # Average ranks over ties.
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

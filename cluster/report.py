"""The report of one federated run: metrics.json, report.md and two plots.

``write_report(out_dir, results)`` renders the results dict a run produces
into files a clinician-researcher can read:

- ``metrics.json``: the results themselves, made JSON-safe (numpy values
  become plain numbers and lists; NaN and infinities become ``null``).
- ``report.md``: the data set and how it was split into hospitals, a summary
  table (federated vs centralised vs local-only vs the Bayes limit where
  known) opened by a warning when rounds failed, plain-language notes that
  apply to this run (calibration gap, simulated label skew, what DP covers),
  the hospital table, the per-round table, failures, privacy and the audit
  ledger's head, each section only when its part of the results exists; the
  engineering details (Ray, node ids, phase seconds, full configuration)
  come last under "Run details".
- ``auroc_per_round.png``: federated AUROC on the held-out test set per
  round, with the centralised and local-only mean AUROC as horizontal lines.
- ``calibration.png``: reliability curves (10 bins) of the federated,
  centralised and local-only models.

The results schema (``{"config", "dataset", "federated", "centralized",
"local", "rounds", "bayes_auroc", "failures", "privacy",
"secure_aggregation", "ledger", "runtime"}``) is described in
``cluster/job.py``, which fills it. Fields read here beyond it, each
optional: ``federated.auroc_ci`` and ``centralized.auroc_ci`` (``[lo, hi]``,
a 95 % interval, e.g. from ``bootstrap_auroc_ci``); ``dataset.train_encounters``
/ ``test_encounters`` (rows) together with ``train_patients`` /
``test_patients`` then taken as distinct patients; without
``*_encounters``, ``*_patients`` are taken to count rows, which for
Diabetes 130 are encounters. Per-round ``privacy`` entries may carry the
``noise_multiplier`` a hospital used.

Units: Diabetes 130 holds one row per hospital encounter (a patient may have
several; the train/test split is by patient), the synthetic data one row per
patient.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from federation.jsonvalues import json_safe as _json_safe

log = logging.getLogger(__name__)

DIABETES130_CITATION = (
    "Strack B, DeShazo JP, Gennings C, Olmo JL, Ventura S, Cios KJ, Clore JN. "
    "Impact of HbA1c Measurement on Hospital Readmission Rates: Analysis of "
    "70,000 Clinical Database Patient Records. BioMed Research International, "
    "2014, Article ID 781670. Data: UCI Machine Learning Repository, "
    '"Diabetes 130-US hospitals for years 1999-2008" (CC BY 4.0).'
)

OUTCOMES = {
    "readmit30": "readmission within 30 days",
    "readmit_any": "any readmission",
    "synthetic": "type 2 diabetes onset within six months",
    "diabetes_onset_6m": "type 2 diabetes onset within six months",
}

# When a note on the federated model's calibration applies: its ECE is more
# than this many times the centralised one and worse by more than GAP.
ECE_RATIO, ECE_GAP = 2.0, 0.02

# Hospital outcome rates below LOW next to rates above HIGH are far beyond
# what real hospitals show for readmission (roughly 5-20 %).
SKEW_LOW, SKEW_HIGH = 0.02, 0.5

METRIC_COLUMNS = (
    ("auroc", "AUROC"),
    ("auprc", "AUPRC"),
    ("accuracy", "accuracy at 0.5"),
    ("brier", "Brier score"),
    ("ece", "ECE"),
)


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON values for ``metrics.json`` (see ``jsonvalues``)."""
    return _json_safe(value, "metrics.json")


def bootstrap_auroc_ci(
    y: np.ndarray,
    p: np.ndarray,
    n: int = 200,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """95 % percentile bootstrap interval ``(lo, hi)`` of the AUROC of ``p`` for ``y``.

    ``y`` holds 0/1 outcomes, ``p`` scores of the same length; ``n``
    resamples drawn with ``numpy.random.default_rng(seed)``. With ``groups``
    (one id per row, e.g. the patient of each encounter) whole groups are
    resampled, so that a patient's correlated encounters move together; the
    default resamples rows, which makes the interval too narrow when one
    patient has many rows. Resamples holding a single class are skipped.
    Raises ``ValueError`` on mismatched lengths, a single class in ``y`` or
    ``n`` below 10. Cost: ``n`` sorts of the test set (about 0.3 s for
    n=200 and 20,000 rows).
    """
    from federation.metrics import ranking_scores

    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y has {y.size} values and p {p.size}; give one score "
                         "per outcome")
    if n < 10:
        raise ValueError(f"n={n} resamples cannot give a 95 % interval; use 100+")
    if not 0 < y.sum() < y.size:
        raise ValueError("y holds a single class; the AUROC is undefined")
    rng = np.random.default_rng(seed)

    if groups is None:
        draws = (rng.integers(0, y.size, y.size) for _ in range(n))
    else:
        groups = np.asarray(groups).ravel()
        if groups.shape != y.shape:
            raise ValueError(f"groups has {groups.size} values, y {y.size}")
        order = np.argsort(groups, kind="stable")
        _, starts, sizes = np.unique(groups[order], return_index=True,
                                     return_counts=True)
        draws = (_group_rows(order, starts, sizes,
                             rng.integers(0, starts.size, starts.size))
                 for _ in range(n))

    scores = []
    for rows in draws:
        ys = y[rows]
        if 0 < ys.sum() < ys.size:
            scores.append(ranking_scores(ys, p[rows])[0])
    if len(scores) < n // 2:
        raise ValueError(f"only {len(scores)} of {n} resamples held both classes; "
                         "the test set is too small for an interval")
    lo, hi = np.percentile(scores, [2.5, 97.5])
    return float(lo), float(hi)


def _group_rows(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                chosen: np.ndarray) -> np.ndarray:
    """Row indices of the ``chosen`` groups (repeats kept), without a Python loop."""
    lengths = sizes[chosen]
    offsets = np.repeat(starts[chosen] - np.cumsum(lengths) + lengths, lengths)
    return order[offsets + np.arange(lengths.sum())]


def write_report(out_dir: str | Path, results: dict) -> dict[str, Path]:
    """Writes metrics.json, report.md and the plots into ``out_dir``.

    Returns ``{"metrics", "report", "auroc_plot", "calibration_plot"}`` mapped
    to the paths written; a plot whose data is absent is not drawn and its
    key is left out. Creates ``out_dir`` if needed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safe = json_safe(results)
    paths: dict[str, Path] = {}

    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(safe, indent=2, allow_nan=False) + "\n")

    auroc_plot = _plot_auroc_per_round(safe, out / "auroc_per_round.png")
    if auroc_plot is not None:
        paths["auroc_plot"] = auroc_plot
    calibration_plot = _plot_calibration(safe, out / "calibration.png")
    if calibration_plot is not None:
        paths["calibration_plot"] = calibration_plot

    paths["report"] = out / "report.md"
    paths["report"].write_text(render_markdown(safe, paths))
    log.info("report written to %s (%d files)", out, len(paths))
    return paths


# ---------------------------------------------------------------- markdown


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        # Tiny values (delta = 1e-5) would print as 0.000 in fixed notation.
        if value != 0 and not 1e-3 <= abs(value) < 1e6:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value) or "none"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return lines + [""]


def _empty(value: Any) -> bool:
    """Values that carry nothing for a reader: None, "", {} and []."""
    return value is None or (isinstance(value, (str, dict, list)) and not value)


def _flatten(mapping: dict, prefix: str = "") -> list[list[Any]]:
    """Nested dicts become dotted keys (``ray.cpus``), one table row each.

    Rows whose value is empty (None, "", {}, []) are left out.
    """
    rows = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        elif not _empty(value):
            rows.append([f"{prefix}{key}", value])
    return rows


def _key_values(title: str, mapping: dict, level: str = "##") -> list[str]:
    rows = _flatten(mapping)
    if not rows:
        return []
    return [f"{level} {title}", ""] + _table(["setting", "value"], rows)


def _who(items: list) -> list[str]:
    """Names hospitals in a dropped/rejected list, with the reason when given."""
    out = []
    for item in items or []:
        if isinstance(item, dict):
            reason = item.get("reason")
            out.append(f"{item.get('hospital')} ({reason})" if reason
                       else str(item.get("hospital")))
        else:
            out.append(str(item))
    return out


def _local_mean(local: dict, key: str) -> Any:
    """Local-only mean of one metric: given as ``mean_<key>`` or averaged here."""
    if f"mean_{key}" in local:
        return local[f"mean_{key}"]
    values = [h.get(key) for h in local.get("per_hospital", [])]
    values = [v for v in values if isinstance(v, (int, float)) and v is not None]
    return float(np.mean(values)) if values else None


def _unit(dataset: dict) -> str:
    """What one row is: a patient (synthetic data) or an encounter (otherwise)."""
    return "patients" if dataset.get("name") == "synthetic" else "encounters"


def _counts(dataset: dict, part: str) -> tuple[Any, Any]:
    """``(rows, distinct patients)`` of ``part`` ("train"/"test"); None if unknown."""
    rows = dataset.get(f"{part}_encounters")
    if rows is not None:
        return rows, dataset.get(f"{part}_patients")
    return dataset.get(f"{part}_patients"), None


def _outcome(target: Any) -> str | None:
    if target is None:
        return None
    words = OUTCOMES.get(str(target))
    return f"{words} (`{target}`)" if words else str(target)


def _dp_on(results: dict) -> bool:
    return bool(results.get("privacy")) or bool(
        (results.get("config") or {}).get("dp"))


def render_markdown(results: dict, paths: dict[str, Path] | None = None) -> str:
    """Returns report.md for JSON-safe ``results``; plots linked from ``paths``.

    Clinical content first (data, summary, notes, hospitals, rounds,
    failures, privacy, secure aggregation, ledger, citation), then the
    engineering details under a final "Run details" heading.
    """
    paths = paths or {}
    lines = ["# Federated run report", ""]
    dataset = results.get("dataset") or {}

    lines += _dataset_section(dataset)
    lines += _summary_section(results, dataset)
    lines += _notes_section(results, dataset)
    if "auroc_plot" in paths:
        lines += [f"![Federated AUROC per round]({paths['auroc_plot'].name})", ""]
    if "calibration_plot" in paths:
        lines += [f"![Calibration]({paths['calibration_plot'].name})", ""]
    lines += _hospital_section(dataset, results.get("local") or {})
    lines += _rounds_section(results.get("rounds") or [], _dp_on(results))
    lines += _failures_section(results.get("failures") or [])

    if results.get("privacy"):
        lines += _privacy_section(results["privacy"])
    if results.get("secure_aggregation"):
        lines += _secure_section(results["secure_aggregation"])
    if results.get("ledger"):
        lines += _ledger_section(results["ledger"])
    if dataset.get("name") == "diabetes130":
        lines += ["## Data citation", "", DIABETES130_CITATION, ""]

    details = []
    if results.get("runtime"):
        details += _key_values("Runtime", results["runtime"], "###")
    if results.get("config"):
        details += _key_values("Configuration", _readable_config(results["config"]),
                               "###")
    if details:
        lines += ["## Run details", ""] + details
    return "\n".join(lines)


def _readable_config(config: dict) -> dict:
    """The configuration with "no DP" said in words instead of an empty value."""
    config = dict(config)
    if "dp" in config and config["dp"] is None:
        config["dp"] = "off"
    return config


def _dataset_section(dataset: dict) -> list[str]:
    if not dataset:
        return []
    unit = _unit(dataset)
    lines = ["## Data", ""]
    facts = [
        ("data set", dataset.get("name")),
        ("outcome", _outcome(dataset.get("target"))),
    ]
    for part, label in (("train", "training"), ("test", "held-out test")):
        rows, patients = _counts(dataset, part)
        if rows is not None:
            shown = f"{_fmt(rows)} {unit}"
            if patients is not None and unit == "encounters":
                shown += f" ({_fmt(patients)} patients)"
            facts.append((f"{label} set", shown))
    facts += [
        ("features", dataset.get("features")),
        ("hospitals", len(dataset["hospitals"]) if "hospitals" in dataset else None),
    ]
    for label, value in facts:
        if value is not None:
            shown = value if not isinstance(value, list) else len(value)
            lines.append(f"- {label}: {_fmt(shown)}")
    if dataset.get("test_label_rate") is not None:
        lines.append(f"- outcome rate in the test set: "
                     f"{_fmt(dataset['test_label_rate'])} (the AUPRC of a model "
                     "with no skill)")
    if unit == "encounters":
        lines += ["", "Each row is one hospital encounter; a patient may have "
                  "several. The training/test split is by patient, so no patient "
                  "appears in both."]
    if dataset.get("partition_note"):
        lines += ["", f"How the training data were split into hospitals: "
                  f"{dataset['partition_note']}"]
    return lines + [""]


def _failed_rounds(results: dict) -> tuple[int, int, str | None]:
    """``(failed, total, first reason)`` over the round records and failures."""
    rounds = results.get("rounds") or []
    failed = [r for r in rounds if r.get("status") == "failed"]
    reason = next((r.get("failure") for r in failed if r.get("failure")), None)
    round_failures = [f for f in results.get("failures") or []
                      if isinstance(f, dict) and f.get("kind") == "round_failed"]
    if reason is None and round_failures:
        reason = round_failures[0].get("reason")
    count = max(len(failed), len({f.get("round") for f in round_failures}))
    return count, len(rounds), reason


def _warning_lines(results: dict) -> list[str]:
    failed, total, reason = _failed_rounds(results)
    if not failed:
        return []
    total = max(total, failed)
    if failed == total:
        what = "the federated model is the initial (untrained) model"
    else:
        what = "the global model was not updated in those rounds"
    text = f"**Warning: {failed} of {total} rounds failed; {what}.**"
    if reason:
        text += f" First reason: {_fmt(reason)}"
    return [f"> {text}", ""]


def _auroc_cell(scores: dict) -> Any:
    """AUROC, with its 95 % interval as "0.656 (0.646-0.666)" when given."""
    auroc, ci = scores.get("auroc"), scores.get("auroc_ci")
    if auroc is None or not (isinstance(ci, list) and len(ci) == 2
                             and None not in ci):
        return auroc
    return f"{_fmt(auroc)} ({_fmt(ci[0])}-{_fmt(ci[1])})"


def _summary_section(results: dict, dataset: dict) -> list[str]:
    header = ["model"] + [label for _, label in METRIC_COLUMNS]
    rows = []
    with_ci = False
    for key, label in (("federated", "federated"), ("centralized", "centralised")):
        scores = results.get(key)
        if scores:
            auroc = _auroc_cell(scores)
            with_ci = with_ci or isinstance(auroc, str)
            rows.append([label, auroc] + [scores.get(m) for m, _ in METRIC_COLUMNS[1:]])
    local = results.get("local")
    if local:
        rows.append(["local only (mean over hospitals)"]
                    + [_local_mean(local, m) for m, _ in METRIC_COLUMNS])
    if results.get("bayes_auroc") is not None:
        rows.append(["Bayes limit (true risk)", results["bayes_auroc"]]
                    + [None] * (len(METRIC_COLUMNS) - 1))
    warning = _warning_lines(results)
    if not rows:
        return ["## Summary", ""] + warning if warning else []

    unit = _unit(dataset)
    lines = ["## Summary", ""] + warning
    lines += [f"All models are scored on the same held-out test set ({unit} of "
              "patients who never took part in training).", ""]
    lines += _table(header, rows)
    skipped = (results.get("runtime") or {}).get("baselines")
    if isinstance(skipped, str) and skipped.startswith("skipped"):
        lines += [f"Centralised and local-only baselines: {skipped}", ""]
    if with_ci:
        lines += ["AUROC in brackets: 95 % bootstrap confidence interval over "
                  "resamples of the test set.", ""]
    lines += [
        "How to read it: AUROC is the chance that a case with the outcome is "
        "ranked above one without (0.5 is chance, 1 is perfect). AUPRC is the "
        "average precision; a model with no skill scores the outcome rate. "
        "Accuracy at a 0.5 threshold says little for a rare outcome. The Brier "
        "score is the mean squared error of the predicted risk and ECE the mean "
        "gap between predicted risk and observed rate over 10 risk bins (both: "
        "lower is better). Centralised pools all training data in one place, "
        "which federation avoids; local only trains each hospital on its own "
        "data.", "",
    ]
    return lines


def _notes_section(results: dict, dataset: dict) -> list[str]:
    """Plain-language caveats, each only when it applies to this run."""
    notes = []
    fed = (results.get("federated") or {}).get("ece")
    cen = (results.get("centralized") or {}).get("ece")
    if (isinstance(fed, (int, float)) and isinstance(cen, (int, float))
            and fed > ECE_RATIO * cen and fed - cen > ECE_GAP):
        notes.append(
            f"Calibration: the federated model's predicted risks are less well "
            f"calibrated than the centralised model's (ECE {_fmt(fed)} against "
            f"{_fmt(cen)}): its risks are off by about {_fmt(fed)} on average. "
            "Recalibrate it (e.g. Platt scaling on local validation data) before "
            "clinical use; ranking (AUROC) is not affected."
        )

    rates = [h.get("label_rate") for h in dataset.get("hospitals") or []]
    rates = [r for r in rates if isinstance(r, (int, float))]
    if (rates and dataset.get("partition") == "dirichlet"
            and min(rates) < SKEW_LOW and max(rates) > SKEW_HIGH):
        alpha = dataset.get("alpha")
        notes.append(
            f"Hospital outcome rates range from {_fmt(min(rates))} to "
            f"{_fmt(max(rates))}: this simulated label skew (Dirichlet"
            f"{'' if alpha is None else f', alpha={_fmt(alpha)}'}) is far harsher "
            "than real hospitals show, so it is a stress test of federation, not "
            "a picture of a real consortium."
        )

    if _dp_on(results):
        notes += _dp_notes(results)
    if not notes:
        return []
    return ["## Notes", ""] + [f"- {n}" for n in notes] + [""]


def _noise_multipliers(results: dict) -> list[float]:
    """Distinct noise multipliers the hospitals reported, or the configured one."""
    used = set()
    for r in results.get("rounds") or []:
        for spent in (r.get("privacy") or {}).values():
            value = (spent or {}).get("noise_multiplier")
            if isinstance(value, (int, float)):
                used.add(round(float(value), 4))
    if used:
        return sorted(used)
    configured = (results.get("privacy") or {}).get("noise_multiplier")
    if configured is None:
        configured = ((results.get("config") or {}).get("dp") or {}).get(
            "noise_multiplier")
    return [float(configured)] if isinstance(configured, (int, float)) else []


def _dp_notes(results: dict) -> list[str]:
    privacy = results.get("privacy") or {}
    if _unit(results.get("dataset") or {}) == "patients":
        notes = ["Differential privacy: the privacy unit is one patient (one "
                 "training row of one hospital)."]
    else:
        notes = ["Differential privacy: the privacy unit is one encounter (one "
                 "training row of one hospital). A patient with k encounters at a "
                 "hospital is protected at about k x epsilon there, not epsilon."]
    baselines = [name for key, name in (("centralized", "centralised"),
                                        ("local", "local-only"))
                 if results.get(key)]
    if baselines:
        notes.append(f"The {' and '.join(baselines)} baseline"
                     f"{'s are' if len(baselines) > 1 else ' is'} trained without "
                     "DP, so the gap to them includes the cost of privacy.")
    sigmas = _noise_multipliers(results)
    if sigmas:
        clip = privacy.get("max_grad_norm")
        norm = "" if clip is None else f" {_fmt(clip)}"
        notes.append(f"Noise multiplier used (noise standard deviation over the "
                     f"clipping norm{norm}): {', '.join(_fmt(s) for s in sigmas)}.")
    else:
        notes.append("Noise multiplier: calibrated at each hospital from its "
                     "epsilon budget; the value used was not recorded in the "
                     "results.")
    notes.append("The training loss is not reported under DP: it is computed "
                 "from the hospitals' records without noise, so sharing it is "
                 "not covered by the privacy guarantee.")
    return notes


def _hospital_section(dataset: dict, local: dict) -> list[str]:
    hospitals = dataset.get("hospitals") or []
    per_hospital = {h.get("name"): h for h in local.get("per_hospital") or []}
    if not hospitals and not per_hospital:
        return []
    names = [h.get("name") for h in hospitals] or list(per_hospital)
    by_name = {h.get("name"): h for h in hospitals}

    rows = []
    for name in names:
        h, own = by_name.get(name, {}), per_hospital.get(name, {})
        rows.append([name, h.get("size"), h.get("label_rate"), own.get("auroc")])
    lines = ["## Hospitals", ""]
    return lines + _table(
        ["hospital", _unit(dataset), "outcome rate",
         "local-only AUROC (test)"], rows
    )


def _rounds_section(rounds: list[dict], dp: bool = False) -> list[str]:
    if not rounds:
        return []
    rows = []
    for r in rounds:
        participants = r.get("participants")
        if isinstance(participants, list):
            participants = len(participants)
        auroc = r.get("auroc", (r.get("test") or {}).get("auroc"))
        loss = r.get("loss")
        if loss is None and dp:
            loss = "not reported (DP)"
        status = "FAILED" if r.get("status") == "failed" else None
        rows.append([r.get("round"), status or auroc, loss, participants,
                     _who(r.get("dropped")), _who(r.get("rejected")),
                     _who(r.get("declined")), r.get("seconds")])
    lines = ["## Rounds", ""]
    return lines + _table(
        ["round", "AUROC (test)", "training loss", "hospitals", "dropped",
         "rejected", "declined", "seconds"],
        rows,
    )


def _privacy_section(privacy: dict) -> list[str]:
    """Epsilon per hospital in total and per round, and the declined rounds."""
    per = privacy.get("per_hospital") or {}
    settings = {k: v for k, v in privacy.items() if k not in ("per_hospital", "unit")}
    unit = privacy.get("unit", "one training row (encounter) of one hospital")
    lines = ["## Privacy", "",
             f"Record-level DP-SGD at every hospital; epsilon at delta = "
             f"{_fmt(privacy.get('delta'))}, privacy unit: {unit}.", ""]
    lines += _table(["setting", "value"], _flatten(settings))
    rows = []
    for name, h in per.items():
        steps = ", ".join(_fmt(x.get("epsilon_round"), 2)
                          for x in h.get("epsilon_per_round", [])) or "none"
        declined = h.get("declined") or []
        first = (f"from round {declined[0]['round']}: {declined[0]['reason']}"
                 if declined else "")
        rows.append([name, h.get("epsilon_total"), h.get("budget"),
                     h.get("rounds_trained"), steps, first])
    if rows:
        lines += _table(["hospital", "epsilon spent", "budget", "rounds trained",
                         "epsilon per round", "declined"], rows)
    return lines


def _secure_section(secure: dict) -> list[str]:
    lines = ["## Secure aggregation", "",
             "The coordinator received only the sum of the hospitals' weighted "
             "updates; it cannot see individual updates, so each update was "
             "screened inside its hospital before masking.", ""]
    return lines + _table(["setting", "value"], _flatten(secure))


def _ledger_section(ledger: dict) -> list[str]:
    lines = ["## Audit ledger", "",
             f"Head hash `{ledger.get('head_hash')}` at block height "
             f"{_fmt(ledger.get('block_height'))}, {_fmt(ledger.get('replicas'))} "
             "replicas."]
    verify = ledger.get("verify")
    if verify and ledger.get("head_hash") and "--head" not in verify:
        # The full check: the chain is whole and ends at this run's head.
        verify += f" --head {ledger['head_hash']}"
        if ledger.get("block_height") is not None:
            verify += f" --height {ledger['block_height']}"
    if verify:
        lines += ["Verify the chain, and that it holds this run's head, with:", "",
                  f"    {verify}"]
    if ledger.get("dir"):
        lines += ["", "Prove that one entry (e.g. a hospital's update) is in it, "
                  "and check the proof against the verified chain:", "",
                  f"    medfed ledger prove --dir {ledger['dir']} ENTRY_ID "
                  "--out proof.json",
                  f"    medfed ledger verify-proof proof.json --dir {ledger['dir']}"]
    lines.append("")
    shown = ("excluded_updates", "head_hash", "block_height", "replicas", "verify")
    rest = {k: v for k, v in ledger.items() if k not in shown}
    if rest.get("limitation") == "n/a":
        del rest["limitation"]
    rows = _flatten(rest)
    if rows:
        lines += _table(["setting", "value"], rows)
    excluded = ledger.get("excluded_updates") or []
    if excluded:
        lines += ["Updates excluded because of the ledger:", ""]
        lines += [f"- round {x['round']}, {x['hospital']}: {x['reason']}"
                  for x in excluded] + [""]
    return lines


FAILURE_KINDS = {
    "round_failed": "round failed",
    "dropped": "hospital dropped",
    "rejected": "update rejected",
    "declined": "hospital declined",
    "baseline": "baseline failed",
}


def _failures_section(failures: list) -> list[str]:
    """One table row per failure: round, hospital, kind and reason."""
    if not failures:
        return []
    rows = []
    for f in failures:
        if not isinstance(f, dict):
            rows.append([None, None, None, _fmt(f)])
            continue
        extra = {k: v for k, v in f.items()
                 if k not in ("round", "hospital", "kind", "reason")}
        reason = f.get("reason")
        if reason is None and extra:
            reason = "; ".join(f"{k}: {_fmt(v)}" for k, v in extra.items())
        hospital = f.get("hospital")
        if hospital is None and f.get("kind") == "round_failed":
            hospital = "(whole round)"
        kind = FAILURE_KINDS.get(f.get("kind"), f.get("kind"))
        rows.append([f.get("round"), hospital, kind, reason])
    return ["## Failures", ""] + _table(["round", "hospital", "kind", "reason"], rows)


# ------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_auroc_per_round(results: dict, path: Path) -> Path | None:
    rounds = [r for r in results.get("rounds") or [] if r.get("auroc") is not None]
    if not rounds:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([r["round"] for r in rounds], [r["auroc"] for r in rounds],
            marker="o", label="federated")

    lines = [
        ((results.get("centralized") or {}).get("auroc"), "centralised", "C1", "--"),
        (_local_mean(results.get("local") or {}, "auroc"), "local only (mean)",
         "C2", ":"),
        (results.get("bayes_auroc"), "Bayes limit", "grey", "-."),
    ]
    for value, label, color, style in lines:
        if value is not None:
            ax.axhline(value, color=color, linestyle=style, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("AUROC on the held-out test set\n(patients never seen in training)")
    ax.set_title("Discrimination per round")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pooled_curve(curves: list[dict]) -> dict | None:
    """Count-weighted pooling of per-hospital reliability curves."""
    curves = [c for c in curves if c and c.get("bin_count")]
    if not curves:
        return None
    bins = len(curves[0]["bin_count"])
    count, sum_p, sum_y = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for c in curves:
        for i in range(bins):
            n = c["bin_count"][i]
            if n:
                count[i] += n
                sum_p[i] += n * c["bin_mean_p"][i]
                sum_y[i] += n * c["bin_frac_pos"][i]
    mean_p = [float(sp / n) if n else None for sp, n in zip(sum_p, count)]
    frac = [float(sy / n) if n else None for sy, n in zip(sum_y, count)]
    return {"bin_mean_p": mean_p, "bin_frac_pos": frac,
            "bin_count": [int(n) for n in count]}


def _plot_calibration(results: dict, path: Path) -> Path | None:
    local = results.get("local") or {}
    local_curve = local.get("calibration") or _pooled_curve(
        [h.get("calibration") for h in local.get("per_hospital") or []]
    )
    curves = [
        ((results.get("federated") or {}).get("calibration"), "federated", "C0"),
        ((results.get("centralized") or {}).get("calibration"), "centralised", "C1"),
        (local_curve, "local only (all hospitals)", "C2"),
    ]
    curves = [c for c in curves if c[0] and c[0].get("bin_count")]
    if not curves:
        return None

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 5.0))
    top = 0.0
    for curve, label, color in curves:
        points = [(p, f) for p, f, n in zip(curve["bin_mean_p"], curve["bin_frac_pos"],
                                            curve["bin_count"]) if n]
        ax.plot([p for p, _ in points], [f for _, f in points], marker="o",
                color=color, label=label)
        top = max([top] + [max(p, f) for p, f in points])

    # A rare outcome keeps every risk low: zoom to the range actually used.
    limit = min(1.0, top * 1.1 + 0.02)
    ax.plot([0, limit], [0, limit], color="grey", linestyle="--", label="perfect")
    ax.set_xlim(0, limit)
    ax.set_ylim(0, limit)
    ax.set_xlabel("predicted risk (bin mean)")
    ax.set_ylabel("observed outcome rate")
    ax.set_title("Calibration on the held-out test set")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

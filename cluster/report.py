"""The report of one federated run: metrics.json, report.md and two plots.

``write_report(out_dir, results)`` renders the results dict a run produces
into files a clinician-researcher can read:

- ``metrics.json``: the results themselves, made JSON-safe (numpy values
  become plain numbers and lists; NaN and infinities become ``null``).
- ``report.md``: the data set and how it was split into hospitals, a summary
  table (federated vs centralised vs local-only vs the Bayes limit where
  known), the hospital table, the per-round table, failures, privacy and the
  audit ledger's head, each section only when its part of the results exists.
- ``auroc_per_round.png``: federated AUROC on the held-out test patients per
  round, with the centralised and local-only mean AUROC as horizontal lines.
- ``calibration.png``: reliability curves (10 bins) of the federated,
  centralised and local-only models.

The results schema (``{"config", "dataset", "federated", "centralized",
"local", "rounds", "bayes_auroc", "failures", "privacy",
"secure_aggregation", "ledger", "runtime"}``) is described in
``cluster/job.py``, which fills it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DIABETES130_CITATION = (
    "Strack B, DeShazo JP, Gennings C, Olmo JL, Ventura S, Cios KJ, Clore JN. "
    "Impact of HbA1c Measurement on Hospital Readmission Rates: Analysis of "
    "70,000 Clinical Database Patient Records. BioMed Research International, "
    "2014, Article ID 781670. Data: UCI Machine Learning Repository, "
    '"Diabetes 130-US hospitals for years 1999-2008" (CC BY 4.0).'
)

METRIC_COLUMNS = (
    ("auroc", "AUROC"),
    ("auprc", "AUPRC"),
    ("accuracy", "accuracy at 0.5"),
    ("brier", "Brier score"),
    ("ece", "ECE"),
)


def json_safe(value: Any) -> Any:
    """Returns ``value`` with numpy types as Python ones and non-finite floats as None.

    Dict keys become strings; tuples become lists; Paths become strings.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(
        f"cannot write {type(value).__name__} {value!r} to metrics.json; "
        "convert it to numbers, strings, lists or dicts first"
    )


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


def _flatten(mapping: dict, prefix: str = "") -> list[list[Any]]:
    """Nested dicts become dotted keys (``ray.cpus``), one table row each."""
    rows = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", value])
    return rows


def _key_values(title: str, mapping: dict) -> list[str]:
    return [f"## {title}", ""] + _table(["setting", "value"], _flatten(mapping))


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


def render_markdown(results: dict, paths: dict[str, Path] | None = None) -> str:
    """Returns report.md for JSON-safe ``results``; plots linked from ``paths``."""
    paths = paths or {}
    lines = ["# Federated run report", ""]
    dataset = results.get("dataset") or {}

    lines += _dataset_section(dataset)
    lines += _summary_section(results, dataset)
    if "auroc_plot" in paths:
        lines += [f"![Federated AUROC per round]({paths['auroc_plot'].name})", ""]
    if "calibration_plot" in paths:
        lines += [f"![Calibration]({paths['calibration_plot'].name})", ""]
    lines += _hospital_section(dataset, results.get("local") or {})
    lines += _rounds_section(results.get("rounds") or [])
    lines += _failures_section(results.get("failures") or [])

    if results.get("privacy"):
        lines += _privacy_section(results["privacy"])
    if results.get("secure_aggregation"):
        lines += _secure_section(results["secure_aggregation"])
    if results.get("ledger"):
        lines += _ledger_section(results["ledger"])
    if results.get("runtime"):
        lines += _key_values("Runtime", results["runtime"])
    if results.get("config"):
        lines += _key_values("Configuration", results["config"])

    if dataset.get("name") == "diabetes130":
        lines += ["## Data citation", "", DIABETES130_CITATION, ""]
    return "\n".join(lines)


def _dataset_section(dataset: dict) -> list[str]:
    if not dataset:
        return []
    lines = ["## Data", ""]
    facts = [
        ("data set", dataset.get("name")),
        ("outcome", dataset.get("target")),
        ("training patients", dataset.get("train_patients")),
        ("held-out test patients", dataset.get("test_patients")),
        ("features", dataset.get("features")),
        ("hospitals", len(dataset["hospitals"]) if "hospitals" in dataset else None),
    ]
    for label, value in facts:
        if value is not None:
            shown = value if not isinstance(value, list) else len(value)
            lines.append(f"- {label}: {_fmt(shown)}")
    if dataset.get("test_label_rate") is not None:
        lines.append(f"- outcome rate among test patients: "
                     f"{_fmt(dataset['test_label_rate'])} (the AUPRC of a model "
                     "with no skill)")
    if dataset.get("partition_note"):
        lines += ["", f"How patients were split into hospitals: "
                  f"{dataset['partition_note']}"]
    return lines + [""]


def _summary_section(results: dict, dataset: dict) -> list[str]:
    header = ["model"] + [label for _, label in METRIC_COLUMNS]
    rows = []
    for key, label in (("federated", "federated"), ("centralized", "centralised")):
        scores = results.get(key)
        if scores:
            rows.append([label] + [scores.get(m) for m, _ in METRIC_COLUMNS])
    local = results.get("local")
    if local:
        rows.append(["local only (mean over hospitals)"]
                    + [_local_mean(local, m) for m, _ in METRIC_COLUMNS])
    if results.get("bayes_auroc") is not None:
        rows.append(["Bayes limit (true risk)", results["bayes_auroc"]]
                    + [None] * (len(METRIC_COLUMNS) - 1))
    if not rows:
        return []

    lines = ["## Summary", "",
             "All models are scored on the same held-out test patients, who never "
             "took part in training.", ""]
    lines += _table(header, rows)
    lines += [
        "How to read it: AUROC is the chance that a patient with the outcome is "
        "ranked above one without (0.5 is chance, 1 is perfect). AUPRC is the "
        "average precision; a model with no skill scores the outcome rate. "
        "Accuracy at a 0.5 threshold says little for a rare outcome. The Brier "
        "score is the mean squared error of the predicted risk and ECE the mean "
        "gap between predicted risk and observed rate over 10 risk bins (both: "
        "lower is better). Centralised pools all training patients in one place, "
        "which federation avoids; local only trains each hospital on its own "
        "patients.", "",
    ]
    return lines


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
        ["hospital", "patients", "outcome rate", "local-only AUROC (test)"], rows
    )


def _rounds_section(rounds: list[dict]) -> list[str]:
    if not rounds:
        return []
    rows = []
    for r in rounds:
        participants = r.get("participants")
        if isinstance(participants, list):
            participants = len(participants)
        auroc = r.get("auroc", (r.get("test") or {}).get("auroc"))
        rows.append([r.get("round"), auroc, r.get("loss"), participants,
                     _who(r.get("dropped")), _who(r.get("rejected")),
                     _who(r.get("declined")), r.get("seconds")])
    lines = ["## Rounds", ""]
    return lines + _table(
        ["round", "AUROC (test)", "loss", "hospitals", "dropped", "rejected",
         "declined", "seconds"],
        rows,
    )


def _privacy_section(privacy: dict) -> list[str]:
    """Epsilon per hospital in total and per round, and the declined rounds."""
    per = privacy.get("per_hospital") or {}
    settings = {k: v for k, v in privacy.items() if k != "per_hospital"}
    lines = ["## Privacy", "",
             f"Record-level DP-SGD at every hospital; epsilon at delta = "
             f"{_fmt(privacy.get('delta'))}, privacy unit: "
             f"{privacy.get('unit', 'one training row')}.", ""]
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
             "replicas. Verify the chain with:", "",
             f"    {ledger.get('verify')}", ""]
    rest = {k: v for k, v in ledger.items() if k != "excluded_updates"}
    lines += _table(["setting", "value"], _flatten(rest))
    excluded = ledger.get("excluded_updates") or []
    if excluded:
        lines += ["Updates excluded because of the ledger:", ""]
        lines += [f"- round {x['round']}, {x['hospital']}: {x['reason']}"
                  for x in excluded] + [""]
    return lines


def _failures_section(failures: list) -> list[str]:
    if not failures:
        return []
    lines = ["## Failures", ""]
    for f in failures:
        lines.append(f"- {json.dumps(f) if isinstance(f, dict) else _fmt(f)}")
    return lines + [""]


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
    ax.set_ylabel("AUROC on held-out test patients")
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
    ax.set_title("Calibration on held-out test patients")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

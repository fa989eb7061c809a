"""The run report: files, metrics.json round-trip, wording, notes, intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.report import (
    bootstrap_auroc_ci, json_safe, render_markdown, write_report,
)
from federation.metrics import binary_metrics, ranking_scores


def _scores(seed: int, skill: float) -> dict:
    rng = np.random.default_rng(seed)
    y = (rng.random(500) < 0.2).astype(float)
    p = np.clip(0.2 + skill * (y - 0.2) + 0.1 * rng.standard_normal(500), 0, 1)
    return binary_metrics(y, p)


def _results() -> dict:
    hospitals = [{"name": f"hospital-{k:02d}", "size": 100 + k, "label_rate": 0.1}
                 for k in range(3)]
    return {
        "config": {"model": "logreg", "rounds": 2, "strategy": "fedavg"},
        "dataset": {"name": "diabetes130", "target": "readmit30",
                    "train_patients": 303, "test_patients": 500, "features": 22,
                    "partition_note": "IID split of patients", "hospitals": hospitals},
        "federated": _scores(0, 0.3),
        "centralized": _scores(1, 0.35),
        "local": {"mean_auroc": 0.6, "per_hospital": [
            {"name": h["name"], "auroc": 0.55 + 0.05 * k, "calibration":
             _scores(k, 0.2)["calibration"]} for k, h in enumerate(hospitals)]},
        "rounds": [
            {"round": 1, "auroc": 0.61, "loss": 0.35, "participants": 3,
             "dropped": [], "rejected": [], "seconds": 0.2},
            {"round": 2, "auroc": 0.64, "loss": 0.33, "participants": 2,
             "dropped": [{"hospital": "hospital-01", "reason": "timed out"}],
             "rejected": [{"hospital": "hospital-02", "reason": "delta holds 1 NaN"}],
             "seconds": 0.3},
        ],
        "bayes_auroc": None,
        "failures": [{"round": 2, "hospital": "hospital-01", "what": "crashed"}],
        "privacy": None,
        "ledger": {"head_hash": "ab" * 32, "entries": 7},
        "runtime": {"wall_seconds": 4.2, "ray": {"cpus": 2.0}},
    }


def test_writes_files_and_metrics_round_trip(tmp_path):
    results = _results()
    paths = write_report(tmp_path / "out", results)

    assert set(paths) == {"metrics", "report", "auroc_plot", "calibration_plot"}
    for key in ("auroc_plot", "calibration_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["metrics"].read_text()) == results


def test_report_tables_and_citation(tmp_path):
    text = write_report(tmp_path, _results())["report"].read_text()

    assert "| federated | 0." in text and "| centralised | 0." in text
    assert "| local only (mean over hospitals) | 0.600 |" in text
    assert "| hospital-01 | 101 | 0.100 | 0.600 |" in text
    assert ("| 2 | 0.640 | 0.330 | 2 | hospital-01 (timed out) | "
            "hospital-02 (delta holds 1 NaN)") in text
    assert "| runtime_ray.cpus | 2.000 |" not in text and "| ray.cpus | 2.000 |" in text
    assert "crashed" in text and "ab" * 32 in text
    assert "Strack" in text and "BioMed Research International" in text
    assert "Bayes" not in text.split("## Summary")[1].split("##")[0]
    assert "## Privacy" not in text


def test_optional_parts_absent_and_bayes_present(tmp_path):
    results = {
        "dataset": {"name": "synthetic", "target": "readmit30"},
        "federated": _scores(3, 0.3),
        "bayes_auroc": np.float64(0.81),
        "privacy": {"epsilon": 3.0, "delta": 1e-5},
    }
    paths = write_report(tmp_path, results)
    text = paths["report"].read_text()

    assert "auroc_plot" not in paths and "calibration_plot" in paths
    assert "| Bayes limit (true risk) | 0.810 |" in text
    assert "## Privacy" in text and "Strack" not in text
    assert "| delta | 1e-05 |" in text
    assert json.loads(paths["metrics"].read_text())["bayes_auroc"] == 0.81


def test_json_safe_converts_numpy_and_non_finite():
    got = json_safe({"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"),
                     1: (np.int64(2), np.inf), "d": np.bool_(True)})

    assert got == {"a": 0.5, "b": [0, 1, 2], "c": None, "1": [2, None], "d": True}
    with pytest.raises(TypeError, match="cannot write object"):
        json_safe({"x": object()})


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n")[1].split("\n## ")[0]


def test_counts_are_encounters_split_by_patient_and_outcome_in_words():
    text = render_markdown(json_safe(_results()))

    data = _section(text, "Data")
    assert "- outcome: readmission within 30 days (`readmit30`)" in data
    assert "- training set: 303 encounters\n" in data
    assert "- held-out test set: 500 encounters\n" in data
    assert "split is by patient, so no patient appears in both" in data
    assert "patients:" not in data
    assert "| hospital | encounters | outcome rate |" in text

    results = _results()
    results["dataset"].update(train_encounters=303, train_patients=250,
                              test_encounters=500, test_patients=410,
                              target="readmit_any")
    data = _section(render_markdown(json_safe(results)), "Data")
    assert "- training set: 303 encounters (250 patients)" in data
    assert "- held-out test set: 500 encounters (410 patients)" in data
    assert "any readmission" in data

    results["dataset"] = {"name": "synthetic", "target": "synthetic",
                          "train_patients": 800, "test_patients": 200}
    data = _section(render_markdown(json_safe(results)), "Data")
    assert "type 2 diabetes onset within six months" in data
    assert "- training set: 800 patients" in data and "encounter" not in data


def test_bootstrap_auroc_ci_brackets_the_auroc_and_resamples_patients():
    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.2).astype(float)
    p = rng.random(2000) + 0.4 * y
    auroc = ranking_scores(y, p)[0]

    lo, hi = bootstrap_auroc_ci(y, p)
    assert lo < auroc < hi and 0.02 < hi - lo < 0.12
    assert bootstrap_auroc_ci(y, p) == (lo, hi)
    assert bootstrap_auroc_ci(y, p, seed=1) != (lo, hi)

    # Five identical encounters per patient: resampling rows pretends there
    # is five times the evidence; resampling patients does not.
    y5, p5 = np.repeat(y[:400], 5), np.repeat(p[:400], 5)
    patients = np.repeat(np.arange(400), 5)
    row_lo, row_hi = bootstrap_auroc_ci(y5, p5)
    pat_lo, pat_hi = bootstrap_auroc_ci(y5, p5, groups=patients)
    assert (pat_hi - pat_lo) > 1.7 * (row_hi - row_lo)

    with pytest.raises(ValueError, match="single class"):
        bootstrap_auroc_ci(np.zeros(10), np.arange(10.0))
    with pytest.raises(ValueError, match="one score per outcome"):
        bootstrap_auroc_ci(y, p[:-1])


def test_auroc_interval_rendered_when_given():
    results = _results()
    results["federated"].update(auroc=0.656, auroc_ci=[0.646, 0.666])
    results["centralized"].update(auroc=0.658, auroc_ci=[0.648, 0.6681])
    summary = _section(render_markdown(json_safe(results)), "Summary")

    assert "| federated | 0.656 (0.646-0.666) |" in summary
    assert "| centralised | 0.658 (0.648-0.668) |" in summary
    assert "95 % bootstrap confidence interval" in summary
    assert "bootstrap" not in _section(render_markdown(json_safe(_results())),
                                       "Summary")


def test_notes_on_calibration_and_label_skew_only_when_they_apply():
    results = _results()
    results["federated"]["ece"], results["centralized"]["ece"] = 0.050, 0.007
    results["dataset"].update(partition="dirichlet", alpha=0.5)
    results["dataset"]["hospitals"][0]["label_rate"] = 0.001
    results["dataset"]["hospitals"][1]["label_rate"] = 0.977
    notes = _section(render_markdown(json_safe(results)), "Notes")
    assert "less well calibrated than the centralised model's" in notes
    assert "(ECE 0.050 against 0.007)" in notes and "before clinical use" in notes
    assert "range from 0.001 to 0.977" in notes and "far harsher" in notes

    # Twice as bad but by under 0.02, and extreme rates from an IID split: no notes.
    results["federated"]["ece"], results["centralized"]["ece"] = 0.015, 0.007
    results["dataset"]["partition"] = "iid"
    assert "## Notes" not in render_markdown(json_safe(results))


def _dp_results(noise: float | None) -> dict:
    results = _results()
    spent = {"epsilon": 1.0, "epsilon_round": 0.5, "delta": 1e-5}
    if noise is not None:
        spent["noise_multiplier"] = noise
    for r in results["rounds"]:
        r.update(loss=None, privacy={"hospital-00": dict(spent)})
    results["privacy"] = {
        "unit": "one training row (encounter) of one hospital", "delta": 1e-5,
        "epsilon_budget": 3.0, "noise_multiplier": None, "max_grad_norm": 1.0,
        "per_hospital": {"hospital-00": {
            "epsilon_total": 1.0, "budget": 3.0, "rounds_trained": 2,
            "epsilon_per_round": [{"round": 1, "epsilon_round": 0.5}],
            "declined": []}}}
    return results


def test_dp_notes_name_unit_baselines_noise_and_missing_loss():
    text = render_markdown(json_safe(_dp_results(1.0842)))
    notes = _section(text, "Notes")
    assert "privacy unit is one encounter" in notes and "k x epsilon" in notes
    assert "centralised and local-only baselines are trained without DP" in notes
    assert "Noise multiplier used" in notes and ": 1.084." in notes
    assert "not covered by the privacy guarantee" in notes
    assert "| 2 | 0.640 | not reported (DP) | 2 |" in _section(text, "Rounds")

    synthetic = _dp_results(None)
    synthetic["dataset"]["name"] = "synthetic"
    notes = _section(render_markdown(json_safe(synthetic)), "Notes")
    assert "privacy unit is one patient" in notes and "k x epsilon" not in notes
    assert "value used was not recorded" in notes
    assert "Noise multiplier used" not in notes
    assert "## Notes" not in render_markdown(json_safe(_results()))


def test_failed_rounds_warn_at_top_of_summary_and_failures_are_a_table():
    results = _results()
    for r in results["rounds"]:
        r.update(status="failed", failure="quorum not met: 1 of 3 answered")
    results["failures"] = [
        {"round": 1, "hospital": None, "kind": "round_failed",
         "reason": "quorum not met: 1 of 3 answered"},
        {"round": 2, "hospital": "hospital-01", "kind": "dropped",
         "reason": "timed out"},
        {"round": 2, "hospital": None, "kind": "round_failed",
         "reason": "quorum not met: 1 of 3 answered"},
    ]
    text = render_markdown(json_safe(results))

    summary = _section(text, "Summary")
    assert summary.lstrip().startswith(
        "> **Warning: 2 of 2 rounds failed; the federated model is the initial "
        "(untrained) model.** First reason: quorum not met: 1 of 3 answered")
    failures = _section(text, "Failures")
    assert "| round | hospital | kind | reason |" in failures
    assert ("| 1 | (whole round) | round failed | quorum not met: 1 of 3 answered |"
            in failures)
    assert "| 2 | hospital-01 | hospital dropped | timed out |" in failures
    assert "{" not in failures

    results["rounds"][0].update(status="ok", failure=None)
    results["failures"] = results["failures"][1:]
    summary = _section(render_markdown(json_safe(results)), "Summary")
    assert "Warning: 1 of 2 rounds failed; the global model was not updated" in summary
    assert "Warning" not in render_markdown(json_safe(_results()))


def test_skipped_baselines_are_said_in_the_summary():
    results = _results()
    results.update(centralized=None, local=None)
    results["runtime"]["baselines"] = "skipped (--no-baselines)"
    summary = _section(render_markdown(json_safe(results)), "Summary")

    assert "Centralised and local-only baselines: skipped (--no-baselines)" in summary
    assert "| centralised |" not in summary


def test_engineering_details_last_and_empty_rows_dropped():
    results = _results()
    results["config"].update(dp=None, dp_budgets={}, server_lr=None)
    results["ledger"].update(limitation="n/a", dir="/x/ledger",
                             verify="medfed ledger verify --dir /x/ledger")
    text = render_markdown(json_safe(results))

    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[-1] == "## Run details"
    details = text.split("## Run details\n")[1]
    assert "### Runtime" in details and "### Configuration" in details
    assert "| ray.cpus | 2.000 |" in details and "| dp | off |" in details
    assert "dp_budgets" not in text and "server_lr" not in text
    assert "limitation" not in text and "ray." not in text.split("## Run details")[0]
    ledger = _section(text, "Audit ledger")
    assert "medfed ledger verify-proof proof.json --dir /x/ledger" in ledger


def test_ledger_check_names_the_head_and_synthetic_outcome_in_words():
    results = _results()
    results["ledger"].update(dir="/x/ledger", block_height=9,
                             verify="medfed ledger verify --dir /x/ledger")
    results["dataset"].update(name="synthetic", target="diabetes_onset_6m")
    text = render_markdown(results)
    assert (f"medfed ledger verify --dir /x/ledger --head {'ab' * 32} --height 9"
            in _section(text, "Audit ledger"))
    assert ("outcome: type 2 diabetes onset within six months "
            "(`diabetes_onset_6m`)" in text)

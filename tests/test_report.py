"""The run report: files written, metrics.json round-trips, optional parts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.report import json_safe, write_report
from federation.metrics import binary_metrics


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

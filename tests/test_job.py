"""``medfed run`` end to end on a small synthetic consortium, through the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cluster.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_medfed_run_writes_metrics_report_and_plots(ray_local, tmp_path, capsys):
    config = tmp_path / "small.toml"
    config.write_text(
        "rounds = 3\nlr = 1.0\nlocal_epochs = 2\n"
        "[data]\ndataset = \"synthetic\"\nhospitals = 3\nsynthetic_patients = 3000\n"
    )
    out = tmp_path / "out"
    code = main(["run", str(config), "--out", str(out), "--num-cpus", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--seed", "3"])
    assert code == 0

    results = json.loads((out / "metrics.json").read_text())
    assert {"config", "dataset", "federated", "centralized", "local", "rounds",
            "bayes_auroc", "failures", "runtime"} <= set(results)
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert all(r["status"] == "ok" for r in results["rounds"])
    assert results["config"]["data"]["seed"] == 3
    assert len(results["local"]["per_hospital"]) == 3
    assert results["runtime"]["ray"]["node_addresses"] == ["127.0.0.1"]
    assert sorted(results["runtime"]["hospital_nodes"]) == [
        "hospital-00", "hospital-01", "hospital-02"]
    for key in ("federated", "centralized"):
        assert 0.5 < results[key]["auroc"] <= 1.0
    assert 0.5 < results["bayes_auroc"] <= 1.0
    assert results["failures"] == []
    assert (out / "report.md").read_text().startswith("#")
    assert (out / "auroc_per_round.png").stat().st_size > 0
    assert (out / "calibration.png").stat().st_size > 0
    assert (out / "checkpoint" / "checkpoint.pkl").exists()
    assert "federated" in capsys.readouterr().out


def test_medfed_run_refuses_a_bad_config(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("rounds = 3\nroundz = 4\n")
    assert main(["run", str(config)]) == 2
    assert "roundz" in capsys.readouterr().err


def test_a_failing_hospital_is_reported_and_a_run_resumes(ray_local, tmp_path):
    from actors.hospital import Fault
    from clinical.spec import DataSpec
    from cluster.config import RunConfig
    from cluster.job import run_job

    spec = DataSpec(dataset="synthetic", synthetic_patients=3000, hospitals=3)
    config = RunConfig(data=spec, rounds=2, lr=1.0, quorum=2.0, out=str(tmp_path),
                       cache_dir=str(tmp_path / "cache"), num_cpus=2)
    first = run_job(config, faults={1: Fault("raise", rounds=(1,))})
    assert [r["status"] for r in first["rounds"]] == ["ok", "ok"]
    assert first["rounds"][0]["participants"] == ["hospital-00", "hospital-02"]
    assert first["failures"] == [{
        "round": 1, "hospital": "hospital-01", "kind": "dropped",
        "reason": "RuntimeError: hospital-01: injected failure in round 1",
    }]

    resumed = run_job(dataclasses.replace(config, rounds=3, resume=True))
    assert resumed["runtime"]["resumed_from"] == 2
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"][1]["weights_hash"] == first["rounds"][1]["weights_hash"]
    assert resumed["rounds"][2]["participants"] == [
        "hospital-00", "hospital-01", "hospital-02"]
    assert resumed["failures"][0]["hospital"] == "hospital-01"


@pytest.mark.parametrize("policy, rounds_run", [("stop", 2), ("continue", 4)])
def test_a_failed_round_stops_or_continues_per_config(ray_local, policy, rounds_run):
    import ray

    from cluster.config import RunConfig
    from cluster.job import _run_rounds

    calls = []

    def run_round():
        calls.append(len(calls) + 1)
        failed = calls[-1] == 2
        return ray.put({
            "round": calls[-1], "status": "failed" if failed else "ok",
            "failure": "all 3 update(s) rejected" if failed else None,
            "test": {"auroc": 0.6}, "participants": [], "dropped": [],
            "rejected": [], "seconds": 0.0,
        })

    coordinator = type("FakeCoordinator", (), {})()
    coordinator.run_round = type("Method", (), {"remote": staticmethod(run_round)})()
    _run_rounds(RunConfig(rounds=4, on_round_failure=policy), coordinator, 0)
    assert len(calls) == rounds_run


def test_no_baselines_skips_them_and_says_so(ray_local, tmp_path, capsys):
    config = tmp_path / "small.toml"
    config.write_text(
        "rounds = 1\nlr = 1.0\n"
        "[data]\ndataset = \"synthetic\"\nhospitals = 2\nsynthetic_patients = 2000\n"
    )
    out = tmp_path / "out"
    code = main(["run", str(config), "--out", str(out), "--num-cpus", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--no-baselines",
                 "--no-ledger"])
    assert code == 0

    results = json.loads((out / "metrics.json").read_text())
    assert results["config"]["baselines"] is False
    assert results["centralized"] is None and results["local"] is None
    assert 0.5 < results["federated"]["auroc"] <= 1.0
    assert results["runtime"]["baselines"].startswith("skipped")
    assert "skipped" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "centralised" in printed and "skipped" in printed

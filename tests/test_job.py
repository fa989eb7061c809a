"""``medfed run`` end to end on a small synthetic consortium, through the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cluster.cli import main

@pytest.mark.ray
@pytest.mark.slow
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
    assert (out / "checkpoint" / "checkpoint.json").exists()
    assert "federated" in capsys.readouterr().out
    assert results["dataset"]["target"] == "diabetes_onset_6m"
    assert "type 2 diabetes onset" in (out / "report.md").read_text()
    assert results["dataset"]["test_encounters"] == results["dataset"][
        "test_patients"] > 0
    for key in ("federated", "centralized"):
        lo, hi = results[key]["auroc_ci"]
        # About 600 test patients with few cases: a wide interval.
        assert lo < results[key]["auroc"] < hi, (lo, results[key]["auroc"], hi)
        assert hi - lo < 0.4
    ledger = results["ledger"]
    assert f"--head {ledger['head_hash']} --height {ledger['block_height']}" in (
        out / "report.md").read_text()

    # The same --out again is refused before Ray is asked for anything.
    again = ["run", str(config), "--out", str(out), "--num-cpus", "2",
             "--cache-dir", str(tmp_path / "cache"), "--seed", "3"]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "--overwrite" in err


def test_medfed_run_refuses_a_bad_config(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("rounds = 3\nroundz = 4\n")
    assert main(["run", str(config)]) == 2
    assert "roundz" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
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

    # Resuming continues the same ledger: round 3 must be accepted there.
    resumed = run_job(dataclasses.replace(config, rounds=3, resume=True))
    assert resumed["runtime"]["resumed_from"] == 2
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"][1]["weights_hash"] == first["rounds"][1]["weights_hash"]
    assert resumed["rounds"][2]["participants"] == [
        "hospital-00", "hospital-01", "hospital-02"]
    assert resumed["failures"][0]["hospital"] == "hospital-01"
    assert resumed["rounds"][2]["ledger"]["global_model"]["accepted"]
    assert resumed["ledger"]["global_models_recorded"] == 3


@pytest.mark.ray
@pytest.mark.slow
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


@pytest.mark.ray
@pytest.mark.slow
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


# --- checks made before Ray starts -------------------------------------------


def _no_ray(monkeypatch):
    """Makes any attempt to start or join Ray fail the test."""
    import cluster.runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started although a check should refuse")

    monkeypatch.setattr(cluster.runtime, "ray_session", refuse)


def _small(tmp_path, **changes):
    from clinical.spec import DataSpec
    from cluster.config import RunConfig

    spec = DataSpec(dataset="synthetic", synthetic_patients=2000, hospitals=3)
    config = RunConfig(data=spec, rounds=1, out=str(tmp_path / "out"),
                       cache_dir=str(tmp_path / "cache"), num_cpus=2)
    return dataclasses.replace(config, **changes)


def test_out_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path,
                                                                 monkeypatch):
    from cluster.job import check_out, remove_previous_run, run_job

    _no_ray(monkeypatch)
    out = tmp_path / "out"
    (out / "ledger" / "replica-0").mkdir(parents=True)
    (out / "checkpoint").mkdir()
    for name in ("metrics.json", "report.md", "calibration.png", "notes.txt"):
        (out / name).write_text("x")
    with pytest.raises(ValueError) as caught:
        run_job(_small(tmp_path))
    message = str(caught.value)
    assert str(out) in message and "--resume" in message
    assert "--overwrite" in message and "metrics.json" in message
    with pytest.raises(ValueError, match="pass one of them"):
        run_job(_small(tmp_path, resume=True, overwrite=True))

    held = check_out(out, resume=False, overwrite=True)
    remove_previous_run(out, held)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert check_out(out, resume=False, overwrite=False) == []


def test_out_that_is_a_file_is_refused_before_ray(tmp_path, monkeypatch):
    from cluster.job import run_job

    _no_ray(monkeypatch)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ValueError, match="file"):
            run_job(_small(tmp_path, out=str(out)))


def test_resume_needs_a_matching_checkpoint(tmp_path, monkeypatch):
    import numpy as np

    from actors import checkpoint
    from cluster.job import run_job

    _no_ray(monkeypatch)
    config = _small(tmp_path, resume=True)
    folder = tmp_path / "out" / "checkpoint"
    with pytest.raises(FileNotFoundError, match=str(folder / "checkpoint.json")):
        run_job(config)

    # A checkpoint of a three-hospital consortium, resumed with four.
    checkpoint.save(folder, round=1, model="logreg", weights=np.zeros(5),
                    strategy_state={"name": "fedavg"},
                    data_key=config.data.key(),
                    hospitals=["hospital-00", "hospital-01", "hospital-02"],
                    settings=checkpoint.training_settings(config), records=[])
    four = dataclasses.replace(config, data=dataclasses.replace(
        config.data, hospitals=4))
    with pytest.raises(ValueError) as caught:
        run_job(four)
    message = str(caught.value)
    assert "checkpoint.json" in message
    assert "hospitals 3: hospital-00" in message and "this run has 4:" in message

    # Same consortium, other data (another seed): the spec keys are named.
    reseeded = dataclasses.replace(config, data=dataclasses.replace(
        config.data, seed=9))
    with pytest.raises(ValueError) as caught:
        run_job(reseeded)
    message = str(caught.value)
    assert "spec key" in message
    assert config.data.key() in message and reseeded.data.key() in message

    other_model = dataclasses.replace(config, model="mlp")
    with pytest.raises(ValueError, match="model 'logreg', this run has 'mlp'"):
        run_job(other_model)


def test_all_rounds_failed_exits_non_zero_some_failed_warns(capsys):
    from cluster.commands.run import EXIT_ALL_ROUNDS_FAILED, outcome

    def results(*statuses):
        rounds = [{"round": i + 1, "status": s,
                   "failure": "quorum not met" if s == "failed" else None}
                  for i, s in enumerate(statuses)]
        return {"rounds": rounds, "config": {"out": "runs/x"}}

    assert outcome(results("ok", "ok")) == 0
    assert capsys.readouterr().err == ""
    assert outcome(results("failed", "ok")) == 0
    err = capsys.readouterr().err
    assert "warning: 1 of 2 round(s) failed" in err and "quorum not met" in err
    assert outcome(results("failed", "failed")) == EXIT_ALL_ROUNDS_FAILED == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "all 2 round(s) failed" in err


def test_errors_from_inside_actors_print_as_one_line(capsys):
    from ray.exceptions import ActorDiedError, RayTaskError

    from cluster import cli

    bad = ValueError("checkpoint x was written for model 'mlp', this run has "
                     "'logreg'")
    wrapped = RayTaskError("Coordinator.__init__", "Traceback...\n  line\n",
                           bad).as_instanceof_cause()
    assert cli.user_error(wrapped) is bad
    assert cli.user_error(ActorDiedError()) is None
    assert cli.user_error(RayTaskError("f", "tb", RuntimeError("bug"))) is None

    def raises(args):
        raise wrapped

    parser = cli.build_parser()
    args = parser.parse_args(["run"])
    args.func = raises
    original = cli.build_parser
    try:
        cli.build_parser = lambda: _Fixed(parser, args)
        assert cli.main(["run"]) == 2
    finally:
        cli.build_parser = original
    err = capsys.readouterr().err
    assert err == f"medfed: error: {bad}\n"


class _Fixed:
    """A parser stand-in that returns prepared arguments."""

    def __init__(self, parser, args):
        self.parser, self.args = parser, args

    def parse_args(self, argv):
        return self.args


def test_verify_command_names_the_head():
    from cluster.job import _verify_command

    head = {"hash": "ab" * 32, "height": 7}
    assert _verify_command("/l", head) == (
        f"medfed ledger verify --dir /l --head {'ab' * 32} --height 7")
    assert _verify_command("/l", None) == "medfed ledger verify --dir /l"

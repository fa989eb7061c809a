"""``run_job`` with DP, secure aggregation and the ledger, on small synthetic data.

Each job is run once per module (they take seconds each on 2 CPUs) and its
results are checked by several tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.hospital import Fault
from actors.hospital_agent import AgentFault
from clinical.spec import DataSpec
from cluster.config import LedgerConfig, RunConfig, SecureAggConfig
from federation.privacy import DPConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """``run(name, **settings)``: runs a small job once per name; its results."""
    from cluster.job import run_job

    root = tmp_path_factory.mktemp("runs")
    done: dict[str, dict] = {}

    def run(name: str, hospitals: int = 3, faults: dict | None = None, **settings):
        if name not in done:
            spec = DataSpec(dataset="synthetic", synthetic_patients=3000,
                            hospitals=hospitals, seed=5)
            settings.setdefault("ledger", LedgerConfig(enabled=False))
            config = RunConfig(
                data=spec, rounds=settings.pop("rounds", 2), lr=1.0, seed=5,
                num_cpus=2, cache_dir=str(root / "cache"), out=str(root / name),
                **settings,
            )
            done[name] = run_job(config, faults=faults)
        return done[name]

    return run


def test_a_hospital_past_its_budget_declines_and_the_run_goes_on(runs):
    results = runs(
        "dp-ckks", dp=DPConfig(epsilon=8.0, planned_rounds=2),
        dp_budgets={"hospital-01": 0.05}, secure_agg=SecureAggConfig(mode="ckks"),
    )
    for record in results["rounds"]:
        assert record["status"] == "ok"
        assert record["participants"] == ["hospital-00", "hospital-02"]
        [declined] = record["declined"]
        assert declined["hospital"] == "hospital-01"
        assert "privacy budget epsilon=0.05" in declined["reason"]
        assert record["secure"]["survivors"] == ["hospital-00", "hospital-02"]
        assert record["loss"] is None  # DP releases no un-noised loss

    per = results["privacy"]["per_hospital"]
    for record in results["rounds"]:
        for name in ("hospital-00", "hospital-02"):
            assert record["privacy"][name]["noise_multiplier"] > 0
    assert per["hospital-01"]["epsilon_total"] == 0.0
    assert per["hospital-01"]["rounds_trained"] == 0
    assert [d["round"] for d in per["hospital-01"]["declined"]] == [1, 2]
    for name in ("hospital-00", "hospital-02"):
        rounds = per[name]["epsilon_per_round"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"] <= 8.0
        assert per[name]["epsilon_total"] == pytest.approx(rounds[1]["epsilon"])
        assert rounds[1]["epsilon_round"] == pytest.approx(
            rounds[1]["epsilon"] - rounds[0]["epsilon"])
    kinds = {(f["hospital"], f["kind"]) for f in results["failures"]}
    assert ("hospital-01", "declined") in kinds
    report = (results["config"]["out"] + "/report.md")
    text = open(report).read()
    assert "## Privacy" in text and "## Secure aggregation" in text


def test_masked_run_matches_the_plain_run(runs):
    plain = runs("plain")
    masked = runs("masked", secure_agg=SecureAggConfig(mode="mask"),
                  ledger=LedgerConfig(enabled=True))
    assert [r["status"] for r in masked["rounds"]] == ["ok", "ok"]
    assert all(r["secure"]["survivors"] == ["hospital-00", "hospital-01",
                                            "hospital-02"] for r in masked["rounds"])
    # Quantisation: 2^-17 per coordinate of the mean update and round, plus
    # what two rounds of local training make of it.
    a, b = (_weights(r) for r in (plain, masked))
    assert np.abs(a - b).max() < 1e-3
    assert np.abs(a).max() > 1e-2  # the models moved: the check has teeth
    assert masked["federated"]["auroc"] == pytest.approx(
        plain["federated"]["auroc"], abs=2e-3)
    assert "cannot check" in masked["ledger"]["limitation"]
    assert masked["ledger"]["updates_recorded"] == 6


def test_dropout_above_threshold_fails_the_round_and_keeps_the_model(runs):
    results = runs(
        "dropout", hospitals=4, rounds=3,
        secure_agg=SecureAggConfig(mode="mask", dropout_threshold=0.3,
                                   stage_timeout_s=20.0),
        faults={1: AgentFault("masked_input", rounds=(2, 3)),
                2: AgentFault("masked_input", rounds=(3,))},
    )
    first, second, third = results["rounds"]
    assert first["status"] == "ok"
    # One of four (25 %) is within the threshold: the others' sum is used.
    assert second["status"] == "ok"
    assert second["participants"] == ["hospital-00", "hospital-02", "hospital-03"]
    assert second["weights_hash"] != first["weights_hash"]
    # Two of four (50 %) is above it: the round fails, the model is unchanged.
    assert third["status"] == "failed"
    assert "dropout threshold" in third["failure"]
    assert third["participants"] == []
    assert third["weights_hash"] == second["weights_hash"]
    dropped = {d["hospital"] for d in third["dropped"]}
    assert dropped == {"hospital-01", "hospital-02"}


def test_ledger_records_the_run_and_excludes_a_forged_update(runs, tmp_path):
    from cluster.cli import main

    results = runs("ledger", ledger=LedgerConfig(enabled=True),
                   faults={1: Fault("wrong_key", rounds=(2,))})
    first, second = results["rounds"]
    assert first["participants"] == ["hospital-00", "hospital-01", "hospital-02"]
    assert second["status"] == "ok"
    assert second["participants"] == ["hospital-00", "hospital-02"]
    [rejected] = second["rejected"]
    assert rejected["hospital"] == "hospital-01"
    assert "ledger rejected the update" in rejected["reason"]
    assert "signature" in rejected["reason"]

    ledger = results["ledger"]
    listing = tmp_path / "entries.jsonl"
    assert main(["ledger", "verify", "--dir", ledger["dir"]]) == 0
    assert main(["ledger", "show", "--dir", ledger["dir"] + "/replica-0",
                 "--jsonl", str(listing)]) == 0
    entries = [json.loads(line) for line in listing.read_text().splitlines()]
    updates = {(e["body"]["round"], e["signer"]): e for e in entries
               if e["type"] == "model_update"}
    models = {e["body"]["round"]: e for e in entries
              if e["type"] == "global_model"}
    for record in results["rounds"]:
        r = record["round"]
        hashes = []
        for name in record["participants"]:
            entry = updates[(r, name)]
            assert entry["accepted"]
            assert entry["body"]["update_hash"] == record["ledger"]["updates"][name]
            hashes.append(entry["body"]["update_hash"])
        model = models[r]
        assert model["accepted"] and model["signer"] == "coordinator"
        assert model["body"]["model_hash"] == record["weights_hash"]
        assert sorted(model["body"]["update_hashes"]) == sorted(hashes)
    forged = updates[(2, "hospital-01")]
    assert not forged["accepted"] and "signature" in forged["reason"]
    assert forged["body"]["update_hash"] not in models[2]["body"]["update_hashes"]
    assert ledger["global_models_recorded"] == 2
    assert ledger["block_height"] >= 4 and len(ledger["head_hash"]) == 64
    text = open(results["config"]["out"] + "/report.md").read()
    assert ledger["head_hash"] in text
    assert f"medfed ledger verify --dir {ledger['dir']}" in text


def _weights(results: dict) -> np.ndarray:
    from actors import checkpoint

    _, weights, _ = checkpoint.load(results["config"]["out"] + "/checkpoint")
    return weights

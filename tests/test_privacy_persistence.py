"""A hospital's privacy spend survives actor restarts and resumed runs."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import ray
from opacus.accountants import RDPAccountant

from actors.checkpoint import (
    PRIVACY_FILE,
    CheckpointError,
    read_privacy_state,
    write_privacy_state,
)
from clinical.spec import DataSpec
from cluster.config import LedgerConfig, RunConfig
from federation.privacy import DPConfig, sample_rate_for, steps_per_epoch

pytestmark = pytest.mark.filterwarnings(
    "ignore:Optimal order is the largest alpha:UserWarning"
)

SPEC = DataSpec(dataset="synthetic", synthetic_patients=3000, hospitals=3, seed=5)
DELTA = 1e-5


def _independent_epsilon(noise: float, rows: int, batch: int, steps: int) -> float:
    """Epsilon of ``steps`` DP-SGD steps by a fresh Opacus accountant."""
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=sample_rate_for(rows, batch))
    return float(acc.get_epsilon(delta=DELTA))


def _rows(cache: str, index: int) -> int:
    from clinical.prepared import prepare

    return int(prepare(SPEC, cache_dir=cache).hospitals[index]["train"])


# --- files and folders, no Ray ----------------------------------------------

def test_privacy_state_file_is_written_whole_and_read_back(tmp_path):
    state = {"hospital": "hospital-00", "epsilon": 1.25, "history": [[1.0, 0.1, 9]]}
    path = write_privacy_state(tmp_path / "h", state)
    assert path == tmp_path / "h" / PRIVACY_FILE
    assert read_privacy_state(tmp_path / "h") == state
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == [PRIVACY_FILE]
    assert read_privacy_state(tmp_path / "nobody") is None

    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="privacy state .*privacy.json"):
        read_privacy_state(tmp_path / "h")


def test_hospital_records_mark_a_run_and_overwrite_removes_them(tmp_path):
    from cluster.job import check_out, remove_previous_run

    out = tmp_path / "out"
    write_privacy_state(out / "hospitals" / "hospital-00", {"epsilon": 1.0})
    (out / "mine.txt").write_text("kept")
    with pytest.raises(ValueError, match="already holds a run \\(hospitals\\)"):
        check_out(out, resume=False, overwrite=False)
    held = check_out(out, resume=False, overwrite=True)
    remove_previous_run(out, held)
    assert not (out / "hospitals").exists()
    assert (out / "mine.txt").read_text() == "kept"


def _meta(epsilons: dict[str, float]) -> dict:
    return {"records": [
        {"round": 1, "privacy": {n: {"epsilon": e / 2} for n, e in epsilons.items()}},
        {"round": 2, "privacy": {n: {"epsilon": e} for n, e in epsilons.items()}},
    ]}


def test_resume_under_dp_needs_every_spending_hospitals_record(tmp_path):
    from cluster.job import check_privacy_records

    config = RunConfig(data=SPEC, dp=DPConfig(epsilon=3.0, accountant="rdp",
                                              planned_rounds=4))
    meta = _meta({"hospital-00": 1.0, "hospital-01": 0.8, "hospital-02": 0.0})

    def record(name, **change):
        state = {"epsilon": 0.8, "accountant": "rdp", "target_epsilon": 3.0,
                 "planned_rounds": 4}
        write_privacy_state(tmp_path / name, dict(state, **change))

    record("hospital-00", epsilon=1.0)
    record("hospital-01")
    check_privacy_records(config, tmp_path, meta)  # hospital-02 never spent

    (tmp_path / "hospital-01" / PRIVACY_FILE).unlink()
    with pytest.raises(ValueError, match="hospital-01 spent epsilon 0.8000.*missing"):
        check_privacy_records(config, tmp_path, meta)

    record("hospital-01", epsilon=0.5)
    with pytest.raises(ValueError, match="hospital-01's privacy record .* 0.5, less"):
        check_privacy_records(config, tmp_path, meta)

    record("hospital-01", accountant="prv")
    with pytest.raises(ValueError, match="'prv' accountant, this run uses 'rdp'"):
        check_privacy_records(config, tmp_path, meta)

    # Noise calibrated for 2 rounds cannot continue as noise for 4.
    record("hospital-01", planned_rounds=2)
    with pytest.raises(ValueError, match="hospital-01.*planned_rounds = 2"):
        check_privacy_records(config, tmp_path, meta)

    # Without DP in this run there is no spend to continue.
    check_privacy_records(RunConfig(data=SPEC), tmp_path / "none", meta)


# --- a hospital actor killed and restarted ---------------------------------

def _ping_new_incarnation(trainer, old: str, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = ray.get(trainer.ping.remote(), timeout=30)
            if info["incarnation"] != old:
                return info
        except ray.exceptions.RayError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_hospital_continues_its_epsilon_and_declines_at_its_budget(
    ray_local, tmp_path
):
    from actors.hospital import Declined, HospitalGroup
    from federation.models import build_model, get_weights

    cache = str(tmp_path / "cache")
    rows, noise, batch = _rows(cache, 0), 1.0, 256
    per_round = steps_per_epoch(rows, batch)
    eps = {k: _independent_epsilon(noise, rows, batch, k * per_round)
           for k in (1, 2, 3, 4)}
    budget = (eps[3] + eps[4]) / 2  # three rounds fit, a fourth does not
    config = RunConfig(
        data=SPEC, cache_dir=cache, rounds=4, lr=0.5, batch_size=batch,
        dp=DPConfig(noise_multiplier=noise, accountant="rdp", delta=DELTA),
        dp_budgets={"hospital-00": budget}, ledger=LedgerConfig(enabled=False),
    )
    state_dir = tmp_path / "hospitals" / "hospital-00"
    group = HospitalGroup(config, 0, "hospital-00", state_dir=str(state_dir))
    try:
        weights = get_weights(build_model("logreg", _width(cache), 64, 0))
        first = ray.get(group.trainer.ping.remote(), timeout=120)
        spent = []
        for r in (1, 2):
            update = ray.get(group.trainer.fit.remote(r, weights), timeout=120)
            spent.append(update.metrics["epsilon"])
            # On disk before the update came back.
            assert read_privacy_state(state_dir)["epsilon"] == spent[-1]

        ray.kill(group.trainer, no_restart=False)
        info = _ping_new_incarnation(group.trainer, first["incarnation"])
        assert info["pid"] != first["pid"]

        update = ray.get(group.trainer.fit.remote(3, weights), timeout=120)
        spent.append(update.metrics["epsilon"])
        declined = ray.get(group.trainer.fit.remote(4, weights), timeout=120)
    finally:
        group.kill()

    assert spent[0] < spent[1] < spent[2]
    for k, value in enumerate(spent, start=1):
        assert value == pytest.approx(eps[k], abs=1e-9)
    assert isinstance(declined, Declined)
    assert f"epsilon={budget:g}" in declined.reason
    assert declined.privacy["epsilon"] == pytest.approx(eps[3], abs=1e-9)
    assert read_privacy_state(state_dir)["steps"] == 3 * per_round


def _width(cache: str) -> int:
    from clinical.prepared import prepare

    return int(prepare(SPEC, cache_dir=cache).X_train.shape[1])


# --- whole runs: a crash mid-run, and a resumed run -------------------------

@pytest.fixture(scope="module")
def run_dp(ray_local, tmp_path_factory):
    """``run_dp(out, rounds, **settings)``: one small DP job; its results."""
    from cluster.job import run_job

    root = tmp_path_factory.mktemp("dp-runs")
    cache = str(root / "cache")

    def run(out, rounds: int, faults=None, **settings):
        settings.setdefault("ledger", LedgerConfig(enabled=False))
        settings.setdefault(
            "dp", DPConfig(epsilon=4.0, accountant="rdp", planned_rounds=4))
        config = RunConfig(data=SPEC, rounds=rounds, lr=1.0, seed=5, num_cpus=2,
                           cache_dir=cache, out=str(out), baselines=False,
                           **settings)
        return run_job(config, faults=faults)

    run.cache = cache
    run.root = root
    return run


@pytest.mark.ray
@pytest.mark.slow
def test_crashed_hospital_keeps_its_spend_through_a_run(run_dp):
    from actors.hospital import Fault

    rows, noise, batch = _rows(run_dp.cache, 1), 1.0, 256
    per_round = steps_per_epoch(rows, batch)
    two = _independent_epsilon(noise, rows, batch, 2 * per_round)
    three = _independent_epsilon(noise, rows, batch, 3 * per_round)
    budget = (two + three) / 2
    results = run_dp(
        run_dp.root / "crash", 4, faults={1: Fault("crash", rounds=(2,))},
        dp=DPConfig(noise_multiplier=noise, accountant="rdp", delta=DELTA),
        dp_budgets={"hospital-01": budget},
    )

    per = results["privacy"]["per_hospital"]["hospital-01"]
    trained = per["epsilon_per_round"]
    # Round 2 crashed before training; Ray restarted the actor, which read its
    # record back: round 3 continues from round 1, round 4 would cross budget.
    assert [r["round"] for r in trained] == [1, 3]
    assert 0 < trained[0]["epsilon"] < trained[1]["epsilon"]
    assert per["epsilon_total"] == pytest.approx(two, abs=1e-9)
    assert [d["round"] for d in per["declined"]] == [4]
    dropped = [d["hospital"] for d in results["rounds"][1]["dropped"]]
    assert dropped == ["hospital-01"]
    state = read_privacy_state(run_dp.root / "crash" / "hospitals" / "hospital-01")
    assert state["steps"] == 2 * per_round


@pytest.mark.ray
@pytest.mark.slow
def test_resumed_run_continues_every_hospitals_epsilon(run_dp):
    from cluster.job import run_job

    root = run_dp.root
    straight = run_dp(root / "straight", 4, ledger=LedgerConfig(enabled=False))
    first = run_dp(root / "resumed", 2, ledger=LedgerConfig(enabled=True))
    shutil.copytree(root / "resumed", root / "missing")
    resumed = run_dp(root / "resumed", 4, ledger=LedgerConfig(enabled=True),
                     resume=True)

    names = sorted(straight["privacy"]["per_hospital"])
    for name in names:
        whole = straight["privacy"]["per_hospital"][name]
        half = first["privacy"]["per_hospital"][name]
        cont = resumed["privacy"]["per_hospital"][name]
        assert cont["epsilon_total"] == pytest.approx(whole["epsilon_total"], abs=1e-6)
        assert cont["epsilon_total"] > half["epsilon_total"] > 0
        seq = [r["epsilon"] for r in cont["epsilon_per_round"]]
        assert len(seq) == 4 and all(a < b for a, b in zip(seq, seq[1:]))

    # The ledger takes every cumulative spend, before and after the resume.
    ledger = resumed["ledger"]
    assert ledger["privacy_spends_recorded"] == 4 * len(names)
    assert ledger["excluded_updates"] == []

    # A resume that would forget a hospital's spend is refused before Ray.
    (root / "missing" / "hospitals" / "hospital-02" / PRIVACY_FILE).unlink()
    config = RunConfig(data=SPEC, rounds=4, lr=1.0, seed=5, num_cpus=2,
                       cache_dir=run_dp.cache, out=str(root / "missing"),
                       baselines=False, resume=True,
                       dp=DPConfig(epsilon=4.0, accountant="rdp", planned_rounds=4))
    with pytest.raises(ValueError, match="hospital-02 spent epsilon .* missing"):
        run_job(config)
    assert np.isfinite(resumed["federated"]["auroc"])
    assert json.loads((root / "resumed" / "metrics.json").read_text())["rounds"]

"""DP in ``medfed run``: invalid settings refused, a spent budget declines."""

from __future__ import annotations

import pytest

from cluster.cli import main
from cluster.config import load_config


@pytest.mark.parametrize("table, words", [
    ("epsilon = 0.0", "epsilon must be positive"),
    ("epsilon = -1.0", "epsilon must be positive"),
    ("epsilon = 3.0\ndelta = 1.0", "delta must lie in (0, 1)"),
    ("epsilon = 3.0\ndelta = 0.0", "delta must lie in (0, 1)"),
    ("noise_multiplier = 1.0\nmax_grad_norm = 0.0", "noise without clipping"),
])
def test_invalid_dp_settings_are_refused_at_load(tmp_path, table, words):
    path = tmp_path / "run.toml"
    path.write_text(f"rounds = 2\n[dp]\n{table}\n")
    with pytest.raises(ValueError) as caught:
        load_config(path)
    assert words in str(caught.value)
    assert "[dp]" in str(caught.value)


def test_invalid_dp_flags_are_refused_by_the_cli(capsys):
    assert main(["run", "--dp", "--epsilon", "-2"]) == 2
    assert "epsilon must be positive" in capsys.readouterr().err
    assert main(["run", "--epsilon", "3", "--delta", "1.5"]) == 2
    assert "delta must lie in (0, 1)" in capsys.readouterr().err


def test_dp_flags_build_the_dp_section(tmp_path):
    import argparse

    from cluster.commands.run import overrides_from, register, with_dp_flags

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["run", "--epsilon", "3", "--accountant", "rdp",
                              "--secure-agg", "mask", "--no-ledger"])
    config = with_dp_flags(load_config(None, overrides_from(args)), args)
    assert config.dp.epsilon == 3.0 and config.dp.accountant == "rdp"
    assert config.dp.delta == 1e-5
    assert config.secure_agg.mode == "mask" and not config.ledger.enabled


def test_budgets_without_dp_and_noise_without_clipping_are_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[dp_budgets]\nhospital-00 = 1.0\n")
    with pytest.raises(ValueError, match="DP is off"):
        load_config(path)
    path.write_text("[secure_agg]\nmode = \"mask\"\nnoise = \"discrete\"\n"
                    "noise_sigma = 1.0\n")
    with pytest.raises(ValueError, match="noise_clip_norm"):
        load_config(path)


@pytest.mark.ray
@pytest.mark.slow
def test_a_short_run_spends_close_to_its_budget(ray_local, tmp_path):
    import json

    config = tmp_path / "small.toml"
    config.write_text(
        "lr = 1.0\n[data]\ndataset = \"synthetic\"\nhospitals = 2\n"
        "synthetic_patients = 2000\n"
    )
    out = tmp_path / "out"
    code = main(["run", str(config), "--out", str(out), "--num-cpus", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--rounds", "3",
                 "--epsilon", "3", "--accountant", "rdp", "--no-ledger",
                 "--no-baselines"])
    assert code == 0
    results = json.loads((out / "metrics.json").read_text())
    assert results["privacy"]["planned_rounds"] == 3
    for name, spent in results["privacy"]["per_hospital"].items():
        assert 2.5 < spent["epsilon_total"] <= 3.0, (name, spent)
    sigmas = {r["privacy"][h]["noise_multiplier"] for r in results["rounds"]
              for h in r["privacy"]}
    assert len(sigmas) == 1 and min(sigmas) > 0
    assert "Noise multiplier used" in (out / "report.md").read_text()

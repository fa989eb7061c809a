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

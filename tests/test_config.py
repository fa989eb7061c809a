"""RunConfig loading: files, overrides, and errors that name the bad key or value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.config import RunConfig, from_mapping, load_config, override, validate

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class _Section:
    epsilon: float | None = None
    accountant: str = "prv"


@dataclass
class _WithSection:
    rounds: int = 1
    extra: _Section | None = None


def test_example_configs_load():
    main = load_config(REPO / "configs" / "diabetes130.toml")
    assert main.data.dataset == "diabetes130"
    assert main.data.hospitals == 10
    assert main.data.partition in ("dirichlet", "natural")
    assert main.data.target == "readmit30"
    synthetic = load_config(REPO / "configs" / "synthetic.toml")
    assert synthetic.data.dataset == "synthetic"


def test_toml_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "a.toml").write_text(
        'rounds = 7\nlr = 1\nstrategy = "fedadam"\n[data]\nhospitals = 4\n'
    )
    (tmp_path / "a.yaml").write_text(
        "rounds: 7\nlr: 1\nstrategy: fedadam\ndata:\n  hospitals: 4\n"
    )
    a = load_config(tmp_path / "a.toml")
    b = load_config(tmp_path / "a.yaml")
    assert a == b
    assert a.rounds == 7 and a.strategy == "fedadam" and a.data.hospitals == 4
    # An integer in the file widens to the float field.
    assert isinstance(a.lr, float) and a.lr == 1.0


def test_flags_override_the_file(tmp_path):
    (tmp_path / "c.toml").write_text("rounds = 7\n[data]\nhospitals = 4\n")
    c = load_config(tmp_path / "c.toml", {"rounds": 3, "data.alpha": 0.1,
                                          "model": None})
    assert c.rounds == 3 and c.data.alpha == 0.1 and c.data.hospitals == 4
    assert c.model == "logreg"


def test_top_level_seed_seeds_the_data_unless_given(tmp_path):
    (tmp_path / "s.toml").write_text("seed = 5\n")
    assert load_config(tmp_path / "s.toml").data.seed == 5
    (tmp_path / "t.toml").write_text("seed = 5\n[data]\nseed = 2\n")
    assert load_config(tmp_path / "t.toml").data.seed == 2


@pytest.mark.parametrize(
    "text, named",
    [
        ("roundz = 3\n", "roundz"),
        ("[data]\nhospitalz = 3\n", "data.hospitalz"),
        ("[privacy_typo]\nepsilon = 1\n", "privacy_typo"),
    ],
)
def test_unknown_key_is_an_error_naming_it(tmp_path, text, named):
    (tmp_path / "u.toml").write_text(text)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config(tmp_path / "u.toml")


@pytest.mark.parametrize(
    "text, field, value",
    [
        ("rounds = 0\n", "rounds", "0"),
        ('strategy = "fedsgd"\n', "strategy", "fedsgd"),
        ("fraction = 1.5\n", "fraction", "1.5"),
        ("lr = -0.1\n", "lr", "-0.1"),
        ("quorum = 2.5\n", "quorum", "2.5"),
        ('rounds = "ten"\n', "rounds", "ten"),
        ("[data]\nhospitals = 0\n", "hospitals", "0"),
        ('[data]\npartition = "random"\n', "partition", "random"),
    ],
)
def test_bad_values_name_field_and_value(tmp_path, text, field, value):
    (tmp_path / "b.toml").write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(tmp_path / "b.toml")
    assert field in str(info.value) and value in str(info.value)


def test_quorum_count_above_the_sample_is_refused():
    config = override(RunConfig(), {"data.hospitals": 4, "fraction": 0.5,
                                    "quorum": 3})
    with pytest.raises(ValueError, match="quorum"):
        validate(config)


def test_quorum_fraction_and_count():
    config = RunConfig()
    assert config.quorum_count(10) == 5
    assert override(config, {"quorum": 0.25}).quorum_count(10) == 3
    assert override(config, {"quorum": 2}).quorum_count(10) == 2


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match=".json"):
        load_config(tmp_path / "c.json")
    (tmp_path / "broken.toml").write_text("rounds = = 3\n")
    with pytest.raises(ValueError, match="TOML"):
        load_config(tmp_path / "broken.toml")
    with pytest.raises(ValueError, match="nothing"):
        override(RunConfig(), {"nothing": 1})


def test_a_section_added_later_loads_without_loader_changes():
    loaded = from_mapping(_WithSection, {"rounds": 2, "extra": {"epsilon": 3}})
    assert loaded.extra == _Section(epsilon=3.0)
    assert from_mapping(_WithSection, {}).extra is None
    with pytest.raises(ValueError, match=r"extra\.epsilom"):
        from_mapping(_WithSection, {"extra": {"epsilom": 3}})
    with pytest.raises(ValueError, match="extra must be a table"):
        from_mapping(_WithSection, {"extra": "on"})
    with pytest.raises(ValueError, match=r"extra\.accountant"):
        from_mapping(_WithSection, {"extra": {"accountant": 3}})


def test_privacy_secure_aggregation_and_ledger_tables_load(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        "rounds = 4\n[dp]\nepsilon = 3\naccountant = \"rdp\"\n"
        "[dp_budgets]\nhospital-02 = 0.5\n"
        "[secure_agg]\nmode = \"ckks\"\ndropout_threshold = 0.2\n"
        "[ledger]\nenabled = false\nreplicas = 5\n"
    )
    config = load_config(path, {"secure_agg.mode": "mask"})
    assert config.dp.epsilon == 3.0 and config.dp.accountant == "rdp"
    assert config.dp.delta == 1e-5
    assert config.dp_budgets == {"hospital-02": 0.5}
    assert config.secure_agg.mode == "mask"
    assert config.secure_agg.dropout_threshold == 0.2
    assert not config.ledger.enabled and config.ledger.replicas == 5


@pytest.mark.parametrize("text, words", [
    ("[secure_agg]\nmode = \"paillier\"\n", "secure_agg.mode"),
    ("[secure_agg]\nmode = \"mask\"\ndropout_threshold = 1.0\n",
     "dropout_threshold"),
    ("[ledger]\nreplicas = 4\n", "ledger.replicas"),
    ("[dp]\nepsilon = 2\n[dp_budgets]\nhospital-00 = -1\n", "dp_budgets"),
])
def test_bad_secure_aggregation_and_ledger_settings(tmp_path, text, words):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=words):
        load_config(path)


def test_baselines_switch_from_file_and_flag(tmp_path):
    import argparse

    from cluster.commands.run import overrides_from, register

    assert RunConfig().baselines is True
    path = tmp_path / "run.toml"
    path.write_text("baselines = false\n")
    assert load_config(path).baselines is False
    with pytest.raises(ValueError, match="baselines must be bool"):
        path.write_text("baselines = \"no\"\n")
        load_config(path)

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    flagged = parser.parse_args(["run", "--no-baselines"])
    assert load_config(None, overrides_from(flagged)).baselines is False
    plain = parser.parse_args(["run"])
    assert load_config(None, overrides_from(plain)).baselines is True


@pytest.mark.parametrize("mode", ["mask", "ckks"])
def test_secure_aggregation_needs_three_hospitals_per_round(mode):
    from clinical.spec import DataSpec
    from cluster.config import SecureAggConfig

    two = RunConfig(data=DataSpec(hospitals=2), secure_agg=SecureAggConfig(mode))
    with pytest.raises(ValueError, match="at least 3 hospitals.*got 2 hospital"):
        validate(two)
    sampled = RunConfig(data=DataSpec(hospitals=5), fraction=0.4,
                        secure_agg=SecureAggConfig(mode))
    with pytest.raises(ValueError, match="2 sampled per round"):
        validate(sampled)
    validate(RunConfig(data=DataSpec(hospitals=3), secure_agg=SecureAggConfig(mode)))


def _run_args(*flags):
    import argparse

    from cluster.commands.run import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["run", *flags])


def test_dp_alone_uses_the_default_budget_planned_for_the_run(tmp_path):
    from cluster.commands.run import DEFAULT_EPSILON, overrides_from, with_dp_flags

    args = _run_args("--dp", "--rounds", "3")
    config = with_dp_flags(load_config(None, overrides_from(args)), args)
    assert config.dp.epsilon == DEFAULT_EPSILON == 3.0 and config.dp.delta == 1e-5
    assert config.dp.planned_rounds == 3

    args = _run_args("--epsilon", "2", "--rounds", "4")
    config = with_dp_flags(load_config(None, overrides_from(args)), args)
    assert (config.dp.epsilon, config.dp.planned_rounds) == (2.0, 4)

    # From a file: planned for the run's rounds unless the file says otherwise.
    path = tmp_path / "run.toml"
    path.write_text("rounds = 5\n[dp]\nepsilon = 1.0\n")
    assert load_config(path).dp.planned_rounds == 5
    assert load_config(path, {"rounds": 2}).dp.planned_rounds == 2
    path.write_text("rounds = 5\n[dp]\nepsilon = 1.0\nplanned_rounds = 30\n")
    args = _run_args("--epsilon", "2")
    config = with_dp_flags(load_config(path, overrides_from(args)), args)
    assert (config.dp.epsilon, config.dp.planned_rounds) == (2.0, 30)

"""Run configuration for ``medfed run``: one dataclass, loaded from TOML or YAML.

A configuration file holds top-level keys for the federation (model, rounds,
strategy, ...) and one table per nested section: ``[data]`` fills a
``clinical.DataSpec``. The loader is generic over the dataclass: it walks the
fields of ``RunConfig`` and of every nested dataclass field, so a section
added later (a dataclass-typed field such as privacy settings) is loaded the
same way without touching the loader. A key that names no field is an error
that names the key; so is a value of the wrong type.

Precedence: dataclass defaults, then the file, then command-line overrides
(``override(config, {"data.hospitals": 5, "rounds": 3})``).

Seeds: ``seed`` seeds model initialisation, local shuffling and the hospital
sample of each round; ``data.seed`` seeds the patient split and the partition.
When a file sets ``seed`` but not ``data.seed``, the data seed follows ``seed``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinical.spec import DataSpec

MODELS = ("logreg", "mlp")
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
ROUND_FAILURE_POLICIES = ("continue", "stop")
DATASETS = ("diabetes130", "synthetic")
PARTITIONS = ("iid", "dirichlet", "natural")
TARGETS = ("readmit30", "readmit_any")


@dataclass
class RunConfig:
    """Everything one federated run needs; defaults suit the Diabetes 130 job.

    data: which patients, which split into hospitals (``clinical.DataSpec``).
    model: ``"logreg"`` or ``"mlp"``; hidden: hidden units of ``"mlp"``.
    rounds: federated rounds; local_epochs: passes over local rows per round.
    batch_size, lr, optimizer (``"sgd"`` | ``"adam"``): local training.
    strategy: ``"fedavg"``, ``"fedprox"`` (local proximal term ``mu``) or
        ``"fedadam"`` (server-side Adam); server_lr: the server step size
        (``None``: 1.0 for FedAvg/FedProx, 0.01 for FedAdam).
    fraction: share of hospitals sampled each round, in (0, 1]; at least one.
    quorum: accepted updates a round needs to change the global model. Below
        1 it is a fraction of the hospitals sampled that round (rounded up);
        1 or more is a count (``quorum = 1`` means one update suffices).
    round_timeout_s: seconds a round waits for updates before dropping the
        hospitals that have not answered.
    ping_timeout_s: seconds a sampled hospital has to answer a liveness check
        (a restarting hospital reloads its partition first) before it is left
        out of the round.
    on_round_failure: ``"continue"`` with the next round (global model
        unchanged) or ``"stop"`` the run.
    checkpoint_dir: where the global model and strategy state are written
        after every round (``None``: ``<out>/checkpoint``); resume: continue
        from the checkpoint there if one exists.
    out: output folder (``None``: ``./runs/<UTC timestamp>``).
    address: Ray cluster to join (``None``: a local instance on 127.0.0.1);
        num_cpus: CPUs of that local instance (``None``: all cores).
    cache_dir: prepared-array cache (``None``: the data package's default).
    """

    data: DataSpec = field(default_factory=DataSpec)
    model: str = "logreg"
    hidden: int = 64
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 256
    lr: float = 0.5
    optimizer: str = "sgd"
    strategy: str = "fedavg"
    mu: float = 0.0
    server_lr: float | None = None
    fraction: float = 1.0
    quorum: float = 0.5
    round_timeout_s: float = 120.0
    ping_timeout_s: float = 30.0
    on_round_failure: str = "continue"
    checkpoint_dir: str | None = None
    resume: bool = False
    seed: int = 0
    out: str | None = None
    address: str | None = None
    num_cpus: int | None = None
    cache_dir: str | None = None

    def sampled_per_round(self) -> int:
        """Hospitals asked to train each round: ``fraction`` of them, at least one."""
        return max(1, round(self.fraction * self.data.hospitals))

    def quorum_count(self, sampled: int) -> int:
        """Accepted updates a round with ``sampled`` hospitals needs."""
        if self.quorum >= 1:
            return int(self.quorum)
        return max(1, math.ceil(self.quorum * sampled))


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Builds a validated ``RunConfig`` from defaults, a file, then overrides.

    path: a ``.toml``, ``.yaml`` or ``.yml`` file, or ``None`` for defaults.
    overrides: dotted field names to values (``{"data.alpha": 0.3}``); a
        ``None`` value means "not given" and is skipped.
    Raises FileNotFoundError for a missing file and ValueError naming the key
    or field for an unknown key, a wrongly typed or an out-of-range value.
    """
    config = RunConfig()
    if path is not None:
        mapping = read_mapping(path)
        data_section = mapping.get("data")
        if "seed" in mapping and (
            not isinstance(data_section, dict) or "seed" not in data_section
        ):
            mapping.setdefault("data", {})
            if isinstance(mapping["data"], dict):
                mapping["data"] = {**mapping["data"], "seed": mapping["seed"]}
        config = from_mapping(RunConfig, mapping, where=str(path))
    if overrides:
        config = override(config, overrides)
    validate(config)
    return config


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Reads a TOML or YAML file into a dict; the extension picks the format."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        with path.open("rb") as fh:
            try:
                return tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(
                    f"config file {path} is not valid TOML: {exc}"
                ) from exc
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            return {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"config file {path} must hold a mapping at the top level, "
                f"got {type(loaded).__name__}"
            )
        return loaded
    raise ValueError(
        f"config file {path} has extension {suffix!r}; use .toml, .yaml or .yml"
    )


def from_mapping(cls: type, mapping: dict[str, Any], where: str = "config") -> Any:
    """Builds dataclass ``cls`` from ``mapping``, recursing into dataclass fields.

    Raises ValueError naming ``where`` and the dotted key for an unknown key
    or a value of the wrong type.
    """
    return _build(cls, mapping, prefix="", where=where)


def _build(cls: type, mapping: Any, prefix: str, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise ValueError(
            f"{where}: {prefix.rstrip('.') or 'top level'} must be a table/mapping, "
            f"got {mapping!r}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ValueError(
                f"{where}: unknown key {dotted!r}; known keys here: "
                f"{', '.join(sorted(names))}"
            )
        nested = _dataclass_in(hints[key])
        if nested is not None and isinstance(value, dict):
            kwargs[key] = _build(nested, value, f"{dotted}.", where)
        elif nested is not None and value is not None:
            raise ValueError(
                f"{where}: {dotted} must be a table of settings, got {value!r}"
            )
        else:
            kwargs[key] = _coerce(value, hints[key], dotted, where)
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    """Returns the dataclass inside ``hint`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if _is_union(hint):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _coerce(value: Any, hint: Any, dotted: str, where: str) -> Any:
    """Checks ``value`` against a simple type hint; ints widen to floats."""
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, dotted, where)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ValueError(
            f"{where}: {dotted} must be {hint.__name__}, got {value!r}"
        )
    # Lists, dicts and other structured fields are taken as given.
    return value


def override(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Returns a copy of ``config`` with dotted fields replaced; ``None`` skips.

    Raises ValueError naming the key when it names no field.
    """
    for dotted, value in overrides.items():
        if value is None:
            continue
        config = _replace_path(config, dotted.split("."), value, dotted)
    return config


def _replace_path(obj: Any, parts: list[str], value: Any, dotted: str) -> Any:
    head = parts[0]
    if not dataclasses.is_dataclass(obj) or head not in {
        f.name for f in dataclasses.fields(obj)
    }:
        raise ValueError(f"override: unknown key {dotted!r}")
    if len(parts) == 1:
        hint = typing.get_type_hints(type(obj))[head]
        return dataclasses.replace(
            obj, **{head: _coerce(value, hint, dotted, "override")}
        )
    inner = _replace_path(getattr(obj, head), parts[1:], value, dotted)
    return dataclasses.replace(obj, **{head: inner})


def validate(config: RunConfig) -> None:
    """Raises ValueError naming the field and value of the first bad setting."""
    data = config.data
    _choice("data.dataset", data.dataset, DATASETS)
    _choice("data.partition", data.partition, PARTITIONS)
    _choice("data.target", data.target, TARGETS)
    _at_least("data.hospitals", data.hospitals, 1)
    _positive("data.alpha", data.alpha)
    _open_unit("data.test_fraction", data.test_fraction)
    if not 0 <= data.val_fraction < 1:
        raise ValueError(
            "config field 'data.val_fraction' must be in [0, 1), "
            f"got {data.val_fraction!r}"
        )

    _choice("model", config.model, MODELS)
    _at_least("hidden", config.hidden, 1)
    _at_least("rounds", config.rounds, 1)
    _at_least("local_epochs", config.local_epochs, 1)
    _at_least("batch_size", config.batch_size, 1)
    _positive("lr", config.lr)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("strategy", config.strategy, STRATEGIES)
    if not config.mu >= 0:
        raise ValueError(f"config field 'mu' must be >= 0, got {config.mu!r}")
    if config.server_lr is not None:
        _positive("server_lr", config.server_lr)
    if not 0 < config.fraction <= 1:
        raise ValueError(
            f"config field 'fraction' must be in (0, 1], got {config.fraction!r}"
        )
    _positive("quorum", config.quorum)
    if config.quorum >= 1:
        if config.quorum != int(config.quorum):
            raise ValueError(
                "config field 'quorum' must be a fraction below 1 or a whole count, "
                f"got {config.quorum!r}"
            )
        if config.quorum > config.sampled_per_round():
            raise ValueError(
                f"config field 'quorum' asks for {int(config.quorum)} updates but "
                f"only {config.sampled_per_round()} hospitals are sampled per round "
                "(fraction x hospitals); lower quorum or raise fraction"
            )
    _positive("round_timeout_s", config.round_timeout_s)
    _positive("ping_timeout_s", config.ping_timeout_s)
    _choice("on_round_failure", config.on_round_failure, ROUND_FAILURE_POLICIES)
    if config.num_cpus is not None:
        _at_least("num_cpus", config.num_cpus, 1)


def to_dict(config: RunConfig) -> dict[str, Any]:
    """Returns the configuration as plain JSON-ready values (nested dicts)."""
    return dataclasses.asdict(config)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"config field {name!r} must be one of {', '.join(allowed)}; got {value!r}"
        )


def _at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(
            f"config field {name!r} must be an integer >= {low}, got {value!r}"
        )


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(
            f"config field {name!r} must be a positive number, got {value!r}"
        )


def _open_unit(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"config field {name!r} must be in (0, 1), got {value!r}")

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
from federation.dp_config import DPConfig

MODELS = ("logreg", "mlp")
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
ROUND_FAILURE_POLICIES = ("continue", "stop")
DATASETS = ("diabetes130", "synthetic")
PARTITIONS = ("iid", "dirichlet", "natural")
TARGETS = ("readmit30", "readmit_any")
SECURE_AGG_MODES = ("none", "mask", "ckks")
NOISE_KINDS = ("none", "discrete", "gaussian")
# Fewest hospitals a secure round may sum: with two, each learns the other's
# update from the sum and its own.
SECURE_AGG_MIN_HOSPITALS = 3


@dataclass
class SecureAggConfig:
    """Secure aggregation of the hospitals' updates (TOML table ``[secure_agg]``).

    mode: ``"none"`` (updates reach the coordinator in the clear), ``"mask"``
        (SecAgg+ pairwise masking) or ``"ckks"`` (CKKS homomorphic sum; the
        first hospital holds the secret key and decrypts only the sum).
    dropout_threshold: largest share of the hospitals that handed in an
        update and may drop out before their input is summed; above it the
        round fails and the global model is unchanged. In [0, 1).
    clip_range: declared bound on every update value for masking (values
        outside are clipped); frac_bits: fixed-point fractional bits.
    stage_timeout_s: seconds each protocol stage waits for the agents.
    noise: distributed-DP noise share each hospital adds to its update
        before it leaves: ``"none"``, ``"discrete"`` (masking only) or
        ``"gaussian"``; noise_sigma: standard deviation of the total noise
        in the summed weighted update; noise_clip_norm: L2 bound applied to
        each update first (``None``: no clipping, then no epsilon applies).
    """

    mode: str = "none"
    dropout_threshold: float = 0.3
    clip_range: float = 4.0
    frac_bits: int = 16
    stage_timeout_s: float = 60.0
    noise: str = "none"
    noise_sigma: float | None = None
    noise_clip_norm: float | None = None


@dataclass
class LedgerConfig:
    """The audit ledger a run records into (TOML table ``[ledger]``).

    enabled: start the replicated ledger and record every update and global
        model (default True); replicas: 3 or 5; dir: the ledger folder
        (``None``: ``<out>/ledger``), reused across runs when it exists.
    """

    enabled: bool = True
    replicas: int = 3
    dir: str | None = None


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
        from the checkpoint there (an error when there is none), reusing the
        run's ledger.
    out: output folder (``None``: ``./runs/<UTC timestamp>``). A folder
        already holding a run is refused unless ``resume`` or ``overwrite``
        (remove the files an earlier run wrote there, then start afresh).
    address: Ray cluster to join (``None``: a local instance on 127.0.0.1);
        num_cpus: CPUs of that local instance (``None``: all cores).
    cache_dir: prepared-array cache (``None``: the data package's default).
    dp: record-level DP-SGD at every hospital (``federation.privacy.DPConfig``,
        TOML table ``[dp]``); ``None`` trains without DP. ``load_config``
        sets ``dp.planned_rounds`` to ``rounds`` unless the file gives it.
    dp_budgets: per-hospital epsilon budgets that replace ``dp.epsilon`` as
        the budget of the hospitals named (``{"hospital-03": 0.5}``); the
        noise stays calibrated to ``dp``.
    secure_agg: see ``SecureAggConfig``. ledger: see ``LedgerConfig``.
    baselines: also train the centralised and local-only yardsticks after
        the rounds (default True); False skips both, and the results hold
        None for ``centralized`` and ``local``.
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
    overwrite: bool = False
    seed: int = 0
    out: str | None = None
    address: str | None = None
    num_cpus: int | None = None
    cache_dir: str | None = None
    dp: DPConfig | None = None
    dp_budgets: dict[str, float] = field(default_factory=dict)
    secure_agg: SecureAggConfig = field(default_factory=SecureAggConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    baselines: bool = True

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
    dp_table = mapping.get("dp") if path is not None else None
    if not (isinstance(dp_table, dict) and "planned_rounds" in dp_table):
        config = plan_dp_for_run(config)
    validate(config)
    return config


def plan_dp_for_run(config: RunConfig) -> RunConfig:
    """``config`` with DP noise calibrated for the run's own ``rounds``.

    Used where the user did not set ``planned_rounds``: calibrating for the
    default 20 rounds in a 3-round run would spend a fraction of the budget
    with needless noise. Unchanged without DP.
    """
    if config.dp is None or config.dp.planned_rounds == config.rounds:
        return config
    return dataclasses.replace(
        config, dp=dataclasses.replace(config.dp, planned_rounds=config.rounds))


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
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        # A section's own checks (e.g. DPConfig's) name the setting; add where.
        section = prefix.rstrip(".") or "top level"
        raise ValueError(f"{where}: [{section}] {exc}") from exc


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
    _validate_privacy(config)
    _validate_secure_agg(config.secure_agg, config.data.hospitals,
                         config.sampled_per_round())
    if config.ledger.replicas not in (3, 5):
        raise ValueError(
            "config field 'ledger.replicas' must be 3 or 5, got "
            f"{config.ledger.replicas!r}"
        )


def _validate_privacy(config: RunConfig) -> None:
    if config.dp is not None and not isinstance(config.dp, DPConfig):
        raise ValueError(
            f"config field 'dp' must be a table of DP settings, got {config.dp!r}"
        )
    if config.dp_budgets and config.dp is None:
        raise ValueError(
            "config field 'dp_budgets' is set but DP is off; add a [dp] table "
            "(or --dp) or remove dp_budgets"
        )
    if not isinstance(config.dp_budgets, dict):
        raise ValueError(
            "config field 'dp_budgets' must map hospital names to epsilon, got "
            f"{config.dp_budgets!r}"
        )
    for name, eps in config.dp_budgets.items():
        _positive(f"dp_budgets.{name}", eps)


def _validate_secure_agg(sa: SecureAggConfig, hospitals: int, sampled: int
                         ) -> None:
    _choice("secure_agg.mode", sa.mode, SECURE_AGG_MODES)
    _choice("secure_agg.noise", sa.noise, NOISE_KINDS)
    if not isinstance(sa.dropout_threshold, (int, float)) or not (
        0 <= sa.dropout_threshold < 1
    ):
        raise ValueError(
            "config field 'secure_agg.dropout_threshold' must be in [0, 1), got "
            f"{sa.dropout_threshold!r}"
        )
    _positive("secure_agg.clip_range", sa.clip_range)
    _at_least("secure_agg.frac_bits", sa.frac_bits, 1)
    _positive("secure_agg.stage_timeout_s", sa.stage_timeout_s)
    if sa.mode != "none" and min(hospitals, sampled) < SECURE_AGG_MIN_HOSPITALS:
        # With two, a hospital that learns the sum (every hospital under
        # masking once the global model moves; the key holder under CKKS,
        # itself a contributor) subtracts its own update and has the other's.
        raise ValueError(
            f"secure aggregation (mode {sa.mode!r}) needs at least "
            f"{SECURE_AGG_MIN_HOSPITALS} hospitals in every round, got "
            f"{hospitals} hospital(s), {sampled} sampled per round: with two, "
            "each can subtract its own update from the sum and learn the "
            "other's. Add hospitals, raise fraction or set secure_agg.mode = "
            "'none'"
        )
    if sa.noise != "none":
        if sa.mode == "none":
            raise ValueError(
                f"config field 'secure_agg.noise' = {sa.noise!r} needs secure "
                "aggregation; set secure_agg.mode to 'mask' or 'ckks'"
            )
        if sa.noise == "discrete" and sa.mode != "mask":
            raise ValueError(
                "discrete noise shares apply to masking only; use "
                "secure_agg.noise = 'gaussian' with mode 'ckks'"
            )
        if sa.noise_sigma is None:
            raise ValueError(
                f"config field 'secure_agg.noise' = {sa.noise!r} needs "
                "secure_agg.noise_sigma (total noise standard deviation)"
            )
        _positive("secure_agg.noise_sigma", sa.noise_sigma)
        if sa.noise_clip_norm is None:
            raise ValueError(
                "noise without clipping bounds no sensitivity and gives no "
                "privacy; set secure_agg.noise_clip_norm"
            )
    if sa.noise_clip_norm is not None:
        _positive("secure_agg.noise_clip_norm", sa.noise_clip_norm)


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

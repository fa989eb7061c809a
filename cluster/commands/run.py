"""``medfed run``: one federated job from a config file and flags.

Flags override the file; the file overrides the defaults of
``cluster.config.RunConfig``. Prints a short comparison table at the end;
``metrics.json``, ``report.md`` and the plots land in ``--out``.
"""

from __future__ import annotations

import argparse
import sys

# Flag destination -> dotted RunConfig field. ``--seed`` sets both seeds.
FLAG_FIELDS = {
    "dataset": "data.dataset",
    "data": "data.path",
    "hospitals": "data.hospitals",
    "partition": "data.partition",
    "alpha": "data.alpha",
    "target": "data.target",
    "rounds": "rounds",
    "local_epochs": "local_epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "model": "model",
    "strategy": "strategy",
    "mu": "mu",
    "fraction": "fraction",
    "quorum": "quorum",
    "round_timeout": "round_timeout_s",
    "checkpoint_dir": "checkpoint_dir",
    "out": "out",
    "address": "address",
    "num_cpus": "num_cpus",
    "cache_dir": "cache_dir",
    "secure_agg": "secure_agg.mode",
    "dropout_threshold": "secure_agg.dropout_threshold",
}

# Flag destination -> DPConfig field; any of them (or --dp) turns DP on.
DP_FLAGS = {
    "epsilon": "epsilon",
    "delta": "delta",
    "noise_multiplier": "noise_multiplier",
    "max_grad_norm": "max_grad_norm",
    "accountant": "accountant",
}


def register(sub) -> None:
    """Adds ``run`` to the ``medfed`` sub-command parser."""
    p = sub.add_parser(
        "run",
        help="run a federated job over hospital actors and compare with baselines",
        description="Federated training over simulated hospitals on Ray; writes "
                    "metrics.json, report.md and plots to --out.",
    )
    p.add_argument("config", nargs="?", help="TOML or YAML run configuration")
    p.add_argument("--dataset", choices=("diabetes130", "synthetic"))
    p.add_argument("--data", metavar="PATH", help="Diabetes 130 zip, CSV or folder")
    p.add_argument("--hospitals", type=int, metavar="N")
    p.add_argument("--partition", choices=("iid", "dirichlet", "natural"))
    p.add_argument("--alpha", type=float, metavar="A", help="Dirichlet concentration")
    p.add_argument("--target", choices=("readmit30", "readmit_any"))
    p.add_argument("--rounds", type=int, metavar="R")
    p.add_argument("--local-epochs", type=int, metavar="E")
    p.add_argument("--batch-size", type=int, metavar="B")
    p.add_argument("--lr", type=float, help="local learning rate")
    p.add_argument("--model", choices=("logreg", "mlp"))
    p.add_argument("--strategy", choices=("fedavg", "fedprox", "fedadam"))
    p.add_argument("--mu", type=float, help="FedProx proximal coefficient")
    p.add_argument("--fraction", type=float, help="share of hospitals per round")
    p.add_argument("--quorum", type=float,
                   help="accepted updates needed: fraction below 1, else a count")
    p.add_argument("--round-timeout", type=float, metavar="SECONDS")
    p.add_argument("--seed", type=int, metavar="S", help="run and data seed")
    p.add_argument("--checkpoint-dir", metavar="DIR")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint "
                        "(--checkpoint-dir) and ledger")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (removes only what "
                        "medfed wrote there)")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/<time>)")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster to join")
    p.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of a local Ray")
    p.add_argument("--cache-dir", metavar="DIR", help="prepared-array cache")
    p.add_argument("--dp", action="store_true",
                   help="record-level DP-SGD at every hospital (default budget "
                        "epsilon 3.0 at delta 1e-5; see --epsilon)")
    p.add_argument("--epsilon", type=float, metavar="EPS",
                   help="privacy budget per hospital over the run, at --delta")
    p.add_argument("--delta", type=float, metavar="D", help="DP delta (1e-5)")
    p.add_argument("--noise-multiplier", type=float, metavar="Z",
                   help="fixed DP-SGD noise (default: calibrated from --epsilon)")
    p.add_argument("--max-grad-norm", type=float, metavar="C",
                   help="per-row gradient clipping bound")
    p.add_argument("--accountant", choices=("prv", "rdp"))
    p.add_argument("--secure-agg", choices=("none", "mask", "ckks"),
                   help="secure aggregation of the hospitals' updates")
    p.add_argument("--dropout-threshold", type=float, metavar="F",
                   help="share of hospitals that may drop from a secure round")
    p.add_argument("--no-ledger", action="store_true",
                   help="run without the audit ledger")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the centralised and local-only comparison models")
    p.set_defaults(func=run_command)


def overrides_from(args: argparse.Namespace) -> dict:
    """Dotted-field overrides from the parsed flags (unset flags are skipped)."""
    overrides = {
        field: getattr(args, flag, None) for flag, field in FLAG_FIELDS.items()
    }
    if args.seed is not None:
        overrides["seed"] = args.seed
        overrides["data.seed"] = args.seed
    if args.resume:
        overrides["resume"] = True
    if getattr(args, "overwrite", False):
        overrides["overwrite"] = True
    if getattr(args, "no_ledger", False):
        overrides["ledger.enabled"] = False
    if getattr(args, "no_baselines", False):
        overrides["baselines"] = False
    return overrides


# Budget per hospital over the run when DP is on and neither epsilon nor
# noise_multiplier is given (at the default delta 1e-5).
DEFAULT_EPSILON = 3.0


def with_dp_flags(config, args: argparse.Namespace):
    """``config`` with DP switched on or changed by ``--dp`` and the DP flags.

    Flags override the file's ``[dp]`` table field by field; ``--dp`` alone
    uses epsilon ``DEFAULT_EPSILON`` at delta 1e-5; without a ``[dp]`` table
    the noise is calibrated for the run's ``rounds``. DPConfig's own checks
    refuse invalid settings (ValueError naming the setting).
    """
    import dataclasses

    from cluster.config import validate
    from federation.dp_config import DPConfig

    given = {
        field: getattr(args, flag) for flag, field in DP_FLAGS.items()
        if getattr(args, flag, None) is not None
    }
    if not given and not getattr(args, "dp", False):
        return config
    settings = dataclasses.asdict(config.dp) if config.dp is not None else {}
    settings.update(given)
    if settings.get("epsilon") is None and settings.get("noise_multiplier") is None:
        # --dp alone: the documented default budget (configs/diabetes130.toml).
        settings["epsilon"] = DEFAULT_EPSILON
    # Without a [dp] table nobody chose planned_rounds: plan for this run.
    settings.setdefault("planned_rounds", config.rounds)
    try:
        dp = DPConfig(**settings)
    except ValueError as exc:
        raise ValueError(f"DP settings refused: {exc}") from exc
    config = dataclasses.replace(config, dp=dp)
    validate(config)
    return config


def run_command(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.job import run_job

    config = with_dp_flags(load_config(args.config, overrides_from(args)), args)
    results = run_job(config)
    print(summary_table(results))
    return outcome(results)


# Exit status of a run whose every round failed: the model is untrained.
EXIT_ALL_ROUNDS_FAILED = 3


def outcome(results: dict) -> int:
    """0, or ``EXIT_ALL_ROUNDS_FAILED`` with a line on stderr when no round
    succeeded; a run with some failed rounds gets a warning line and 0."""

    rounds = results.get("rounds") or []
    failed = [r for r in rounds if r.get("status") == "failed"]
    if not failed:
        return 0
    first = failed[0].get("failure") or "no reason recorded"
    where = results["config"]["out"]
    if len(failed) == len(rounds):
        print(f"medfed: error: all {len(rounds)} round(s) failed, the federated "
              f"model is untrained (round {failed[0]['round']}: {first}); see "
              f"{where}/report.md", file=sys.stderr)
        return EXIT_ALL_ROUNDS_FAILED
    print(f"medfed: warning: {len(failed)} of {len(rounds)} round(s) failed "
          f"(round {failed[0]['round']}: {first}); see {where}/report.md",
          file=sys.stderr)
    return 0


def summary_table(results: dict) -> str:
    """A few lines comparing the federated model with its yardsticks."""
    def fmt(x) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    rows = [
        ("federated", results["federated"]),
        ("centralised", results["centralized"]),
    ]
    lines = [f"{'model':<14}{'AUROC':>8}{'AUPRC':>8}{'Brier':>8}{'ECE':>8}"]
    for label, m in rows:
        if m is None:
            # Baselines switched off (--no-baselines).
            lines.append(f"{label:<14}{'skipped':>8}")
            continue
        lines.append(f"{label:<14}{fmt(m.get('auroc')):>8}{fmt(m.get('auprc')):>8}"
                     f"{fmt(m.get('brier')):>8}{fmt(m.get('ece')):>8}")
    local = results.get("local")
    local_auroc = fmt(local["mean_auroc"]) if local is not None else "skipped"
    lines.append(f"{'local (mean)':<14}{local_auroc:>8}")
    if results.get("bayes_auroc") is not None:
        lines.append(f"{'Bayes optimum':<14}{fmt(results['bayes_auroc']):>8}")
    privacy = results.get("privacy")
    if privacy:
        spent = {n: h["epsilon_total"] for n, h in privacy["per_hospital"].items()}
        declined = [n for n, h in privacy["per_hospital"].items() if h["declined"]]
        lines.append(
            f"privacy: max epsilon {max(spent.values(), default=0):.3f} at delta "
            f"{privacy['delta']:g}; declined: {', '.join(declined) or 'none'}"
        )
    ledger = results.get("ledger")
    if ledger:
        lines.append(f"ledger head {ledger['head_hash']} at height "
                     f"{ledger['block_height']}; verify: {ledger['verify']}")
    rounds = results["rounds"]
    ok = sum(r["status"] == "ok" for r in rounds)
    lines.append(
        f"{len(rounds)} round(s), {ok} ok, {len(results['failures'])} failure "
        f"event(s), {results['runtime']['seconds']:.1f} s; "
        f"report in {results['config']['out']}"
    )
    return "\n".join(lines)

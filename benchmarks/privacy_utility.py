"""Privacy against utility on Diabetes 130: non-private FedAvg vs DP-SGD runs.

Workload: ``configs/diabetes130.toml`` as shipped (10 hospitals, label-skewed
Dirichlet split with alpha 0.5, 30-day readmission, logistic regression,
FedAvg). Runs, each a full ``cluster.job.run_job`` on a local Ray instance
on 127.0.0.1:

- ``non-private``: the config as is (no DP, no secure aggregation);
- ``dp eps=E`` for E in 1, 3 and 8: record-level DP-SGD at every hospital
  (noise calibrated so the planned rounds spend at most E at delta 1e-5,
  PRV accountant) with secure aggregation by masking.

The ledger is off in every run (it records, it does not change the model;
its cost is measured elsewhere). Each run's final global model is scored on
the same held-out test patients: AUROC and AUPRC, and their difference to
the non-private run; also epsilon spent per hospital and wall seconds.

DP hyper-parameters (rounds, lr, max_grad_norm, batch size) are flags. With
``--tune``, a small grid is tried at epsilon 3 first and the setting with
the best mean validation AUROC of the hospitals' local models in the last
round (the hospitals' own validation patients, never the test patients) is
used for every epsilon; the grid and its scores are printed.

Usage:
    python benchmarks/privacy_utility.py [--out DIR] [--rounds 20] [--lr 0.5]
        [--max-grad-norm 1.0] [--batch-size 256] [--tune] [--num-cpus 2]

Writes ``DIR/privacy_utility.md`` (the table and the settings) and each
run's own report under ``DIR/<run>/``. The last line printed is one JSON
object of the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
TUNE_GRID = ({"lr": 0.5, "max_grad_norm": 1.0}, {"lr": 1.0, "max_grad_norm": 1.0},
             {"lr": 0.5, "max_grad_norm": 0.5}, {"lr": 2.0, "max_grad_norm": 0.5})


def base_config(args: argparse.Namespace, out: Path):
    """``configs/diabetes130.toml`` with this benchmark's switches."""
    from cluster.config import LedgerConfig, load_config

    config = load_config(REPO / "configs" / "diabetes130.toml")
    data = config.data
    if args.data:
        data = dataclasses.replace(data, path=args.data)
    return dataclasses.replace(
        config, data=data, num_cpus=args.num_cpus, cache_dir=args.cache_dir,
        ledger=LedgerConfig(enabled=False), out=str(out),
        # The run folders are fixed names, replaced on each benchmark run.
        overwrite=True,
    )


def dp_config(config, epsilon: float, settings: dict):
    """``config`` with DP at ``epsilon`` and masking, using ``settings``."""
    from cluster.config import SecureAggConfig
    from federation.privacy import DPConfig

    rounds = settings["rounds"]
    dp = DPConfig(epsilon=epsilon, delta=DELTA,
                  max_grad_norm=settings["max_grad_norm"], accountant="prv",
                  planned_rounds=rounds)
    return dataclasses.replace(
        config, dp=dp, rounds=rounds, lr=settings["lr"],
        batch_size=settings["batch_size"],
        secure_agg=SecureAggConfig(mode="mask"),
    )


def run(config) -> tuple[dict, float]:
    from cluster.job import run_job

    started = time.perf_counter()
    results = run_job(config)
    return results, time.perf_counter() - started


def summarise(label: str, results: dict, seconds: float, base: dict | None) -> dict:
    fed = results["federated"]
    row = {
        "run": label,
        "auroc": fed["auroc"],
        "auprc": fed["auprc"],
        "auroc_vs_non_private": None if base is None else fed["auroc"] - base["auroc"],
        "auprc_vs_non_private": None if base is None else fed["auprc"] - base["auprc"],
        "rounds_ok": fed.get("rounds_ok"),
        "seconds": seconds,
        "epsilon_per_hospital": None,
        "declined": [],
    }
    privacy = results.get("privacy")
    if privacy:
        per = privacy["per_hospital"]
        row["epsilon_per_hospital"] = {n: h["epsilon_total"] for n, h in per.items()}
        row["declined"] = [n for n, h in per.items() if h["declined"]]
    return row


def last_val_auroc(results: dict) -> float:
    values = [r["mean_val_auroc"] for r in results["rounds"]
              if r.get("mean_val_auroc") is not None]
    return values[-1] if values else float("nan")


def markdown(rows: list[dict], settings: dict, tuning: list[dict]) -> str:
    def f(x, d=4):
        return "n/a" if x is None else f"{x:+.{d}f}" if isinstance(x, float) and (
            x < 0) else f"{x:.{d}f}" if isinstance(x, float) else str(x)

    lines = ["# Privacy against utility (Diabetes 130, 10 hospitals, non-IID)", "",
             "Final global model on the held-out test patients. DP runs use "
             "record-level DP-SGD at every hospital (epsilon per hospital over "
             f"the run at delta {DELTA:g}, PRV accountant) and masked secure "
             "aggregation; the non-private run uses neither.", "",
             "| run | AUROC | AUROC vs non-private | AUPRC | AUPRC vs non-private "
             "| max epsilon spent | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        eps = r["epsilon_per_hospital"]
        top = max(eps.values()) if eps else None
        lines.append(
            f"| {r['run']} | {f(r['auroc'])} | {f(r['auroc_vs_non_private'])} | "
            f"{f(r['auprc'])} | {f(r['auprc_vs_non_private'])} | "
            f"{f(top, 3)} | {r['seconds']:.0f} |")
    lines += ["", "DP settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
              ""]
    if tuning:
        lines += ["Tuning at epsilon 3 (selected by the hospitals' mean local "
                  "validation AUROC in the last round; test patients unused):", ""]
        lines += [f"- {t['settings']}: validation AUROC {t['val_auroc']:.4f}"
                  for t in tuning] + [""]
    lines += ["Epsilon spent per hospital:", ""]
    for r in rows:
        if r["epsilon_per_hospital"]:
            spent = ", ".join(f"{n} {e:.3f}" for n, e in
                              r["epsilon_per_hospital"].items())
            lines.append(f"- {r['run']}: {spent}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/privacy-utility")
    parser.add_argument("--data", default=None, help="Diabetes 130 zip (else env)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tune", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from cluster.runtime import ray_session

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"rounds": args.rounds, "lr": args.lr,
                "max_grad_norm": args.max_grad_norm, "batch_size": args.batch_size}
    started = time.perf_counter()
    rows, tuning = [], []
    with ray_session(num_cpus=args.num_cpus):
        config = base_config(args, out / "non-private")
        results, seconds = run(config)
        base = summarise("non-private", results, seconds, None)
        rows.append(base)
        print(f"non-private: AUROC {base['auroc']:.4f} ({seconds:.0f} s)", flush=True)

        if args.tune:
            for i, grid in enumerate(TUNE_GRID):
                trial = {**settings, **grid}
                cfg = dp_config(dataclasses.replace(
                    config, out=str(out / f"tune-{i}")), 3.0, trial)
                results, _ = run(cfg)
                tuning.append({"settings": grid, "val_auroc": last_val_auroc(results)})
                print(f"tune {grid}: val AUROC {tuning[-1]['val_auroc']:.4f}",
                      flush=True)
            best = max(tuning, key=lambda t: t["val_auroc"])
            settings.update(best["settings"])

        for eps in EPSILONS:
            run_out = str(out / f"dp-eps{eps:g}")
            cfg = dp_config(dataclasses.replace(config, out=run_out), eps, settings)
            results, seconds = run(cfg)
            row = summarise(f"dp eps={eps:g}", results, seconds, base)
            rows.append(row)
            print(f"dp eps={eps:g}: AUROC {row['auroc']:.4f} "
                  f"({row['auroc_vs_non_private']:+.4f}) {seconds:.0f} s", flush=True)

    report = markdown(rows, settings, tuning)
    (out / "privacy_utility.md").write_text(report)
    print()
    header = (f"{'run':<14}{'AUROC':>8}{'vs np':>9}{'AUPRC':>8}{'vs np':>9}"
              f"{'max eps':>9}{'seconds':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        eps = r["epsilon_per_hospital"]
        top = f"{max(eps.values()):.3f}" if eps else "-"
        d1 = "" if r["auroc_vs_non_private"] is None else \
            f"{r['auroc_vs_non_private']:+.4f}"
        d2 = "" if r["auprc_vs_non_private"] is None else \
            f"{r['auprc_vs_non_private']:+.4f}"
        print(f"{r['run']:<14}{r['auroc']:>8.4f}{d1:>9}{r['auprc']:>8.4f}{d2:>9}"
              f"{top:>9}{r['seconds']:>9.0f}")
    print(f"DP settings: {settings}; delta {DELTA:g}; secure aggregation: mask; "
          f"report: {out / 'privacy_utility.md'}")
    print(json.dumps({
        "workload": "configs/diabetes130.toml, 10 hospitals, dirichlet alpha 0.5",
        "delta": DELTA,
        "dp_settings": settings,
        "tuning": tuning,
        "runs": rows,
        "benchmark_seconds": time.perf_counter() - started,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

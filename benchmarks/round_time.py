"""Round time, end-to-end time and memory: medfed vs Flower vs a plain loop.

One workload, run three ways, each in its own fresh process:

- ``medfed``: ``cluster.job.run_job`` (hospital actors and a coordinator on a
  local Ray instance on 127.0.0.1 with 2 CPUs), with the ledger, DP, secure
  aggregation and the centralised and local-only baselines switched off
  (``baselines = False``), so it does the work the other ways do; it still
  writes its report and checkpoints. Its phase timings are printed so that
  extra work is visible.
- ``flower``: Flower's simulation engine (``flwr.simulation.run_simulation``,
  a ``ServerApp`` running Flower's own ``FedAvg`` strategy and a ``ClientApp``),
  on its Ray backend started on 127.0.0.1 with 2 CPUs, one CPU per client
  actor. The client trains with the same ``LocalTrainer``, kept alive in the
  actor across rounds, so Flower is measured at its best.
- ``plain``: a single-process loop over the same trainers and
  ``federation.aggregation.FedAvg``, with no framework at all: the floor.

Workload: Diabetes 130 (``clinical.prepare``), readmission within 30 days,
10 IID hospitals, logistic regression, plain SGD, batch 256, one local epoch
per round, 20 rounds, FedAvg, no differential privacy, no secure
aggregation; every round scores the global model on the held-out test
patients. The same data rows, initial weights, hospital seeds and learning
rate are used by all three ways, so the final AUROCs should agree.

Measured per way: wall seconds from process start to exit (imports, data
loading, Ray start and shutdown included), median seconds per round, peak
memory of the whole process tree (sum of resident set sizes of the process
and all its descendants, sampled every 0.1 s; shared pages are counted in
every process that maps them, as ``ps`` would) and the final test AUROC.
The wall time is split into imports, work (Ray start and shutdown included)
and interpreter exit; peak PSS (shared pages split between the processes
that map them) and the peak RSS per kind of process are printed too.

Usage:
    python benchmarks/round_time.py [--rounds 20] [--ways medfed,flower,plain]

Prints a table, and as its last line one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WAYS = ("medfed", "flower", "plain")
CONFIG_ENV = "MEDFED_ROUND_TIME_CONFIG"
SAMPLE_SECONDS = 0.1
# Wall-clock instants a way's process passes (time.time()): "imported" after
# its heavy imports, "finished" when its work (Ray shutdown included) is done.
MARKS: dict[str, float] = {}


# ------------------------------------------------------------- workload


def _spec(cfg: dict):
    from clinical.spec import DataSpec

    return DataSpec(dataset="diabetes130", path=cfg["data"], target="readmit30",
                    seed=cfg["seed"], hospitals=cfg["hospitals"], partition="iid")


def _initial_weights(cfg: dict, n_features: int):
    from federation.models import build_model, get_weights

    return get_weights(build_model("logreg", n_features, seed=cfg["seed"]))


def _hospital_seed(cfg: dict, index: int) -> int:
    # The seed medfed's hospital actors give their trainers.
    return cfg["seed"] + 1000 * (index + 1)


def _trainer(cfg: dict, index: int):
    from clinical.prepared import load_hospital
    from federation.training import LocalTrainer

    data = load_hospital(_spec(cfg), index, cache_dir=cfg["cache_dir"])
    return LocalTrainer("logreg", data.X_train, data.y_train,
                        batch_size=cfg["batch_size"], lr=cfg["lr"], optimizer="sgd",
                        seed=_hospital_seed(cfg, index))


def _test_auroc(weights, X, y) -> float:
    from federation.metrics import binary_metrics
    from federation.training import predict_proba

    return binary_metrics(y, predict_proba("logreg", weights, X))["auroc"]


# ------------------------------------------------------------- the ways


def run_plain(cfg: dict) -> dict:
    """Single process: every hospital's fit in turn, then FedAvg, then scoring."""
    import torch

    from clinical.prepared import prepare
    from federation.aggregation import FedAvg, Update

    MARKS["imported"] = time.time()
    torch.set_num_threads(1)
    prepared = prepare(_spec(cfg), cache_dir=cfg["cache_dir"])
    trainers = [_trainer(cfg, i) for i in range(cfg["hospitals"])]
    weights = _initial_weights(cfg, prepared.X_train.shape[1])
    strategy = FedAvg()

    round_seconds, auroc = [], float("nan")
    for rnd in range(1, cfg["rounds"] + 1):
        started = time.perf_counter()
        updates = []
        for i, trainer in enumerate(trainers):
            fit = trainer.fit(weights, epochs=1)
            updates.append(Update(f"hospital-{i:02d}", rnd, fit.delta,
                                  fit.num_samples, fit.metrics))
        weights = strategy.aggregate(weights, updates, expected_round=rnd)
        auroc = _test_auroc(weights, prepared.X_test, prepared.y_test)
        round_seconds.append(time.perf_counter() - started)
    MARKS["finished"] = time.time()
    return {"round_seconds": round_seconds, "auroc": auroc}


def _medfed_config(cfg: dict, out: str):
    """The RunConfig for the workload, and the optional features set for it.

    Everything the other ways do not do is switched off explicitly: the
    audit ledger, differential privacy, secure aggregation and the
    centralised and local-only baselines.
    """
    from cluster.config import LedgerConfig, RunConfig, SecureAggConfig

    config = RunConfig(
        data=_spec(cfg), model="logreg", rounds=cfg["rounds"], local_epochs=1,
        batch_size=cfg["batch_size"], lr=cfg["lr"], optimizer="sgd",
        strategy="fedavg", fraction=1.0, seed=cfg["seed"], out=out,
        num_cpus=2, cache_dir=cfg["cache_dir"],
        ledger=LedgerConfig(enabled=False), dp=None,
        secure_agg=SecureAggConfig(mode="none"), baselines=False,
    )
    switches = {"ledger.enabled": config.ledger.enabled, "dp": config.dp,
                "secure_agg.mode": config.secure_agg.mode,
                "baselines": config.baselines}
    return config, switches


def run_medfed(cfg: dict) -> dict:
    """``cluster.job.run_job`` on the workload; round times from its records."""
    import logging

    from cluster.job import run_job

    MARKS["imported"] = time.time()
    # Timestamped job lines in the way's log show where start-up time goes.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = str(Path(cfg["work_dir"]) / "medfed-run")
    config, switches = _medfed_config(cfg, out)
    results = run_job(config)
    MARKS["finished"] = time.time()

    rounds = results.get("rounds") or []
    round_seconds = [r["seconds"] for r in rounds if r.get("seconds") is not None]
    runtime = results.get("runtime") or {}
    # Where a median round went, from the coordinator's own split.
    splits = [r["phase_seconds"] for r in rounds if r.get("phase_seconds")]
    round_phases = {k: statistics.median(s[k] for s in splits)
                    for k in (splits[0] if splits else {})}
    return {
        "round_seconds": round_seconds,
        "round_phase_seconds": round_phases,
        "auroc": (results.get("federated") or {}).get("auroc"),
        "rounds_ok": sum(r.get("status", "ok") == "ok" for r in rounds),
        "phase_seconds": runtime.get("phase_seconds") or {},
        "switches": switches,
        "config_fields": sorted(f.name for f in dataclasses.fields(config)),
    }


# Flower's client and server apps live at module level so that Ray workers
# import them by name (the script folder is on their PYTHONPATH) and the
# trainer cache below survives from round to round inside each actor.
_FLOWER_TRAINERS: dict = {}


def _flower_train(msg, context):
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    cfg = json.loads(os.environ[CONFIG_ENV])
    index = int(context.node_config["partition-id"])
    trainer = _FLOWER_TRAINERS.get(index)
    if trainer is None:
        trainer = _FLOWER_TRAINERS[index] = _trainer(cfg, index)

    # A hospital may land on either actor of the pool; its shuffling stream
    # travels in the node's Flower context so batches match the other ways.
    if "rng" in context.state:
        state = context.state["rng"]["state"]
        trainer.generator.set_state(
            torch.frombuffer(bytearray(state), dtype=torch.uint8)
        )

    weights = np.concatenate(
        [a.reshape(-1) for a in msg.content["arrays"].to_numpy_ndarrays()]
    ).astype(np.float32)
    fit = trainer.fit(weights, epochs=1)
    context.state["rng"] = ConfigRecord(
        {"state": trainer.generator.get_state().numpy().tobytes()}
    )
    content = RecordDict({
        "arrays": ArrayRecord([weights + fit.delta]),
        "metrics": MetricRecord({"num-examples": fit.num_samples,
                                 "train_loss": float(fit.metrics["loss"])}),
    })
    return Message(content=content, reply_to=msg)


def _flower_apps(cfg: dict, log: dict):
    import numpy as np
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from clinical.prepared import prepare

    client_app = ClientApp()
    client_app.train()(_flower_train)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        prepared = prepare(_spec(cfg), cache_dir=cfg["cache_dir"])
        X_test, y_test = prepared.X_test, prepared.y_test
        initial = _initial_weights(cfg, X_test.shape[1])

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            w = np.concatenate([a.reshape(-1) for a in arrays.to_numpy_ndarrays()])
            auroc = _test_auroc(w.astype(np.float32), X_test, y_test)
            log["marks"].append(time.perf_counter())
            log["auroc"] = auroc
            return MetricRecord({"auroc": auroc})

        n = cfg["hospitals"]
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                          min_train_nodes=n, min_available_nodes=n)
        strategy.start(grid=grid, initial_arrays=ArrayRecord([initial]),
                       num_rounds=cfg["rounds"], evaluate_fn=evaluate)

    return server_app, client_app


def run_flower(cfg: dict) -> dict:
    """Flower's simulation engine on its Ray backend (loopback, 2 CPUs)."""
    import ray
    from flwr.simulation import run_simulation

    import round_time  # this file as a module, so workers import it by name

    MARKS["imported"] = time.time()
    os.environ[CONFIG_ENV] = json.dumps(cfg)
    log: dict = {"marks": [], "auroc": None}
    server_app, client_app = round_time._flower_apps(cfg, log)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "_node_ip_address": "127.0.0.1",
                      "include_dashboard": False, "logging_level": "warning"},
    }
    try:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=cfg["hospitals"], backend_config=backend_config)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    MARKS["finished"] = time.time()

    # evaluate_fn runs once before round 1 and once after every round.
    marks = log["marks"]
    round_seconds = [b - a for a, b in zip(marks, marks[1:])]
    return {"round_seconds": round_seconds, "auroc": log["auroc"]}


CHILDREN = {"medfed": run_medfed, "flower": run_flower, "plain": run_plain}


# ------------------------------------------------------------- measuring


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """``{pid: (ppid, session, rss_bytes)}`` for every process, from /proc."""
    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # the process ended between listing and reading
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        # After the command name: state, ppid, pgrp, session, ..., rss (22nd).
        table[int(entry)] = (int(fields[1]), int(fields[3]), int(fields[21]) * page)
    return table


def tree_members(root: int, table: dict) -> set[int]:
    """The root, its descendants, and any process still in the root's session."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    members, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in members:
            continue
        members.add(pid)
        stack.extend(children.get(pid, []))
    # Daemons re-parented to init keep the session the root was started in.
    members |= {pid for pid, (_, sid, _) in table.items() if sid == root}
    return {pid for pid in members if pid in table}


def _label(pid: int) -> str:
    """A short name for a process: Ray's title, a program or a Python script."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    program = os.path.basename(argv[0])
    if program.startswith("python"):
        rest = [a for a in argv[1:] if not a.startswith("-")]
        if "-m" in argv[1:-1]:
            return "python -m " + argv[argv.index("-m") + 1]
        return "python " + (os.path.basename(rest[0]) if rest else "")
    return program


def _pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between sharers)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process tree every 0.1 s until stopped.

    Also keeps, at the peak, the RSS per kind of process, and samples the
    summed PSS once a second (PSS splits shared pages such as the torch
    libraries between the processes that map them, so it does not count
    them ten times).
    """

    PSS_EVERY = 10

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.peak_breakdown: dict[str, list[int]] = {}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            table = _proc_table()
            members = tree_members(self.root, table)
            rss = sum(table[p][2] for p in members)
            if rss > self.peak_rss:
                self.peak_rss = rss
                breakdown: dict[str, list[int]] = {}
                for pid in members:
                    entry = breakdown.setdefault(_label(pid), [0, 0])
                    entry[0] += 1
                    entry[1] += table[pid][2]
                self.peak_breakdown = breakdown
            if self.samples % self.PSS_EVERY == 0:
                self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in members))
            self.peak_processes = max(self.peak_processes, len(members))
            self.samples += 1
            self._halt.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _end_leftovers(root: int) -> int:
    """Ends processes of the finished way's session that outlived it; count."""
    left = tree_members(root, _proc_table()) - {root}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline:
            left = tree_members(root, _proc_table()) - {root}
            if not left:
                break
            time.sleep(0.2)
    return len(left)


def measure(way: str, cfg: dict, timeout_s: float) -> dict:
    """Runs one way in a fresh process in its own session; returns its figures."""
    work = Path(cfg["work_dir"])
    result_path = work / f"{way}.json"
    log_path = work / f"{way}.log"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    command = [sys.executable, str(Path(__file__).resolve()), "--child", way,
               "--child-config", json.dumps(cfg), "--child-result", str(result_path)]

    with open(log_path, "wb") as log_file:
        launched = time.time()
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                env=env, cwd=str(REPO), start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        wall = time.perf_counter() - started
        exited = time.time()
        sampler.stop()
    leftovers = _end_leftovers(proc.pid)

    figures = {"way": way, "rc": rc, "wall_seconds": wall,
               "peak_rss_bytes": sampler.peak_rss,
               "peak_processes": sampler.peak_processes,
               "peak_pss_bytes": sampler.peak_pss,
               "peak_rss_by_process": {
                   k: {"processes": n, "rss_bytes": r}
                   for k, (n, r) in sorted(sampler.peak_breakdown.items(),
                                           key=lambda kv: -kv[1][1])},
               "rss_samples": sampler.samples, "leftover_processes": leftovers,
               "log": str(log_path)}
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        figures["error"] = f"exit status {rc}; log tail:\n" + "\n".join(tail)
        return figures
    child = json.loads(result_path.read_text())
    marks = child.pop("marks", {})
    if "imported" in marks and "finished" in marks:
        # Where the wall time went: interpreter and imports, the work, exit.
        figures["startup_seconds"] = marks["imported"] - launched
        figures["work_seconds"] = marks["finished"] - marks["imported"]
        figures["exit_seconds"] = exited - marks["finished"]
    rounds = child.get("round_seconds") or []
    figures.update(child)
    figures["median_round_seconds"] = statistics.median(rounds) if rounds else None
    figures["first_round_seconds"] = rounds[0] if rounds else None
    return figures


MEDIAN_KEYS = ("wall_seconds", "median_round_seconds", "first_round_seconds",
               "peak_rss_bytes", "peak_pss_bytes", "peak_processes",
               "startup_seconds", "work_seconds", "exit_seconds")


def combine(runs: list[dict]) -> dict:
    """One way's figures over repeated runs: medians, from successful runs only."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    combined = dict(ok[len(ok) // 2])
    for key in MEDIAN_KEYS:
        values = [r[key] for r in ok if r.get(key) is not None]
        combined[key] = statistics.median(values) if values else None
    combined["runs"] = len(runs)
    combined["failed_runs"] = len(runs) - len(ok)
    combined["wall_seconds_each"] = [r.get("wall_seconds") for r in runs]
    return combined


# ------------------------------------------------------------- reporting


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _s(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f} s"


def print_table(results: dict[str, dict], cfg: dict) -> None:
    print()
    print(f"Workload: Diabetes 130, readmission <30 d, {cfg['hospitals']} IID "
          f"hospitals, logistic regression, SGD lr {cfg['lr']}, batch "
          f"{cfg['batch_size']}, 1 local epoch, {cfg['rounds']} rounds, FedAvg, "
          "no DP, no secure aggregation")
    runs = max((r.get("runs", 1) for r in results.values()), default=1)
    if runs > 1:
        print(f"Each way ran {runs} times; figures are medians over the runs.")
    header = ("way", "wall", "imports", "work", "exit", "median round", "round 1",
              "peak RSS", "procs", "test AUROC")
    rows = []
    for way, r in results.items():
        auroc = r.get("auroc")
        rows.append((way, _s(r.get("wall_seconds"), 1),
                     _s(r.get("startup_seconds"), 1), _s(r.get("work_seconds"), 1),
                     _s(r.get("exit_seconds"), 1),
                     _s(r.get("median_round_seconds"), 3),
                     _s(r.get("first_round_seconds"), 2),
                     _gb(r.get("peak_rss_bytes")), str(r.get("peak_processes", "-")),
                     "-" if auroc is None else f"{auroc:.4f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))

    print("(wall = imports + work + exit: imports from process launch to the end "
          "of the way's imports; work includes Ray start and shutdown; exit is "
          "interpreter teardown)")
    print("\npeak RSS by process (count x kind: total):")
    for way, r in results.items():
        parts = [f"{v['processes']} x {k}: {_gb(v['rss_bytes'])}"
                 for k, v in (r.get("peak_rss_by_process") or {}).items()]
        print(f"  {way}: " + "; ".join(parts[:8]))
    pss = [f"{w} {_gb(r.get('peak_pss_bytes'))}" for w, r in results.items()]
    print("peak PSS (shared pages split between processes, sampled every 1 s): "
          + ", ".join(pss))

    medfed = results.get("medfed", {})
    if medfed.get("phase_seconds"):
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in medfed["phase_seconds"].items())
        print(f"\nmedfed phases: {phases}")
    if medfed.get("round_phase_seconds"):
        split = ", ".join(f"{k} {v * 1000:.1f} ms"
                          for k, v in medfed["round_phase_seconds"].items())
        print(f"medfed median round split (coordinator): {split}")
    if "switches" in medfed:
        found = medfed["switches"] or {}
        print("medfed optional features switched off: "
              + ", ".join(f"{k}={v}" for k, v in found.items()))
    for way, r in results.items():
        if "error" in r:
            print(f"\n{way} FAILED: {r['error']}")
        elif r.get("failed_runs"):
            print(f"\n{way}: {r['failed_runs']} of {r['runs']} runs failed; "
                  f"see the logs")
        if r.get("leftover_processes"):
            print(f"{way}: {r['leftover_processes']} process(es) outlived it "
                  "and could not be ended")


def summary(results: dict[str, dict]) -> dict:
    """The JSON figures, ratios and goal checks (None where a way failed)."""
    out: dict = {}
    for way, r in results.items():
        out[f"{way}_wall_seconds"] = r.get("wall_seconds")
        out[f"{way}_median_round_seconds"] = r.get("median_round_seconds")
        out[f"{way}_first_round_seconds"] = r.get("first_round_seconds")
        out[f"{way}_peak_rss_bytes"] = r.get("peak_rss_bytes")
        out[f"{way}_peak_processes"] = r.get("peak_processes")
        out[f"{way}_peak_pss_bytes"] = r.get("peak_pss_bytes")
        out[f"{way}_imports_seconds"] = r.get("startup_seconds")
        out[f"{way}_work_seconds"] = r.get("work_seconds")
        out[f"{way}_exit_seconds"] = r.get("exit_seconds")
        out[f"{way}_auroc"] = r.get("auroc")
    medfed, flower, plain = (results.get(w, {}) for w in WAYS)

    def ratio(a, b):
        return a / b if a is not None and b else None

    out["speedup_vs_flower"] = ratio(flower.get("wall_seconds"),
                                     medfed.get("wall_seconds"))
    out["memory_ratio_vs_flower"] = ratio(medfed.get("peak_rss_bytes"),
                                          flower.get("peak_rss_bytes"))
    out["median_round_ratio_vs_plain"] = ratio(medfed.get("median_round_seconds"),
                                               plain.get("median_round_seconds"))
    phases = medfed.get("phase_seconds") or {}
    for phase, value in phases.items():
        out[f"medfed_phase_{phase}_seconds"] = value
    for phase, value in (medfed.get("round_phase_seconds") or {}).items():
        out[f"medfed_median_round_{phase}_seconds"] = value
    if "switches" in medfed:
        # The ledger, DP, secure-aggregation and baseline settings medfed ran
        # with: all off, so it does the same work as the other ways.
        out["medfed_optional_features_switched_off"] = medfed["switches"]
    if medfed.get("auroc") is not None and flower.get("auroc") is not None:
        out["auroc_difference_medfed_minus_flower"] = medfed["auroc"] - flower["auroc"]

    def goal(ok):
        return None if ok is None else bool(ok)

    same_auroc = out.get("auroc_difference_medfed_minus_flower")
    out["goal_3x_faster_than_flower_met"] = goal(
        None if out["speedup_vs_flower"] is None or same_auroc is None
        else out["speedup_vs_flower"] >= 3 and abs(same_auroc) < 0.005)
    out["goal_round_no_slower_than_plain_met"] = goal(
        None if out["median_round_ratio_vs_plain"] is None
        else out["median_round_ratio_vs_plain"] <= 1.0)
    out["goal_half_flower_memory_met"] = goal(
        None if out["memory_ratio_vs_flower"] is None
        else out["memory_ratio_vs_flower"] <= 0.5)
    return out


def _default_data() -> str:
    env = os.environ.get("MEDFED_DATA_DIR")
    return env or str(REPO.parent / "shared" / "data" / "diabetes130")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", default=",".join(WAYS),
                        help="comma-separated subset of medfed,flower,plain")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=_default_data(),
                        help="Diabetes 130 zip or folder (default $MEDFED_DATA_DIR)")
    parser.add_argument("--cache-dir", default=None,
                        help="prepared-array cache (default: the data package's)")
    parser.add_argument("--work-dir", default=None,
                        help="logs and run outputs (default: a new temporary folder)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per way; the figures are medians over them")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds each way may run before it is killed")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        cfg = json.loads(args.child_config)
        result = CHILDREN[args.child](cfg)
        result["marks"] = MARKS
        Path(args.child_result).write_text(json.dumps(result))
        return 0

    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        parser.error(f"unknown way(s) {unknown}; choose from {', '.join(WAYS)}")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="medfed-round-time-")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    cfg = {"rounds": args.rounds, "hospitals": args.hospitals,
           "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "data": args.data, "cache_dir": args.cache_dir, "work_dir": work_dir}

    # Build the prepared-array cache first, so no way pays for building it.
    from clinical.prepared import load_hospital, prepare

    prepare(_spec(cfg), cache_dir=cfg["cache_dir"])
    for i in range(cfg["hospitals"]):
        load_hospital(_spec(cfg), i, cache_dir=cfg["cache_dir"])

    # Ways take turns, so a burst of load on a shared machine hits all alike.
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for repeat in range(args.repeats):
        for way in ways:
            print(f"running {way} ({repeat + 1}/{args.repeats}) ...", flush=True)
            runs[way].append(measure(way, cfg, args.timeout))
    results = {way: combine(r) for way, r in runs.items()}
    print_table(results, cfg)
    print(f"\nlogs and outputs: {work_dir}")
    print(json.dumps(summary(results)))
    return 0 if all(r.get("rc") == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

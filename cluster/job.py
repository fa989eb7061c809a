"""The ``medfed run`` job: prepare data, federate over hospital actors, compare.

``run_job`` runs inside one Ray session (a local instance on 127.0.0.1 or a
joined cluster): it prepares the data once on the driver (the on-disk cache
lets every hospital actor load its own partition quickly), starts one
``HospitalGroup`` per hospital and a ``Coordinator``, runs the rounds,
trains the centralised and local-only baselines (unless ``baselines`` is
off), builds the results and
writes the report. Every actor and the placement group it started are ended
on success, on error and on Ctrl-C; a local Ray instance is shut down.

Results schema (also ``metrics.json``): ``config``, ``dataset`` (``name``,
``target`` (``diabetes_onset_6m`` on synthetic data), ``partition``,
``train_encounters`` and ``test_encounters`` (rows), ``train_patients`` and
``test_patients`` (distinct patients, only where known), ``features``,
``hospitals`` from ``clinical.Prepared``, ...), ``federated`` and
``centralized`` (``binary_metrics`` on the test patients plus ``auroc_ci``,
a 95 % bootstrap ``[lo, hi]``, and ``weights_hash``), ``local``
(``mean_auroc``, ``per_hospital``: see ``cluster.baselines.local_only``;
``centralized`` and ``local`` are None when ``config.baselines`` is
False), ``rounds`` (one record per round, see ``Coordinator.run_round``;
restored ones included after a resume),
``bayes_auroc`` (synthetic data only, else None), ``failures`` (``[{"round",
"hospital", "kind", "reason"}]``, kind ``dropped``/``rejected``/
``round_failed``/``baseline``) and ``runtime`` (``ray`` session summary,
``hospital_nodes`` (Ray node id prefix per hospital), ``phase_seconds``
(``prepare``, ``ledger_start``, ``start``, ``rounds``, ``baselines``,
``ray_start``, ``ray_stop``), ``baselines`` (whether they were trained or
skipped, in words), total
``seconds``, ``device`` of aggregation, ``resumed_from``). Non-finite
numbers become ``None`` so the file is strict JSON.

With DP, ``privacy`` holds the settings and, per hospital, epsilon spent in
total and per round (at ``delta``) and the rounds it declined with the
reason. With secure aggregation, ``secure_aggregation`` holds the mode, the
dropout threshold, where updates were screened and per-round figures. With
the ledger (on by default), ``ledger`` holds its folder, replicas, head hash,
block height, what was recorded and excluded, and the command that verifies
it; the ledger runs as replicated actors for the job's lifetime and is
stopped with the other actors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import ray

from cluster.config import RunConfig, to_dict, validate

log = logging.getLogger(__name__)

# How ``runtime.baselines`` (shown in the report's runtime section) reads.
BASELINES_RUN = "trained: centralised and local-only"
BASELINES_SKIPPED = ("skipped (baselines = false / --no-baselines): no "
                     "centralised or local-only model was trained")


def default_out() -> str:
    """``./runs/<UTC timestamp>``, the output folder when none is given."""
    return str(Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))


def run_job(config: RunConfig, faults: dict | None = None) -> dict:
    """Runs one federated job end to end and returns its results dict.

    config: a validated or unvalidated ``RunConfig`` (validated here);
        ``config.out`` defaults to ``./runs/<timestamp>``.
    faults: test-only, ``{hospital_index: fault}`` where a fault is an
        ``actors.hospital.Fault`` (trainer), an
        ``actors.hospital_agent.AgentFault`` (secure-aggregation agent) or a
        tuple of both.
    Writes the report (``cluster.report.write_report``) into the output folder.

    Before Ray starts (so a mistake costs no start-up) it checks the output
    folder (``check_out``: creatable, not holding a run unless ``resume`` or
    ``overwrite``), the Ray address (a TCP probe), the checkpoint a resume
    continues (``check_resume``) and, under DP, the hospitals' privacy
    records it needs (``check_privacy_records``), the data
    (``clinical.prepare`` runs on the driver first) and that the ledger
    accepts the next round
    (``check_ledger_continues``); each refusal is a ValueError or
    FileNotFoundError naming the path or value, or
    ``cluster.runtime.RayStartError``.
    """
    from cluster.runtime import check_address, ray_session

    validate(config)
    if config.resume and config.overwrite:
        raise ValueError(
            "--resume continues the run in --out and --overwrite replaces it; "
            "pass one of them"
        )
    if config.out is None:
        config = _with(config, out=default_out())
    out = Path(config.out)
    own_ledger = config.ledger.dir is None
    if config.ledger.enabled:
        ledger_dir = Path(config.ledger.dir or out / "ledger").resolve()
        config = _with(config, ledger=dataclasses.replace(
            config.ledger, dir=str(ledger_dir)))
    checkpoint_dir = config.checkpoint_dir or str(out / "checkpoint")
    started = time.perf_counter()

    # Every check that needs no Ray comes first: a mistake costs no start-up.
    previous = check_out(out, config.resume, config.overwrite)
    if config.address not in (None, "auto"):
        check_address(config.address)
    meta = check_resume(config, checkpoint_dir) if config.resume else None
    if meta is not None:
        check_privacy_records(config, out / HOSPITALS_DIR, meta)
    t = time.perf_counter()
    prepared = _prepare(config)
    prepare_s = time.perf_counter() - t
    start_hash = _start_hash(config, prepared, meta, checkpoint_dir)
    if config.ledger.enabled and not (config.overwrite and own_ledger):
        check_ledger_continues(Path(config.ledger.dir), meta["round"] if meta else 0,
                               start_hash, [h["name"] for h in prepared.hospitals])
    if config.overwrite:
        remove_previous_run(out, previous)
    _writable(out)

    ray_started = time.perf_counter()
    with ray_session(config.address, config.num_cpus) as session:
        ray_start = time.perf_counter() - ray_started
        results = _federate(config, prepared, checkpoint_dir, faults or {}, session)
        stopping = time.perf_counter()
    phases = results["runtime"]["phase_seconds"]
    phases["prepare"] = prepare_s
    phases["ray_start"] = ray_start
    phases["ray_stop"] = time.perf_counter() - stopping
    results["runtime"]["seconds"] = time.perf_counter() - started

    from cluster.report import json_safe, write_report

    t = time.perf_counter()
    results = json_safe(results)
    write_report(out, results)
    log.info("results and report written to %s (%.1f s)", out,
             time.perf_counter() - t)
    return results


# What ``medfed run`` writes into its output folder; ``--overwrite`` removes
# these and nothing else.
RUN_FILES = ("metrics.json", "report.md", "auroc_per_round.png", "calibration.png")
RUN_DIRS = ("checkpoint", "ledger", "hospitals")
# Any of these marks a folder as holding a run.
RUN_MARKERS = ("metrics.json", "ledger", "checkpoint", "hospitals")
# Under ``out``: one folder per hospital for its own privacy record
# (``actors.checkpoint.write_privacy_state``); on a real deployment each
# hospital keeps it on its own disk.
HOSPITALS_DIR = "hospitals"


def check_out(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """Checks the output folder before anything starts; returns what it holds.

    Refuses (ValueError naming the folder) a path that is a file or lies
    under one, and a folder already holding a run (``metrics.json``,
    ``ledger/`` or ``checkpoint/``) unless ``resume`` (continue it) or
    ``overwrite`` (replace it) is set. Returns the run markers found.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {out} is a file, not a folder; choose a folder path"
        )
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(
                    f"--out {out} lies under {parent}, which is a file; choose "
                    "a folder path"
                )
            if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(
                    f"--out {out} cannot be created: {parent} is not writable"
                )
            break
    held = [name for name in RUN_MARKERS if (out / name).exists()]
    if held and not (resume or overwrite):
        raise ValueError(
            f"--out {out} already holds a run ({', '.join(held)}); pass --resume "
            "to continue it, --overwrite to replace it (removes metrics.json, "
            "report.md, the plots, checkpoint/, ledger/ and hospitals/ there, "
            "nothing else), "
            "or choose another --out"
        )
    return held


def remove_previous_run(out: Path, held: list[str]) -> None:
    """Removes what an earlier ``medfed run`` wrote into ``out``, nothing else."""
    import shutil

    removed = []
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    for name in RUN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
            removed.append(f"{name}/")
    if removed:
        log.warning("--overwrite: removed %s from %s", ", ".join(removed), out)


def _writable(out: Path) -> None:
    """Creates ``out`` and checks a file can be written there (ValueError if not)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".medfed-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--out {out} is not a writable folder: {exc}") from exc


def check_resume(config: RunConfig, checkpoint_dir: str) -> dict:
    """The checkpoint's metadata, refused unless it fits this run's setup.

    Raises FileNotFoundError naming the path when there is no checkpoint,
    ``actors.checkpoint.CheckpointError`` (a ValueError) when it is damaged
    or was written for another model, strategy, data or consortium.
    """
    from actors import checkpoint
    from clinical.prepared import hospital_name

    meta = checkpoint.read_meta(checkpoint_dir)
    checkpoint.check_matches(
        meta, checkpoint_dir, model=config.model, strategy=config.strategy,
        data_key=config.data.key(),
        hospitals=[hospital_name(i) for i in range(config.data.hospitals)],
    )
    return meta


def check_privacy_records(config: RunConfig, hospitals_dir: Path, meta: dict
                          ) -> None:
    """Refuses a DP resume that would forget a hospital's privacy spend.

    Every hospital the checkpoint's round records show spending epsilon
    under DP must have its record ``hospitals_dir/<name>/privacy.json``,
    at least the epsilon last recorded for it, kept by this run's
    accountant. Raises ValueError naming the hospital and the file
    otherwise. Without DP in this run nothing is checked.
    """
    from actors.checkpoint import read_privacy_state

    if config.dp is None:
        return
    recorded: dict[str, float] = {}
    for rec in meta["records"]:
        for name, spent in (rec.get("privacy") or {}).items():
            epsilon = (spent or {}).get("epsilon") or 0.0
            if epsilon > 0:
                recorded[name] = max(recorded.get(name, 0.0), float(epsilon))
    for name, epsilon in sorted(recorded.items()):
        folder = hospitals_dir / name
        state = read_privacy_state(folder)
        if state is None:
            raise ValueError(
                f"cannot resume: {name} spent epsilon {epsilon:.4f} under DP in "
                f"the rounds checkpointed so far, but its privacy record "
                f"{folder / 'privacy.json'} is missing; resuming would restart "
                "its spend from 0. Restore the file, or start a new run with "
                "--overwrite"
            )
        saved = state.get("epsilon")
        if not isinstance(saved, (int, float)) or saved < epsilon - 1e-9:
            raise ValueError(
                f"cannot resume: {name}'s privacy record {folder / 'privacy.json'} "
                f"holds epsilon {saved!r}, less than the {epsilon:.4f} the "
                "checkpoint records for it; the record is stale or altered"
            )
        dp = config.dp
        if dp.noise_multiplier is not None:
            same = state.get("noise_multiplier") == dp.noise_multiplier
            what = f"noise_multiplier = {state.get('noise_multiplier')!r}"
        else:
            same = (state.get("planned_rounds") == dp.planned_rounds
                    and state.get("target_epsilon") == dp.epsilon)
            what = (f"epsilon = {state.get('target_epsilon')!r} and "
                    f"planned_rounds = {state.get('planned_rounds')!r}")
        if not same:
            raise ValueError(
                f"cannot resume: {name}'s privacy record {folder / 'privacy.json'} "
                f"was spent with noise from {what}; this run would add other "
                f"noise. Resume with that [dp] setting (planned_rounds defaults "
                "to the run's rounds: set it in [dp] to extend a run)"
            )
        if state.get("accountant") != config.dp.accountant:
            raise ValueError(
                f"cannot resume: {name}'s privacy record was kept by the "
                f"{state.get('accountant')!r} accountant, this run uses "
                f"{config.dp.accountant!r}; resume with the same accountant"
            )
    if recorded:
        log.info("privacy records found for %d hospital(s) under %s",
                 len(recorded), hospitals_dir)


def _prepare(config: RunConfig):
    from clinical.prepared import prepare

    prepared = prepare(config.data, cache_dir=config.cache_dir)
    log.info("data: %s, %d hospitals, %d training and %d test rows",
             config.data.dataset, len(prepared.hospitals), len(prepared.y_train),
             len(prepared.y_test))
    return prepared


def _start_hash(config: RunConfig, prepared, meta: dict | None,
                checkpoint_dir: str) -> str:
    """Hash of the global model the first round builds on; checks a resume.

    With ``meta`` (resume), the checkpoint's weights must fit the model this
    data gives (same weight count).
    """
    from actors import checkpoint
    from federation.models import build_model, get_weights, weights_hash

    if meta is None:
        return weights_hash(get_weights(build_model(
            config.model, prepared.X_train.shape[1], config.hidden, config.seed)))
    count = sum(p.numel() for p in build_model(
        config.model, prepared.X_train.shape[1], config.hidden, config.seed
    ).parameters())
    checkpoint.check_matches(
        meta, checkpoint_dir, model=config.model, strategy=config.strategy,
        data_key=config.data.key(), hospitals=meta["hospitals"],
        weight_count=int(count),
    )
    _, weights, _ = checkpoint.load(checkpoint_dir)
    return weights_hash(weights)


def check_ledger_continues(ledger_dir: Path, last_round: int, model_hash: str,
                           hospitals: list[str]) -> None:
    """Refuses a ledger that would reject the rounds this run is about to open.

    The ledger accepts round ``last_round + 1`` only when its latest opened
    round is at most ``last_round`` and its latest global model is
    ``model_hash`` (the model the round builds on); every hospital needs its
    key in the ledger's consortium. Reads the replicas' block files only
    (nothing is changed). A ledger whose blocks start at a snapshot without
    a later round is not judged here; the ledger itself still is.
    """
    from ledger import entries
    from ledger.chain import read_blocks
    from ledger.genesis import GENESIS_FILE, Genesis

    if not (ledger_dir / GENESIS_FILE).exists():
        return
    members = {m.id for m in Genesis.load(ledger_dir / GENESIS_FILE).members}
    missing = [h for h in hospitals if h not in members]
    if missing:
        raise ValueError(
            f"ledger {ledger_dir} belongs to another consortium: it has no "
            f"member {', '.join(missing)}; use another --out (or ledger dir)"
        )

    latest_round, latest_model = None, None
    for replica in sorted(ledger_dir.glob("replica-*")):
        try:
            blocks, _ = read_blocks(replica)
        except FileNotFoundError:
            continue
        rounds, model = None, None
        for block in blocks:
            for item in block.entries:
                if not item.accepted:
                    continue
                entry = entries.parse(item.raw)
                if entry.type == entries.ROUND_OPEN:
                    rounds = entry.body["round"]
                elif entry.type == entries.GLOBAL_MODEL:
                    model = entry.body["model_hash"]
        if rounds is not None and (latest_round is None or rounds > latest_round):
            latest_round, latest_model = rounds, model

    if latest_round is not None and latest_round > last_round:
        what = ("a new run starts at round 1" if last_round == 0 else
                f"the checkpoint is at round {last_round}")
        raise ValueError(
            f"ledger {ledger_dir} already records round {latest_round} but "
            f"{what}: it would refuse every round. Pass --resume with that run's "
            "checkpoint, --overwrite to replace the run, or choose another --out"
        )
    if latest_model is not None and latest_model != model_hash:
        raise ValueError(
            f"ledger {ledger_dir} ends at global model {latest_model[:16]}..., "
            f"but this run starts from {model_hash[:16]}...: it would refuse "
            "every round. Resume from the checkpoint of the run that wrote it, "
            "pass --overwrite, or choose another --out"
        )
    if latest_round is not None:
        log.info("ledger %s continues after round %d", ledger_dir, latest_round)


def _federate(config: RunConfig, prepared, checkpoint_dir: str, faults: dict,
              session: dict) -> dict:
    """Everything that needs Ray; ends every actor it starts, whatever happens."""
    from actors.coordinator import COORDINATOR_CPUS, Coordinator
    from actors.hospital import HospitalGroup, reserve_bundles, trainer_cpus
    from cluster import baselines
    from cluster.runtime import cluster_has_gpu
    from federation.models import weights_hash

    seconds = {}
    names = [h["name"] for h in prepared.hospitals]

    group = None
    hospitals: list = []
    coordinator = None
    service = None
    ledger_head = None
    try:
        t = time.perf_counter()
        reserved = COORDINATOR_CPUS
        if config.ledger.enabled:
            from actors.ledger_replica import REPLICA_CPUS
            from cluster.ledger_service import start_ledger

            service = start_ledger(config.ledger.dir, config.ledger.replicas, names)
            reserved += REPLICA_CPUS * config.ledger.replicas
        seconds["ledger_start"] = time.perf_counter() - t
        cpus = trainer_cpus(len(names), session["cpus"], reserved)
        group = reserve_bundles(len(names), cpus, timeout_s=config.ping_timeout_s * 2)
        hospitals = []
        # Absolute: actor processes need not share the driver's working dir.
        states = Path(config.out).resolve() / HOSPITALS_DIR
        for i, name in enumerate(names):
            fault, agent_fault = _split_fault(faults.get(i))
            hospitals.append(HospitalGroup(config, i, name, group, fault, cpus,
                                           agent_fault=agent_fault,
                                           state_dir=str(states / name)))
        agents = None
        if config.secure_agg.mode != "none":
            agents = {h.name: h.agent for h in hospitals}
        device = "cuda" if cluster_has_gpu() else "cpu"
        coordinator = Coordinator.options(num_gpus=1 if device == "cuda" else 0).remote(
            config, prepared.X_train.shape[1], prepared.X_test,
            prepared.y_test,
            [(h.name, h.trainer) for h in hospitals], checkpoint_dir, device,
            agents=agents,
            ledger_replicas=service.replicas if service is not None else None,
            ledger_dir=config.ledger.dir if service is not None else None,
        )
        state = ray.get(coordinator.state.remote(), timeout=config.ping_timeout_s * 2)
        hospital_nodes = _await_hospitals(hospitals, config.ping_timeout_s * 4)
        seconds["start"] = time.perf_counter() - t

        t = time.perf_counter()
        _run_rounds(config, coordinator, state["round"])
        records = ray.get(coordinator.round_records.remote())
        weights = ray.get(coordinator.global_weights.remote())
        seconds["rounds"] = time.perf_counter() - t
        if service is not None:
            ledger_head = service.client.head()

        t = time.perf_counter()
        federated = baselines.score(config, weights, prepared.X_test, prepared.y_test)
        federated["auroc_ci"] = auroc_ci(config, weights, prepared)
        federated["weights_hash"] = weights_hash(weights)
        federated["rounds_ok"] = sum(r["status"] == "ok" for r in records)
        centralized, local, baseline_failures = None, None, []
        if config.baselines:
            centralized = baselines.centralized(config, prepared)
            central_weights = centralized.pop("weights")
            centralized["auroc_ci"] = auroc_ci(config, central_weights, prepared)
            centralized["weights_hash"] = weights_hash(central_weights)
            baseline_timeout = config.round_timeout_s * max(1, config.rounds)
            local, baseline_failures = baselines.local_only(
                config, prepared, hospitals, weights, baseline_timeout
            )
        seconds["baselines"] = time.perf_counter() - t
    finally:
        _shutdown(coordinator, hospitals, group)
        if service is not None:
            service.stop()

    if config.baselines:
        log.info("federated test AUROC %.4f, centralised %.4f, local-only mean %.4f",
                 federated["auroc"], centralized["auroc"], local["mean_auroc"])
    else:
        log.info("federated test AUROC %.4f; baselines skipped", federated["auroc"])
    results = {
        "config": to_dict(config),
        "dataset": _dataset_summary(config, prepared),
        "federated": federated,
        "centralized": centralized,
        "local": local,
        "rounds": records,
        "bayes_auroc": prepared.bayes_auroc,
        "failures": _failures(records) + baseline_failures,
        "runtime": {
            "ray": {k: session.get(k) for k in
                    ("address", "local", "nodes", "node_addresses", "cpus", "gpus")},
            "hospital_nodes": hospital_nodes,
            "device": state["device"],
            "resumed_from": state["resumed_from"],
            "phase_seconds": seconds,
            "baselines": (BASELINES_RUN if config.baselines else BASELINES_SKIPPED),
        },
    }
    if config.dp is not None:
        results["privacy"] = privacy_summary(config, names, records)
    if config.secure_agg.mode != "none":
        results["secure_aggregation"] = secure_summary(config, records)
    if service is not None:
        results["ledger"] = ledger_summary(config, records, ledger_head)
    return results


def _split_fault(fault) -> tuple:
    """(trainer fault, agent fault) from one fault, a tuple of both, or None."""
    from actors.hospital import Fault

    items = fault if isinstance(fault, (tuple, list)) else (fault,)
    trainer = next((f for f in items if isinstance(f, Fault)), None)
    agent = next((f for f in items
                  if f is not None and not isinstance(f, Fault)), None)
    return trainer, agent


def privacy_summary(config: RunConfig, names: list[str], records: list[dict]
                    ) -> dict:
    """Epsilon per hospital, per round and in total, at the run's delta.

    ``per_hospital``: ``{name: {"epsilon_total", "budget", "rounds_trained",
    "epsilon_per_round": [{"round", "epsilon_round", "epsilon"}],
    "declined": [{"round", "reason"}]}}``.
    """
    dp = config.dp
    per: dict[str, dict] = {
        name: {"epsilon_total": 0.0,
               "budget": config.dp_budgets.get(name, dp.epsilon),
               "rounds_trained": 0, "epsilon_per_round": [], "declined": []}
        for name in names
    }
    for rec in records:
        declined = {d["hospital"]: d["reason"] for d in rec.get("declined", [])}
        for name, spent in (rec.get("privacy") or {}).items():
            entry = per[name]
            entry["epsilon_total"] = max(entry["epsilon_total"], spent["epsilon"])
            if name not in declined:
                entry["rounds_trained"] += 1
                entry["epsilon_per_round"].append({
                    "round": rec["round"], "epsilon_round": spent["epsilon_round"],
                    "epsilon": spent["epsilon"]})
        for name, reason in declined.items():
            per[name]["declined"].append({"round": rec["round"], "reason": reason})
    totals = [v["epsilon_total"] for v in per.values()]
    return {
        "unit": "one training row (encounter) of one hospital",
        "delta": dp.delta, "epsilon_budget": dp.epsilon,
        "noise_multiplier": dp.noise_multiplier,
        "max_grad_norm": dp.max_grad_norm, "accountant": dp.accountant,
        "planned_rounds": dp.planned_rounds,
        "max_epsilon": max(totals) if totals else 0.0,
        "per_hospital": per,
    }


def secure_summary(config: RunConfig, records: list[dict]) -> dict:
    """What secure aggregation did over the run, and what it cannot check."""
    sa = config.secure_agg
    reports = [r["secure"] for r in records if r.get("secure")]
    seconds = [s["seconds"] for s in reports if s.get("seconds") is not None]
    return {
        "mode": sa.mode,
        "dropout_threshold": sa.dropout_threshold,
        "clip_range": sa.clip_range if sa.mode == "mask" else None,
        "frac_bits": sa.frac_bits if sa.mode == "mask" else None,
        "noise": sa.noise, "noise_sigma": sa.noise_sigma,
        "screening": ("in each hospital's agent before masking (shape, finite "
                      "values, sample count): the coordinator cannot see "
                      "individual updates"),
        "rounds": len(reports),
        "rounds_failed": sum(1 for r in records
                             if r.get("secure") and r["status"] == "failed"),
        "mean_seconds": sum(seconds) / len(seconds) if seconds else None,
        "bytes_in_total": sum(s.get("bytes_in", 0) for s in reports),
    }


def ledger_summary(config: RunConfig, records: list[dict], head: dict | None
                   ) -> dict:
    """The ledger's head and what the run recorded and excluded."""
    ledgers = [r["ledger"] for r in records if r.get("ledger")]
    excluded = [
        {"round": r["round"], "hospital": x["hospital"], "reason": x["reason"]}
        for r in records for x in r["rejected"]
        if x["reason"].startswith("ledger") or "update_hash" in x["reason"]
    ]
    limitation = None
    if config.secure_agg.mode != "none":
        limitation = ("under secure aggregation each update hash is the "
                      "hospital's own statement; the coordinator cannot check "
                      "it against the masked sum")
    return {
        "dir": config.ledger.dir,
        "replicas": config.ledger.replicas,
        "head_hash": head["hash"] if head else None,
        "block_height": head["height"] if head else None,
        "updates_recorded": sum(len(x["updates"]) for x in ledgers),
        "global_models_recorded": sum(
            1 for x in ledgers if x["global_model"] and x["global_model"]["accepted"]),
        "privacy_spends_recorded": sum(x.get("privacy_spends", 0) for x in ledgers),
        "excluded_updates": excluded,
        "verify": _verify_command(config.ledger.dir, head),
        "limitation": limitation,
    }


def _verify_command(ledger_dir: str, head: dict | None) -> str:
    """The auditor's check: the chain is whole and ends at this run's head."""
    command = f"medfed ledger verify --dir {ledger_dir}"
    if head and head.get("hash"):
        command += f" --head {head['hash']}"
        if head.get("height") is not None:
            command += f" --height {head['height']}"
    return command


def _await_hospitals(hospitals: list, timeout_s: float) -> dict[str, str]:
    """Waits until every hospital has loaded its partition, up to ``timeout_s``.

    Round 1 then measures training, not actor start-up. A hospital still
    starting after the wait is left to the rounds, which drop it until it
    answers. Returns ``{hospital: Ray node id prefix}`` for those that answered.
    """
    calls = {h.trainer.ping.remote(): h.name for h in hospitals}
    ready, pending = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s)
    failed, nodes = [], {}
    for ref in ready:
        try:
            # A 12-hex prefix tells nodes apart and keeps the report readable.
            nodes[calls[ref]] = ray.get(ref)["node"][:12]
        except ray.exceptions.RayError as exc:
            failed.append(f"{calls[ref]} ({type(exc).__name__})")
    if pending or failed:
        log.warning("hospitals not ready after %.0f s: %s", timeout_s,
                    ", ".join([calls[r] for r in pending] + failed))
    else:
        log.info("%d hospitals ready on %d node(s)", len(hospitals),
                 len(set(nodes.values())))
    return nodes


def _run_rounds(config: RunConfig, coordinator, start_round: int) -> None:
    """Drives the coordinator round by round, logging one line per round."""
    if start_round >= config.rounds:
        log.info("checkpoint is at round %d of %d: no rounds left to run",
                 start_round, config.rounds)
    # A round is bounded by the ping and round timeouts; the margin covers
    # scoring, aggregation and the checkpoint write.
    limit = config.ping_timeout_s + config.round_timeout_s + 300
    for _ in range(start_round, config.rounds):
        record = ray.get(coordinator.run_round.remote(), timeout=limit)
        log.info(
            "round %d/%d %s: AUROC %.4f, %d participant(s), %d dropped, "
            "%d rejected, %.2f s",
            record["round"], config.rounds, record["status"],
            record["test"]["auroc"], len(record["participants"]),
            len(record["dropped"]), len(record["rejected"]), record["seconds"],
        )
        if record["status"] == "failed" and config.on_round_failure == "stop":
            log.warning("stopping after failed round %d (on_round_failure=stop)",
                        record["round"])
            break


def _shutdown(coordinator, hospitals: list, group) -> None:
    from ray.util.placement_group import remove_placement_group

    if coordinator is not None:
        try:
            ray.kill(coordinator)
        except Exception as exc:  # already gone: nothing left to end
            log.debug("coordinator kill: %s", exc)
    for h in hospitals:
        h.kill()
    if group is not None:
        try:
            remove_placement_group(group)
        except Exception as exc:
            log.debug("placement group removal: %s", exc)


# The outcome of the synthetic consortium, whatever ``data.target`` says.
SYNTHETIC_TARGET = "diabetes_onset_6m"


def _dataset_summary(config: RunConfig, prepared) -> dict:
    """What the data are; row counts as ``*_encounters``.

    Distinct ``*_patients`` are given only where they are known: the
    synthetic data hold one row per patient. ``clinical.Prepared`` carries
    no patient ids for Diabetes 130, so its patient counts are left out.
    """
    synthetic = config.data.dataset == "synthetic"
    summary = {
        "name": config.data.dataset,
        "target": SYNTHETIC_TARGET if synthetic else config.data.target,
        "partition": config.data.partition,
        "alpha": config.data.alpha,
        "partition_note": prepared.partition_note,
        "features": int(prepared.X_train.shape[1]),
        "feature_names": list(prepared.feature_names),
        "train_encounters": int(len(prepared.y_train)),
        "test_encounters": int(len(prepared.y_test)),
        "train_label_rate": float(np.mean(prepared.y_train)),
        "test_label_rate": float(np.mean(prepared.y_test)),
        "hospitals": prepared.hospitals,
    }
    if synthetic:
        summary["train_patients"] = summary["train_encounters"]
        summary["test_patients"] = summary["test_encounters"]
    return summary


def auroc_ci(config: RunConfig, weights: np.ndarray, prepared) -> list | None:
    """95 % bootstrap interval ``[lo, hi]`` of the test AUROC of ``weights``.

    Resamples test rows (``cluster.report.bootstrap_auroc_ci``); rows are
    patients on synthetic data. Known shortcoming: on Diabetes 130 a patient
    may have several test encounters and no patient ids reach the job, so
    the interval is somewhat too narrow there. None when it cannot be formed
    (one class, too few rows).
    """
    from cluster.report import bootstrap_auroc_ci
    from federation.training import predict_proba

    p = predict_proba(config.model, weights, prepared.X_test, hidden=config.hidden)
    try:
        return list(bootstrap_auroc_ci(prepared.y_test, p, seed=config.seed))
    except ValueError as exc:
        log.warning("no AUROC interval: %s", exc)
        return None


def _failures(records: list[dict]) -> list[dict]:
    out = []
    for rec in records:
        for kind in ("dropped", "rejected"):
            for item in rec[kind]:
                out.append({"round": rec["round"], "hospital": item["hospital"],
                            "kind": kind, "reason": item["reason"]})
        for item in rec.get("declined", []):
            out.append({"round": rec["round"], "hospital": item["hospital"],
                        "kind": "declined", "reason": item["reason"]})
        if rec["status"] == "failed":
            out.append({"round": rec["round"], "hospital": None,
                        "kind": "round_failed", "reason": rec["failure"]})
    return out


def _with(config: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(config, **changes)

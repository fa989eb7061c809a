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
``target``, ``partition``, ``train_patients``, ``test_patients``,
``features``, ``hospitals`` from ``clinical.Prepared``, ...), ``federated``
and ``centralized`` (``binary_metrics`` on the test patients plus
``weights_hash``), ``local`` (``mean_auroc``, ``per_hospital``: see
``cluster.baselines.local_only``; ``centralized`` and ``local`` are None
when ``config.baselines`` is False), ``rounds`` (one record per round, see
``Coordinator.run_round``; restored ones included after a resume),
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
    """
    from cluster.runtime import ray_session

    validate(config)
    if config.out is None:
        config = _with(config, out=default_out())
    out = Path(config.out)
    if config.ledger.enabled:
        ledger_dir = Path(config.ledger.dir or out / "ledger").resolve()
        config = _with(config, ledger=dataclasses.replace(
            config.ledger, dir=str(ledger_dir)))
    checkpoint_dir = config.checkpoint_dir or str(out / "checkpoint")
    started = time.perf_counter()

    with ray_session(config.address, config.num_cpus) as session:
        ray_start = time.perf_counter() - started
        results = _federate(config, checkpoint_dir, faults or {}, session)
        stopping = time.perf_counter()
    phases = results["runtime"]["phase_seconds"]
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


def _federate(config: RunConfig, checkpoint_dir: str, faults: dict,
              session: dict) -> dict:
    """Everything that needs Ray; ends every actor it starts, whatever happens."""
    from actors.coordinator import COORDINATOR_CPUS, Coordinator
    from actors.hospital import HospitalGroup, reserve_bundles, trainer_cpus
    from actors.settings import for_actors
    from clinical.prepared import prepare
    from cluster import baselines
    from cluster.runtime import cluster_has_gpu
    from federation.models import weights_hash

    seconds = {}
    t = time.perf_counter()
    prepared = prepare(config.data, cache_dir=config.cache_dir)
    seconds["prepare"] = time.perf_counter() - t
    names = [h["name"] for h in prepared.hospitals]
    log.info("data: %s, %d hospitals, %d training and %d test patients (%.1f s)",
             config.data.dataset, len(names), len(prepared.y_train),
             len(prepared.y_test), seconds["prepare"])

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
        for i, name in enumerate(names):
            fault, agent_fault = _split_fault(faults.get(i))
            hospitals.append(HospitalGroup(config, i, name, group, fault, cpus,
                                           agent_fault=agent_fault))
        agents = None
        if config.secure_agg.mode != "none":
            agents = {h.name: h.agent for h in hospitals}
        device = "cuda" if cluster_has_gpu() else "cpu"
        coordinator = Coordinator.options(num_gpus=1 if device == "cuda" else 0).remote(
            for_actors(config), prepared.X_train.shape[1], prepared.X_test,
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
        federated["weights_hash"] = weights_hash(weights)
        federated["rounds_ok"] = sum(r["status"] == "ok" for r in records)
        centralized, local, baseline_failures = None, None, []
        if config.baselines:
            centralized = baselines.centralized(config, prepared)
            centralized["weights_hash"] = weights_hash(centralized.pop("weights"))
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
        "verify": f"medfed ledger verify --dir {config.ledger.dir}",
        "limitation": limitation,
    }


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


def _dataset_summary(config: RunConfig, prepared) -> dict:
    return {
        "name": config.data.dataset,
        "target": config.data.target,
        "partition": config.data.partition,
        "alpha": config.data.alpha,
        "partition_note": prepared.partition_note,
        "features": int(prepared.X_train.shape[1]),
        "feature_names": list(prepared.feature_names),
        "train_patients": int(len(prepared.y_train)),
        "test_patients": int(len(prepared.y_test)),
        "train_label_rate": float(np.mean(prepared.y_train)),
        "test_label_rate": float(np.mean(prepared.y_test)),
        "hospitals": prepared.hospitals,
    }


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

"""The coordinator: a Ray actor that runs federated rounds over hospital actors.

Each round: sample a share of the hospitals (seeded by run seed and round, so
a resumed run samples the same), ping them (a restarted hospital rejoins once
it answers; the pings leave at the end of the previous round, so they cost
no round trip of their own), send the global weights (inside each call when
small, else once through the object store), wait for updates up to the
round timeout, screen them (``federation.aggregation.check_update``), and
aggregate the accepted ones if there are at least ``quorum`` of them. A
hospital that raises, dies or times out is dropped from that round with the
reason recorded; a round without quorum fails cleanly and leaves the global
model unchanged.

With secure aggregation (``secure_agg.mode`` ``"mask"`` or ``"ckks"``) each
hospital's update goes from its trainer to its own ``HospitalAgent``; the
coordinator asks the agents to train (``HospitalAgent.train``), receives only
sample counts and metrics, runs ``actors.secure_round.masked_round`` or
``ckks_round`` over the accepted hospitals and applies the recovered sum with
``strategy.apply(global, summed_weighted_delta, total_samples)``. It cannot
see individual updates, so screening (NaN, shape, sample count) happens in
each hospital's agent before masking. If more than ``dropout_threshold`` of
the hospitals in the secure round drop before their input is summed, or the
sum cannot be recovered, the round fails and the global model is unchanged.

A hospital whose privacy budget would be exceeded declines the round (the
reason is recorded under ``declined``); the round goes on with the others.

With the ledger (``ledger_replicas`` given), each round the coordinator signs
a ``round_open`` entry (base: hash of the current global model), relays the
hospitals' own signed ``model_update`` and ``privacy_spend`` entries in one
submission, excludes every update whose entry the ledger rejected (or, in
the clear, whose delta does not hash to the signed ``update_hash``), and
after aggregation signs a ``global_model`` entry naming the accepted update
hashes. Known limitation: under secure aggregation the update hash is the
hospital's statement about its own update; the coordinator cannot check it
against the masked sum.

The coordinator holds only the held-out test patients (to score the global
model each round) and the global model; it never sees a hospital's rows.
After every round it checkpoints the global weights, the strategy state and
the round records atomically (``actors.checkpoint``: JSON and numpy arrays
read without pickle), and ``resume`` continues from that checkpoint after
checking it was written for the same model, strategy, data and hospitals.

Known shortcoming: Ray cannot interrupt a running call on a synchronous actor,
so a hospital that stalls past the round timeout keeps computing; it is left
out of later rounds until it answers a ping again.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import ray

log = logging.getLogger(__name__)

COORDINATOR_CPUS = 0.1
# Seconds between pings to a hospital that Ray reports as restarting.
PING_RETRY_S = 0.5
# Largest weight vector (bytes) sent inside each call rather than through
# the object store: Ray's own inlining limit for call arguments (100 KiB).
INLINE_WEIGHTS_BYTES = 100 * 1024


@ray.remote(num_cpus=COORDINATOR_CPUS, max_restarts=0)
class Coordinator:
    """Runs the rounds of one federated job.

    config: ``cluster.config.RunConfig`` (light to unpickle: it imports
        neither Opacus nor PyTorch).
    n_features: input width of the model.
    X_test, y_test: held-out patients that score the global model each round.
    hospitals: ``[(name, trainer_handle)]`` in hospital index order.
    checkpoint_dir: folder of the checkpoint (``actors.checkpoint``: JSON
        metadata and a numpy arrays file, nothing that runs code on load).
    device: ``"cpu"`` or ``"cuda"``, where aggregation (and the masking
        server's sums) runs.
    agents: ``{name: HospitalAgent handle}`` for every hospital, in hospital
        order, when the run uses secure aggregation; else None.
    ledger_replicas: the ledger's replica handles, or None without ledger.
    ledger_dir: the ledger folder (its ``keys/coordinator.pem`` signs the
        coordinator's entries).
    """

    def __init__(
        self,
        config,
        n_features: int,
        X_test: np.ndarray,
        y_test: np.ndarray,
        hospitals: list[tuple[str, object]],
        checkpoint_dir: str,
        device: str = "cpu",
        agents: dict | None = None,
        ledger_replicas: list | None = None,
        ledger_dir: str | None = None,
    ) -> None:
        import torch

        from actors.scoring import Scorer
        from federation.aggregation import build_strategy
        from federation.models import build_model, get_weights

        torch.set_num_threads(1)
        from actors.hospital import _configure_logging

        _configure_logging()

        self.config = config
        self.device = device
        self.X_test = X_test
        self.y_test = y_test
        # Built once: every round scores the global model on these patients.
        self._test_scorer = Scorer(config.model, X_test, y_test, hidden=config.hidden)
        self.hospitals = list(hospitals)
        self.checkpoint_dir = Path(checkpoint_dir)
        options = {}
        if config.server_lr is not None:
            options["lr" if config.strategy == "fedadam" else "server_lr"] = (
                config.server_lr
            )
        self.strategy = build_strategy(
            config.strategy, device=device, proximal_mu=config.mu, **options
        )
        self.weights = get_weights(
            build_model(config.model, n_features, config.hidden, config.seed)
        )
        self.round = 0
        self.records: list[dict] = []
        self._pings: dict[str, ray.ObjectRef] = {}
        self.resumed_from: int | None = None
        self.agents = dict(agents) if agents else None
        self._ckks_context: bytes | None = None
        self._ledger = None
        self._signer = None
        if ledger_replicas:
            from actors.ledger_client import LedgerClient
            from ledger.genesis import load_signer

            self._ledger = LedgerClient(list(ledger_replicas))
            self._signer = load_signer(ledger_dir, "coordinator")

        self._restore_error: Exception | None = None
        if config.resume:
            try:
                self._restore()
            except (ValueError, FileNotFoundError) as exc:
                # Raised by the first call instead: an error raised here would
                # reach the driver only as the text of an ActorDiedError.
                log.error("cannot resume: %s", exc)
                self._restore_error = exc

    # --- queries -------------------------------------------------------

    def state(self) -> dict:
        """``{"round", "weights_hash", "resumed_from", "device"}``.

        Raises the resume error (ValueError, FileNotFoundError) when the
        checkpoint could not be restored.
        """
        from federation.models import weights_hash

        self._raise_restore_error()
        return {"round": self.round, "weights_hash": weights_hash(self.weights),
                "resumed_from": self.resumed_from, "device": self.device}

    def global_weights(self) -> np.ndarray:
        """The current global weights (flat float32)."""
        return self.weights

    def round_records(self) -> list[dict]:
        """Every round record so far, including those restored on resume."""
        return self.records

    def _raise_restore_error(self) -> None:
        if self._restore_error is not None:
            raise self._restore_error

    # --- rounds --------------------------------------------------------

    def run_round(self) -> dict:
        """Runs the next round and returns its record.

        The record: ``round``, ``status`` (``"ok"``/``"failed"``), ``failure``
        (reason or None), ``sampled``, ``participants`` (hospitals whose
        updates went into the global model; empty when the round failed),
        ``accepted`` (updates that passed screening and the ledger),
        ``dropped``, ``rejected`` and ``declined`` (``[{"hospital",
        "reason"}]``; declined: the hospital refused to train, e.g. its
        privacy budget), ``quorum``, ``num_samples``, ``loss``
        (sample-weighted mean training loss of the accepted updates; None
        when none reports one, as under DP), ``mean_val_auroc`` (their mean
        local validation AUROC), ``auroc`` and ``test`` (scores of the global
        model on the test patients after the round), ``weights_hash``,
        ``late`` (hospitals that timed out), ``privacy`` (``{hospital:
        {"epsilon", "epsilon_round", "delta", "noise_multiplier"}}``,
        epsilon in total so far and added this round, at delta, and the
        noise used when reported; empty without DP), ``secure``
        (mode, survivors, dropped, seconds and bytes of the secure round;
        None in the clear), ``ledger`` (``round_open``, ``updates``
        ``{hospital: update hash}`` accepted by the ledger, ``global_model``
        entry outcome; None without ledger), ``seconds`` and
        ``phase_seconds`` (where they went: ``ping``, ``train`` (opening
        the round on the ledger, sending the weights, waiting for the
        updates), ``aggregate`` (screening, ledger, aggregation) and
        ``score`` (the test patients)); the checkpoint written after the
        record is not counted.
        """
        from federation.aggregation import RoundFailed, Update, check_update

        self._raise_restore_error()
        started = time.perf_counter()
        r = self.round + 1
        sampled = self._sample(r)
        reachable, dropped = self._ping(sampled)
        phases = {"ping": time.perf_counter() - started}
        secure = self.agents is not None
        ledger_record = None
        failure = None
        if self._ledger is not None:
            ledger_record, failure = self._ledger_open(r)
        if failure is not None:
            reachable = []

        epochs = self.config.local_epochs
        if secure:
            # One broadcast object per round, shared by every hospital; the
            # agent calls its trainer, and the update never comes here.
            weights_ref = ray.put(self.weights)
            calls = {
                self.agents[name].train.remote(
                    r, [weights_ref], epochs, None, self.weights.size
                ): name
                for name, _ in reachable
            }
        else:
            weights = _broadcast(self.weights)
            calls = {
                handle.fit.remote(r, weights, epochs): name
                for name, handle in reachable
            }
        answers, late = self._collect(calls, dropped)
        phases["train"] = time.perf_counter() - started - phases["ping"]

        updates, rejected, declined, privacy = [], [], [], {}
        for name, answer in answers:
            kind, value = _classify(answer)
            spent = _privacy_of(answer)
            if spent is not None:
                privacy[name] = spent
            if kind == "declined":
                log.warning("round %d: %s declined: %s", r, name, value)
                declined.append({"hospital": name, "reason": value})
                continue
            if kind == "rejected":
                log.warning("round %d: %s rejected its own update: %s", r, name,
                            value)
                rejected.append({"hospital": name,
                                 "reason": f"screened at the hospital: {value}"})
                continue
            if secure:
                update = Update(hospital=answer["hospital"], round=answer["round"],
                                delta=None, num_samples=answer["num_samples"],
                                metrics=dict(answer["metrics"]))
                reason = None if update.round == r else (
                    f"update is for round {update.round}, expected {r}")
            else:
                update = answer
                reason = check_update(update, self.weights.size, expected_round=r)
            if reason is None and update.hospital != name:
                reason = f"update names hospital {update.hospital!r}, sent by {name!r}"
            if reason is None:
                if not secure:
                    # Ray hands out read-only arrays; aggregation wants a copy.
                    update.delta = np.array(update.delta)
                updates.append(update)
            else:
                log.warning("round %d: rejected update from %s: %s", r, name, reason)
                rejected.append({"hospital": name, "reason": reason})

        accepted = updates
        if self._ledger is not None and failure is None:
            accepted = self._ledger_updates(r, updates, rejected, ledger_record,
                                            secure)

        need = self.config.quorum_count(len(sampled))
        secure_report = None
        if failure is not None:
            pass
        elif not answers:
            failure = f"no update arrived from {len(sampled)} sampled hospital(s)"
        elif not accepted:
            failure = (f"no update to aggregate: {len(rejected)} rejected, "
                       f"{len(declined)} declined")
        elif len(accepted) < need:
            failure = f"quorum not met: {len(accepted)} accepted, {need} needed"
        elif secure:
            accepted, failure, secure_report = self._secure_aggregate(
                r, accepted, dropped, need
            )
        else:
            try:
                self.weights = self.strategy.aggregate(self.weights, accepted, r)
            except RoundFailed as exc:
                failure = str(exc)
        if failure is not None:
            log.warning("round %d failed, global model unchanged: %s", r, failure)
        elif self._ledger is not None:
            self._ledger_global(r, accepted, ledger_record)

        scoring = time.perf_counter()
        phases["aggregate"] = scoring - started - phases["ping"] - phases["train"]
        record = self._record(r, sampled, accepted, dropped, rejected, need, failure)
        phases["score"] = time.perf_counter() - scoring
        record["declined"] = declined
        record["late"] = late
        record["privacy"] = privacy
        record["secure"] = secure_report
        record["ledger"] = ledger_record
        record["seconds"] = time.perf_counter() - started
        record["phase_seconds"] = phases
        self.round = r
        self.records.append(record)
        self._checkpoint()
        self._ping_ahead()
        return record

    # --- secure aggregation ----------------------------------------------

    def _secure_aggregate(self, r: int, accepted: list, dropped: list[dict],
                          need: int) -> tuple[list, str | None, dict]:
        """Sums the accepted hospitals' updates in their agents; applies it.

        Returns (the updates in the sum, failure reason or None, report).
        The global model changes only when the sum was recovered and at most
        ``dropout_threshold`` of the hospitals dropped. The masking protocol
        itself tolerates only as many dropouts as its share threshold allows
        (a hospital's secrets need ``threshold`` of its ``degree``
        neighbours); past that it aborts even below ``dropout_threshold``,
        which is then recorded with the protocol's reason.
        """
        from actors.secure_round import ckks_round, masked_round
        from federation.secagg.config import MaskingConfig
        from federation.secagg.errors import AggregationAborted

        sa = self.config.secure_agg
        inputs = {u.hospital: (None, int(u.num_samples)) for u in accepted}
        report: dict = {"mode": sa.mode, "inputs": sorted(inputs)}
        try:
            if sa.mode == "mask":
                masking = MaskingConfig(
                    n=len(self.agents), clip_range=sa.clip_range,
                    frac_bits=sa.frac_bits, clip_mode="clip",
                )
                summed, total, full = masked_round(
                    self.agents, inputs, masking, r, sa.stage_timeout_s,
                    self.device,
                )
                survivors = full["survivor_names"]
                report["clipped"] = full.get("clipped")
            else:
                key_holder = next(iter(self.agents))
                summed, total, full = ckks_round(
                    self.agents, key_holder, inputs, r, sa.stage_timeout_s,
                    public_context=self._ckks_context,
                )
                survivors = full["contributors"]
            if self._ckks_context is None and sa.mode == "ckks":
                self._ckks_context = ray.get(
                    self.agents[key_holder].ckks_public_context.remote()
                )
        except AggregationAborted as exc:
            report["error"] = exc.reason
            errors = exc.details.get("errors") or {}
            for name, why in errors.items():
                dropped.append(self._drop(r, name, f"secure round: {why}"))
            lost = [name for name in inputs if name in errors]
            report["dropped"] = lost
            return [], (f"{_dropout_note(len(lost), len(inputs), sa)}; secure "
                        f"aggregation aborted: {exc.reason}"), report

        lost = [name for name in inputs if name not in set(survivors)]
        errors = full.get("errors") or {}
        for name in lost:
            dropped.append(self._drop(
                r, name, f"secure round: {errors.get(name, 'dropped')}"))
        report.update({
            "survivors": sorted(survivors), "dropped": lost,
            "seconds": full.get("seconds"),
            "bytes_in": sum(v.get("bytes_in", 0)
                            for v in (full.get("stages") or {}).values()),
            "bytes_out": sum(v.get("bytes_out", 0)
                             for v in (full.get("stages") or {}).values()),
        })
        in_sum = [u for u in accepted if u.hospital in set(survivors)]
        if len(lost) / len(inputs) > sa.dropout_threshold:
            return [], _dropout_note(len(lost), len(inputs), sa), report
        if len(in_sum) < need:
            return [], (f"quorum not met: {len(in_sum)} in the secure sum, "
                        f"{need} needed"), report
        if total <= 0:
            return [], f"secure sum has total weight {total}", report
        self.weights = np.asarray(
            self.strategy.apply(self.weights, np.asarray(summed), total),
            dtype=np.float32,
        )
        return in_sum, None, report

    # --- ledger ------------------------------------------------------------

    def _ledger_submit(self, entries_: list[bytes]) -> list[dict]:
        """Submits signed entries as one submission; their outcomes in order."""
        result = self._ledger.submit(entries_)
        return list(result["outcomes"])

    def _ledger_open(self, r: int) -> tuple[dict, str | None]:
        """Signs and records ``round_open``; returns the record and a failure."""
        from federation.models import weights_hash
        from ledger import entries

        record = {"round_open": None, "updates": {}, "global_model": None,
                  "privacy_spends": 0}
        raw = entries.round_open(self._signer, round=r,
                                 base_model_hash=weights_hash(self.weights),
                                 timestamp=time.time())
        try:
            outcome = self._ledger_submit([raw])[0]
        except (TimeoutError, ray.exceptions.RayError) as exc:
            return record, f"ledger unavailable, round not opened: {exc}"
        record["round_open"] = outcome
        if not outcome["accepted"]:
            return record, f"ledger refused to open the round: {outcome['reason']}"
        return record, None

    def _ledger_updates(self, r: int, updates: list, rejected: list[dict],
                        record: dict, secure: bool) -> list:
        """Relays the hospitals' signed entries; returns the updates the
        ledger accepted (others go to ``rejected`` with the ledger's reason)."""
        from federation.models import weights_hash
        from ledger import entries

        batch, owners = [], []
        checked = []
        for update in updates:
            signed = update.metrics.pop("ledger_entries", None)
            if not signed:
                rejected.append({"hospital": update.hospital,
                                 "reason": "no signed ledger entry"})
                continue
            body = entries.parse(signed[0]).body
            if not secure and body.get("update_hash") != weights_hash(update.delta):
                # Nothing of it goes on the chain as this hospital's update.
                reason = ("ledger entry's update_hash does not match the update "
                          "received")
                log.warning("round %d: %s: %s", r, update.hospital, reason)
                rejected.append({"hospital": update.hospital, "reason": reason})
                continue
            for raw in signed:
                batch.append(raw)
                owners.append(update)
            checked.append((update, body["update_hash"]))
        if not batch:
            return []
        try:
            outcomes = self._ledger_submit(batch)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            for update, _ in checked:
                rejected.append({"hospital": update.hospital,
                                 "reason": f"ledger unavailable: {exc}"})
            return []

        verdicts: dict[str, dict] = {}
        for raw, update, outcome in zip(batch, owners, outcomes):
            kind = entries.parse(raw).type
            if kind == entries.MODEL_UPDATE:
                verdicts[update.hospital] = outcome
            elif outcome["accepted"]:
                record["privacy_spends"] += 1
            else:
                log.warning("round %d: ledger rejected %s's privacy spend: %s", r,
                            update.hospital, outcome["reason"])
        accepted = []
        for update, update_hash in checked:
            outcome = verdicts.get(update.hospital)
            if outcome is not None and outcome["accepted"]:
                record["updates"][update.hospital] = update_hash
                update.metrics["update_hash"] = update_hash
                accepted.append(update)
            else:
                why = outcome["reason"] if outcome else "no outcome"
                log.warning("round %d: ledger rejected %s's update, excluded: %s",
                            r, update.hospital, why)
                rejected.append({"hospital": update.hospital,
                                 "reason": f"ledger rejected the update: {why}"})
        return accepted

    def _ledger_global(self, r: int, accepted: list, record: dict) -> None:
        """Signs and records the new global model naming the updates in it."""
        from federation.models import weights_hash
        from ledger import entries

        raw = entries.global_model(
            self._signer, round=r, model_hash=weights_hash(self.weights),
            update_hashes=[u.metrics["update_hash"] for u in accepted],
            timestamp=time.time(),
        )
        try:
            outcome = self._ledger_submit([raw])[0]
        except (TimeoutError, ray.exceptions.RayError) as exc:
            outcome = {"accepted": False, "reason": f"ledger unavailable: {exc}"}
        record["global_model"] = outcome
        if not outcome["accepted"]:
            log.error("round %d: ledger refused the global model: %s", r,
                      outcome["reason"])

    def _sample(self, r: int) -> list[str]:
        return sample_hospitals([name for name, _ in self.hospitals],
                                self.config.sampled_per_round(), self.config.seed, r)

    def _ping(self, sampled: list[str]) -> tuple[list, list[dict]]:
        """Returns the sampled hospitals that answer, and the rest with reasons.

        A hospital Ray is restarting answers "unavailable" at once; it is
        pinged again every ``PING_RETRY_S`` until ``ping_timeout_s``, so a
        restarted hospital rejoins as soon as its partition is reloaded. A
        ping still pending from an earlier round is reused, so a stalled
        hospital does not pile up pings; so is one sent ahead at the end of
        the previous round (``_ping_ahead``).
        """
        r = self.round + 1
        handles = dict(self.hospitals)
        deadline = time.monotonic() + self.config.ping_timeout_s
        waiting = list(sampled)
        answered: set[str] = set()
        dropped: list[dict] = []
        last_error: dict[str, str] = {}

        while waiting:
            refs = {}
            for name in waiting:
                if name not in self._pings:
                    self._pings[name] = handles[name].ping.remote()
                refs[self._pings[name]] = name
            remaining = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=remaining)

            retry = []
            for ref in ready:
                name = refs[ref]
                del self._pings[name]
                try:
                    ray.get(ref)
                    answered.add(name)
                except ray.exceptions.ActorUnavailableError as exc:
                    last_error[name] = _describe(exc)
                    retry.append(name)
                except ray.exceptions.RayError as exc:
                    reason = f"unreachable: {_describe(exc)}"
                    dropped.append(self._drop(r, name, reason))
            waiting = [n for n in waiting if n not in answered
                       and n not in {d["hospital"] for d in dropped}]
            if time.monotonic() >= deadline:
                break
            if retry and len(retry) == len(waiting):
                # Everyone left is restarting: wait a little before asking again.
                time.sleep(min(PING_RETRY_S, max(0.0, deadline - time.monotonic())))

        for name in waiting:
            reason = last_error.get(name) or "busy or restarting"
            dropped.append(self._drop(
                r, name, f"no answer to ping within "
                f"{self.config.ping_timeout_s:g} s ({reason})"))
        reachable = [(n, handles[n]) for n in sampled if n in answered]
        return reachable, dropped

    def _ping_ahead(self) -> None:
        """Sends the next round's liveness checks now, without waiting.

        ``_ping`` reuses a pending or answered ping, so the next round does
        not wait one more round trip before training. A hospital that
        answered and then died before the next round's call is dropped from
        that round by the failed call (as one dying between ping and call
        always was) and pinged again, with retries, in the round after.
        """
        if self.round >= self.config.rounds:
            return
        handles = dict(self.hospitals)
        for name in self._sample(self.round + 1):
            if name not in self._pings:
                self._pings[name] = handles[name].ping.remote()

    def _drop(self, r: int, name: str, reason: str) -> dict:
        log.warning("round %d: %s dropped: %s", r, name, reason)
        return {"hospital": name, "reason": reason}

    def _collect(self, calls: dict, dropped: list[dict]) -> tuple[list, list[str]]:
        """Waits up to the round timeout; returns ``[(name, update)]`` and late names.

        Failed and late hospitals are appended to ``dropped`` with the reason.
        """
        r = self.round + 1
        if not calls:
            return [], []
        ready, pending = ray.wait(
            list(calls), num_returns=len(calls), timeout=self.config.round_timeout_s
        )
        updates = []
        for ref in ready:
            name = calls[ref]
            try:
                updates.append((name, ray.get(ref)))
            except ray.exceptions.RayError as exc:
                reason = _describe(exc)
                log.warning("round %d: %s dropped: %s", r, name, reason)
                dropped.append({"hospital": name, "reason": reason})
        late = []
        for ref in pending:
            name = calls[ref]
            # Removes the call if still queued; a running one cannot be stopped.
            ray.cancel(ref)
            reason = f"timed out after {self.config.round_timeout_s:g} s"
            log.warning("round %d: %s dropped: %s", r, name, reason)
            dropped.append({"hospital": name, "reason": reason})
            late.append(name)

        # Keep the order of the hospital list, not of arrival, so aggregation
        # is reproducible.
        order = {name: i for i, (name, _) in enumerate(self.hospitals)}
        updates.sort(key=lambda item: order[item[0]])
        return updates, late

    def _record(self, r, sampled, accepted, dropped, rejected, need, failure) -> dict:
        from federation.models import weights_hash

        test = self._test_scorer.metrics(self.weights)
        test.pop("calibration", None)
        total = sum(int(u.num_samples) for u in accepted)
        losses = [(u.metrics.get("loss"), u.num_samples) for u in accepted
                  if u.metrics.get("loss") is not None]
        weight = sum(n for _, n in losses)
        train_loss = (sum(loss * n for loss, n in losses) / weight
                      if weight else None)
        val = [u.metrics.get("val_auroc") for u in accepted]
        val = [v for v in val if v is not None and math.isfinite(v)]
        return {
            "round": r,
            "status": "failed" if failure else "ok",
            "failure": failure,
            "sampled": sampled,
            "participants": [] if failure else [u.hospital for u in accepted],
            "accepted": [u.hospital for u in accepted],
            "dropped": dropped,
            "rejected": rejected,
            "quorum": need,
            "num_samples": total,
            "mean_val_auroc": float(np.mean(val)) if val else None,
            "auroc": test["auroc"],
            "loss": train_loss,
            "test": test,
            "weights_hash": weights_hash(self.weights),
        }

    # --- checkpoints ---------------------------------------------------

    def _checkpoint(self) -> None:
        """Writes the checkpoint atomically: a crash leaves the old one whole."""
        from actors import checkpoint

        checkpoint.save(
            self.checkpoint_dir, round=self.round, model=self.config.model,
            weights=self.weights, strategy_state=self.strategy.state_dict(),
            data_key=self.config.data.key(),
            hospitals=[name for name, _ in self.hospitals],
            settings=checkpoint.training_settings(self.config),
            records=self.records,
        )

    def _restore(self) -> None:
        """Continues from the checkpoint; refuses one of another run setup."""
        from actors import checkpoint

        meta, weights, state = checkpoint.load(self.checkpoint_dir)
        checkpoint.check_matches(
            meta, self.checkpoint_dir, model=self.config.model,
            strategy=self.config.strategy, data_key=self.config.data.key(),
            hospitals=[name for name, _ in self.hospitals],
            weight_count=int(self.weights.size),
        )
        changed = checkpoint.changed_settings(
            meta, checkpoint.training_settings(self.config))
        if changed:
            log.warning("resuming with changed settings: %s", "; ".join(changed))
        self.strategy.load_state_dict(state)
        self.weights = weights
        self.round = int(meta["round"])
        self.records = list(meta["records"])
        self.resumed_from = self.round
        log.info("resumed from %s at round %d", self.checkpoint_dir, self.round)


def _broadcast(weights: np.ndarray):
    """The global weights as the argument of every hospital's call this round.

    Small vectors travel inside each call (Ray inlines arguments up to
    ``INLINE_WEIGHTS_BYTES``), which spares every hospital a trip to the
    object store; larger ones are put in the object store once and shared.
    """
    if weights.nbytes <= INLINE_WEIGHTS_BYTES:
        return weights
    return ray.put(weights)


def sample_hospitals(names: list[str], count: int, seed: int, round: int
                     ) -> list[str]:
    """Returns ``count`` of ``names`` for ``round``, in list order.

    The draw depends only on ``seed`` and ``round``, so a resumed run asks
    the same hospitals a fresh run would have.
    """
    if count >= len(names):
        return list(names)
    rng = np.random.default_rng([seed, round])
    chosen = rng.choice(len(names), size=count, replace=False)
    return [names[i] for i in sorted(chosen)]


def _dropout_note(lost: int, inputs: int, sa) -> str:
    """One sentence on the share of a secure round's hospitals that dropped."""
    share = lost / inputs if inputs else 0.0
    side = ">" if share > sa.dropout_threshold else "<="
    return (f"{lost} of {inputs} hospitals dropped from the secure round "
            f"({share:.0%} {side} dropout threshold {sa.dropout_threshold:.0%})")


def _classify(answer) -> tuple[str, str | None]:
    """``("declined", reason)``, ``("rejected", reason)`` or ``("update", None)``."""
    if isinstance(answer, dict):
        if "declined" in answer:
            return "declined", answer["declined"]
        if "rejected" in answer:
            return "rejected", answer["rejected"]
        return "update", None
    if not hasattr(answer, "delta"):
        return "declined", getattr(answer, "reason", repr(answer))
    return "update", None


def _privacy_of(answer) -> dict | None:
    """Epsilon spent by the hospital that sent ``answer``, if it reports one.

    ``{"epsilon", "epsilon_round", "delta"}`` plus ``noise_multiplier`` when
    the hospital trained this round and reported the noise it used.
    """
    if isinstance(answer, dict):
        if answer.get("privacy") is not None:
            return {"epsilon": answer["privacy"]["epsilon"], "epsilon_round": 0.0,
                    "delta": answer["privacy"]["delta"]}
        metrics = answer.get("metrics") or {}
    elif hasattr(answer, "metrics"):
        metrics = answer.metrics or {}
    else:
        privacy = getattr(answer, "privacy", None)
        if privacy is None:
            return None
        return {"epsilon": privacy["epsilon"], "epsilon_round": 0.0,
                "delta": privacy["delta"]}
    if metrics.get("epsilon") is None:
        return None
    spent = {"epsilon": float(metrics["epsilon"]),
             "epsilon_round": float(metrics.get("epsilon_round") or 0.0),
             "delta": float(metrics["delta"])}
    if metrics.get("noise_multiplier") is not None:
        # The noise actually used (calibrated or fixed), for the report.
        spent["noise_multiplier"] = float(metrics["noise_multiplier"])
    return spent


def _describe(exc: BaseException) -> str:
    """One line on why a remote call failed: the hospital's error or its death."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if exc.cause is not None else exc
        text = f"{type(cause).__name__}: {cause}"
    elif isinstance(exc, ray.exceptions.RayActorError):
        text = f"actor died or restarting ({type(exc).__name__})"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text.strip().splitlines()[0][:300]

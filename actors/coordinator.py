"""The coordinator: a Ray actor that runs federated rounds over hospital actors.

Each round: sample a share of the hospitals (seeded by run seed and round, so
a resumed run samples the same), ping them (a restarted hospital rejoins once
it answers), broadcast the global weights once (``ray.put``), wait for
updates up to the round timeout, screen them
(``federation.aggregation.check_update``), and aggregate the accepted ones if
there are at least ``quorum`` of them. A hospital that raises, dies or times
out is dropped from that round with the reason recorded; a round without
quorum fails cleanly and leaves the global model unchanged.

The coordinator holds only the held-out test patients (to score the global
model each round) and the global model; it never sees a hospital's rows.
After every round it checkpoints the global weights, the strategy state and
the round records atomically (write to a temporary file, then rename), and
``resume`` continues from that checkpoint.

Known shortcoming: Ray cannot interrupt a running call on a synchronous actor,
so a hospital that stalls past the round timeout keeps computing; it is left
out of later rounds until it answers a ping again.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pkl"
CHECKPOINT_VERSION = 1
COORDINATOR_CPUS = 0.1
# Seconds between pings to a hospital that Ray reports as restarting.
PING_RETRY_S = 0.5


@ray.remote(num_cpus=COORDINATOR_CPUS, max_restarts=0)
class Coordinator:
    """Runs the rounds of one federated job.

    config: ``cluster.config.RunConfig``.
    n_features: input width of the model.
    X_test, y_test: held-out patients that score the global model each round.
    hospitals: ``[(name, trainer_handle)]`` in hospital index order.
    checkpoint_dir: folder for ``checkpoint.pkl``.
    device: ``"cpu"`` or ``"cuda"``, where aggregation runs.
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
    ) -> None:
        import torch

        from federation.aggregation import build_strategy
        from federation.models import build_model, get_weights

        torch.set_num_threads(1)
        from actors.hospital import _configure_logging

        _configure_logging()

        self.config = config
        self.device = device
        self.X_test = X_test
        self.y_test = y_test
        self.hospitals = list(hospitals)
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME
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

        if config.resume:
            self._restore()

    # --- queries -------------------------------------------------------

    def state(self) -> dict:
        """``{"round", "weights_hash", "resumed_from", "device"}``."""
        from federation.models import weights_hash

        return {"round": self.round, "weights_hash": weights_hash(self.weights),
                "resumed_from": self.resumed_from, "device": self.device}

    def global_weights(self) -> np.ndarray:
        """The current global weights (flat float32)."""
        return self.weights

    def round_records(self) -> list[dict]:
        """Every round record so far, including those restored on resume."""
        return self.records

    # --- rounds --------------------------------------------------------

    def run_round(self) -> dict:
        """Runs the next round and returns its record.

        The record: ``round``, ``status`` (``"ok"``/``"failed"``), ``failure``
        (reason or None), ``sampled``, ``participants`` (hospitals whose
        updates went into the global model; empty when the round failed),
        ``accepted`` (updates that passed screening), ``dropped`` and
        ``rejected`` (``[{"hospital", "reason"}]``), ``quorum``,
        ``num_samples``, ``loss`` (sample-weighted mean training loss of the
        accepted updates), ``mean_val_auroc`` (their mean local validation
        AUROC), ``auroc`` and ``test`` (scores of the global model on the test
        patients after the round), ``weights_hash``, ``late`` (hospitals that
        timed out) and ``seconds``.
        """
        from federation.aggregation import RoundFailed, check_update

        started = time.perf_counter()
        r = self.round + 1
        sampled = self._sample(r)
        reachable, dropped = self._ping(sampled)

        # One broadcast object per round, shared by every hospital.
        weights_ref = ray.put(self.weights)
        calls = {
            handle.fit.remote(r, weights_ref, self.config.local_epochs): name
            for name, handle in reachable
        }
        updates, late = self._collect(calls, dropped)

        accepted, rejected = [], []
        for name, update in updates:
            reason = check_update(update, self.weights.size, expected_round=r)
            if reason is None and update.hospital != name:
                reason = f"update names hospital {update.hospital!r}, sent by {name!r}"
            if reason is None:
                # Ray hands out read-only arrays; aggregation wants its own copy.
                update.delta = np.array(update.delta)
                accepted.append(update)
            else:
                log.warning("round %d: rejected update from %s: %s", r, name, reason)
                rejected.append({"hospital": name, "reason": reason})

        need = self.config.quorum_count(len(sampled))
        failure = None
        if not updates:
            failure = f"no update arrived from {len(sampled)} sampled hospital(s)"
        elif not accepted:
            failure = f"all {len(updates)} update(s) rejected"
        elif len(accepted) < need:
            failure = f"quorum not met: {len(accepted)} accepted, {need} needed"
        else:
            try:
                self.weights = self.strategy.aggregate(self.weights, accepted, r)
            except RoundFailed as exc:
                failure = str(exc)
        if failure is not None:
            log.warning("round %d failed, global model unchanged: %s", r, failure)

        record = self._record(r, sampled, accepted, dropped, rejected, need, failure)
        record["late"] = late
        record["seconds"] = time.perf_counter() - started
        self.round = r
        self.records.append(record)
        self._checkpoint()
        return record

    def _sample(self, r: int) -> list[str]:
        return sample_hospitals([name for name, _ in self.hospitals],
                                self.config.sampled_per_round(), self.config.seed, r)

    def _ping(self, sampled: list[str]) -> tuple[list, list[dict]]:
        """Returns the sampled hospitals that answer, and the rest with reasons.

        A hospital Ray is restarting answers "unavailable" at once; it is
        pinged again every ``PING_RETRY_S`` until ``ping_timeout_s``, so a
        restarted hospital rejoins as soon as its partition is reloaded. A
        ping still pending from an earlier round is reused, so a stalled
        hospital does not pile up pings.
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
        from federation.metrics import binary_metrics
        from federation.models import weights_hash
        from federation.training import predict_proba

        p = predict_proba(self.config.model, self.weights, self.X_test,
                          hidden=self.config.hidden)
        test = binary_metrics(self.y_test, p)
        test.pop("calibration", None)
        total = sum(int(u.num_samples) for u in accepted)
        losses = [(u.metrics.get("loss"), u.num_samples) for u in accepted]
        train_loss = (sum(loss * n for loss, n in losses if loss is not None) / total
                      if total else None)
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
        state = {
            "version": CHECKPOINT_VERSION,
            "round": self.round,
            "weights": self.weights,
            "strategy": self.strategy.state_dict(),
            "records": self.records,
            "model": self.config.model,
            "strategy_name": self.config.strategy,
        }
        folder = self.checkpoint_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _restore(self) -> None:
        path = self.checkpoint_path
        if not path.exists():
            log.warning("resume asked for, but no checkpoint at %s: starting at "
                        "round 1", path)
            return
        with path.open("rb") as fh:
            # The checkpoint is written by this program into the run's own
            # folder; it is trusted like the configuration file is.
            state = pickle.load(fh)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint {path} has version {state.get('version')!r}, expected "
                f"{CHECKPOINT_VERSION}; start without resume"
            )
        weights = np.asarray(state["weights"], dtype=np.float32)
        if weights.shape != self.weights.shape or state["model"] != self.config.model:
            raise ValueError(
                f"checkpoint {path} holds a {state['model']!r} model with "
                f"{weights.size} weights; this run builds {self.config.model!r} with "
                f"{self.weights.size}. Use a matching config or a new checkpoint_dir"
            )
        self.strategy.load_state_dict(state["strategy"])
        self.weights = weights
        self.round = int(state["round"])
        self.records = list(state["records"])
        self.resumed_from = self.round
        log.info("resumed from %s at round %d", path, self.round)


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

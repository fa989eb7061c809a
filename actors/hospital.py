"""A hospital as a group of Ray actors that keep their patients to themselves.

``HospitalTrainer`` loads its own partition inside the actor process
(``clinical.load_hospital``) and only ever hands out model weights, weight
deltas, sample counts and summary metrics: no method returns rows, labels or
predictions. Ray restarts a crashed trainer (``max_restarts``); the
constructor runs again, reloads the partition from the prepared-array cache,
and the hospital rejoins the rounds once it answers a ping.

Extension points, each in one place:

- ``HospitalTrainer._make_trainer`` chooses the local trainer: plain
  ``LocalTrainer``, or ``federation.privacy.PrivateTrainer`` when the run
  sets ``dp`` (one privacy engine per hospital for the whole run, living in
  this actor, so epsilon composes over every round).
- ``HospitalTrainer._postprocess`` is the single step between local training
  and the update leaving the actor: with the ledger on, the hospital signs
  its own ``model_update`` entry (hash of the global model it started from,
  hash of its update, sample count, privacy spent) and, under DP, its
  cumulative ``privacy_spend``, with its own key loaded from the
  consortium's ``keys/`` folder. The signed bytes travel in the update's
  metrics (``ledger_entries``); the coordinator only relays them.

A hospital whose next round would exceed its privacy budget declines the
round: ``fit`` returns a ``Declined`` (with the reason) instead of an update.

Privacy spend is the hospital's own record and outlives its process: under
DP, with a ``state_dir``, the trainer writes its accountant's state to
``<state_dir>/privacy.json`` (``actors.checkpoint.write_privacy_state``:
temp file, fsync, rename) after every trained round and BEFORE the update
leaves the actor, so no released update is ever missing from the record.
The constructor restores that file when present, so a trainer Ray restarts
after a crash, or one of a resumed run, continues its epsilon instead of
starting from 0. ``medfed run`` uses ``<out>/hospitals/<name>/``; on a real
deployment the folder is on the hospital's own disk. Without a
``state_dir`` the spend lives in memory only and a restart forgets it.
A crash during training, before the write, loses only steps whose result
never left the process (nothing of them was released). A record that cannot
be restored (other accountant or noise) makes the constructor fail: Ray
then marks the trainer dead and the rounds drop it, rather than let it
train with its spend forgotten.

``HospitalGroup`` is the driver-side handle: it creates one hospital's actors
(trainer, and with secure aggregation its ``HospitalAgent``, which holds the
secure-aggregation secrets and receives the trainer's update) on one
placement-group bundle, so they share a node; ``reserve_bundles`` makes the
placement group, spreading hospitals over nodes on a multi-node cluster.

Test-only fault injection: ``Fault`` makes a trainer raise, stall, crash its
process, send a malformed update or sign its ledger entry with a wrong key
(``"wrong_key"``, a forged update) in chosen rounds. It exists to test the
coordinator's handling of failing hospitals and is never set by ``medfed run``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


log = logging.getLogger(__name__)

# A trainer is a small single-threaded model fit: ten hospitals share 2 CPUs.
TRAINER_CPUS = 0.1
# Restarts per trainer before Ray gives up on it for the rest of the run.
MAX_RESTARTS = 3

FAULT_KINDS = (
    "raise", "sleep", "crash", "nan", "zero_samples", "wrong_shape", "wrong_key",
)


@dataclass
class Declined:
    """A hospital's answer when it will not train this round, and why.

    privacy: ``{"epsilon", "delta"}`` spent so far, or None without DP.
    """

    hospital: str
    round: int
    reason: str
    privacy: dict | None = None


@dataclass(frozen=True)
class Fault:
    """Test-only: a failure a trainer injects into ``fit`` in chosen rounds.

    kind: ``"raise"`` (fit raises RuntimeError), ``"sleep"`` (fit stalls for
        ``seconds`` first), ``"crash"`` (the actor process exits mid-fit;
        Ray restarts it), ``"nan"``, ``"zero_samples"`` or ``"wrong_shape"``
        (a malformed update is sent), ``"wrong_key"`` (the ledger entry is
        signed with a key that is not the hospital's).
    rounds: rounds in which to fail; empty means every round.
    seconds: stall length for ``"sleep"``.
    """

    kind: str
    rounds: tuple[int, ...] = ()
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; choose one of "
                f"{', '.join(FAULT_KINDS)}"
            )

    def applies(self, round: int) -> bool:
        return not self.rounds or round in self.rounds


@ray.remote(num_cpus=TRAINER_CPUS, max_restarts=MAX_RESTARTS, max_task_retries=0)
class HospitalTrainer:
    """One hospital's trainer actor; its patient rows never leave the process.

    config: the run's ``cluster.config.RunConfig`` (data spec and training
        settings);
        index: which hospital partition to load.
    fault: test-only failure injection (see ``Fault``); ``None`` in real runs.
    state_dir: this hospital's own folder for its privacy record (see the
        module docstring); None keeps the spend in memory only.

    Raises ``federation.privacy.PrivacyStateError`` or
    ``actors.checkpoint.CheckpointError`` (ValueErrors) when the saved
    privacy record cannot be restored: the hospital does not start rather
    than train with its spend forgotten.
    """

    def __init__(self, config, index: int, fault: Fault | None = None,
                 state_dir: str | None = None) -> None:
        import torch

        from clinical.prepared import load_hospital

        # One thread per trainer: many hospitals share few cores.
        torch.set_num_threads(1)
        _configure_logging()

        started = time.perf_counter()
        self._config = config
        self._index = index
        self._fault = fault
        self._data = load_hospital(config.data, index, cache_dir=config.cache_dir)
        self.name = self._data.name
        self._state_dir = state_dir
        self._trainer = self._make_trainer()
        self._restore_privacy()
        self._val_scorer = None
        if len(self._data.y_val):
            from actors.scoring import Scorer

            # Built once: fit scores every local model on these patients.
            self._val_scorer = Scorer(config.model, self._data.X_val,
                                      self._data.y_val, hidden=config.hidden)
        self._signer = self._load_signer()
        self._incarnation = f"{os.getpid()}-{time.time_ns()}"
        log.info(
            "%s ready in %.2f s: %d training and %d validation patients",
            self.name, time.perf_counter() - started,
            len(self._data.y_train), len(self._data.y_val),
        )

    def _make_trainer(self):
        """Returns the local trainer; the one place that picks its kind."""
        from federation.training import LocalTrainer

        c = self._config
        if c.dp is not None:
            from federation.privacy import PrivateTrainer

            return PrivateTrainer(
                c.model, self._data.X_train, self._data.y_train, c.dp,
                batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
                local_epochs=c.local_epochs, hidden=c.hidden,
                seed=c.seed + 1000 * (self._index + 1),
                budget_epsilon=c.dp_budgets.get(self.name),
                proximal_mu=c.mu if c.strategy == "fedprox" else 0.0,
                name=self.name,
            )
        return LocalTrainer(
            c.model, self._data.X_train, self._data.y_train,
            batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
            proximal_mu=c.mu if c.strategy == "fedprox" else 0.0,
            hidden=c.hidden, seed=c.seed + 1000 * (self._index + 1),
        )

    def _restore_privacy(self) -> None:
        """Puts the saved privacy record back into the trainer, if there is one."""
        if self._state_dir is None or not hasattr(self._trainer, "privacy_state"):
            return
        from actors.checkpoint import read_privacy_state

        state = read_privacy_state(self._state_dir)
        if state is None:
            log.info("%s: no privacy record in %s, starting at epsilon 0",
                     self.name, self._state_dir)
            return
        if state.get("hospital") != self.name:
            raise ValueError(
                f"{self._state_dir}: privacy record belongs to "
                f"{state.get('hospital')!r}, not {self.name}; each hospital "
                "needs its own state folder"
            )
        self._trainer.restore_privacy_state(state)

    def _save_privacy(self) -> None:
        """Writes the trainer's privacy record durably; no-op without one."""
        if self._state_dir is None or not hasattr(self._trainer, "privacy_state"):
            return
        from actors.checkpoint import write_privacy_state

        write_privacy_state(self._state_dir, self._trainer.privacy_state())

    def _load_signer(self):
        """This hospital's ledger signing key, or None when the ledger is off."""
        ledger = self._config.ledger
        if not ledger.enabled or ledger.dir is None:
            return None
        from ledger.genesis import load_signer

        return load_signer(ledger.dir, self.name)

    def ping(self) -> dict:
        """Liveness: ``{"hospital", "node", "pid", "incarnation"}``.

        node: the Ray node id this hospital runs on; incarnation changes
        when Ray restarts the actor.
        """
        return {"hospital": self.name, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(),
                "incarnation": self._incarnation}

    def fit(
        self,
        round: int,
        global_weights: np.ndarray,
        epochs: int | None = None,
        config: dict | None = None,
    ):
        """Trains from the global weights and returns a ``federation.Update``.

        round: the round this update is for (echoed back, checked by the
            coordinator). epochs: local passes (``None``: the run's
            ``local_epochs``). config: settings for this round only;
            ``"lr"`` and ``"proximal_mu"`` are honoured.
        The update's metrics hold the trainer's (``loss``, ``steps``, ...; under
        DP ``epsilon``, ``epsilon_round``, ``delta`` and ``loss`` None) plus
        ``val_auroc`` and ``val_loss`` of the local model on this hospital's
        validation patients, and with the ledger on ``ledger_entries``
        (signed entry bytes, see the module docstring).
        Returns a ``Declined`` instead when the privacy budget would be
        exceeded; nothing is trained then.
        """
        from federation.updates import Update

        # Only a private trainer can run out of budget; importing the privacy
        # module (Opacus, SciPy) in every hospital of a non-private run would
        # cost seconds and ~100 MB per process.
        if self._config.dp is not None:
            from federation.dp_config import BudgetExhausted
        else:
            BudgetExhausted = _NeverRaised

        self._inject_before(round)

        # Per-round settings apply to this round only.
        saved = {}
        for key in ("lr", "proximal_mu"):
            if config and key in config:
                saved[key] = getattr(self._trainer, key)
                setattr(self._trainer, key, float(config[key]))

        # A copy: the broadcast array from the object store is read-only.
        global_weights = np.array(global_weights, dtype=np.float32)
        try:
            result = self._trainer.fit(
                global_weights, epochs or self._config.local_epochs
            )
        except BudgetExhausted as exc:
            log.warning("%s declines round %d: %s", self.name, round, exc)
            return Declined(self.name, round, str(exc), self._privacy())
        finally:
            for key, value in saved.items():
                setattr(self._trainer, key, value)

        # The spend is on disk before anything of this round leaves: a crash
        # from here on cannot lose a spend that was used. If the write fails
        # the round fails and no update is released.
        self._save_privacy()
        metrics = dict(result.metrics)
        local = self._validate(global_weights + result.delta)
        metrics["val_auroc"] = local["auroc"]
        metrics["val_loss"] = local["loss"]

        update = Update(
            hospital=self.name, round=round, delta=result.delta,
            num_samples=int(result.num_samples), metrics=metrics,
        )
        return self._inject_after(self._postprocess(update, global_weights))

    def _privacy(self) -> dict | None:
        """``{"epsilon", "delta"}`` spent so far, or None without DP."""
        if not hasattr(self._trainer, "spent"):
            return None
        epsilon, delta = self._trainer.spent()
        return {"epsilon": float(epsilon), "delta": float(delta)}

    def _postprocess(self, update, global_weights: np.ndarray):
        """The one step between training and sending: signs the ledger entries."""
        if self._signer is None:
            return update
        from federation.models import weights_hash
        from ledger import entries

        signer = self._signer
        fault = self._fault
        if (fault is not None and fault.kind == "wrong_key"
                and fault.applies(update.round)):
            from ledger.identity import Signer, generate_key

            log.warning("%s: injected forged signature in round %d", self.name,
                        update.round)
            signer = Signer(self.name, generate_key())
        privacy = self._privacy()
        now = time.time()
        signed = [entries.model_update(
            signer, round=update.round, base_model_hash=weights_hash(global_weights),
            update_hash=weights_hash(update.delta),
            num_samples=max(1, int(update.num_samples)), privacy_spent=privacy,
            timestamp=now,
        )]
        if privacy is not None:
            signed.append(entries.privacy_spend(
                signer, round=update.round, epsilon=privacy["epsilon"],
                delta=privacy["delta"], accountant=self._config.dp.accountant,
                timestamp=now,
            ))
        update.metrics["ledger_entries"] = signed
        return update

    def _inject_after(self, update):
        fault = self._fault
        if fault is not None and fault.applies(update.round):
            if fault.kind == "nan":
                update.delta = np.full_like(update.delta, np.nan)
            elif fault.kind == "zero_samples":
                update.num_samples = 0
            elif fault.kind == "wrong_shape":
                update.delta = np.zeros(update.delta.size + 1, dtype=np.float32)
        return update

    def _inject_before(self, round: int) -> None:
        fault = self._fault
        if fault is None or not fault.applies(round):
            return
        if fault.kind == "raise":
            raise RuntimeError(f"{self.name}: injected failure in round {round}")
        if fault.kind == "sleep":
            time.sleep(fault.seconds)
        elif fault.kind == "crash":
            log.warning("%s: injected crash in round %d", self.name, round)
            os._exit(1)

    def evaluate(self, weights: np.ndarray) -> dict:
        """Scores ``weights`` on this hospital's validation patients.

        Returns ``federation.metrics.binary_metrics`` plus ``loss`` and
        ``num_samples`` (the validation count); AUROC is NaN when the
        validation patients hold one class only.
        """
        result = self._validate(np.array(weights, dtype=np.float32))
        result["num_samples"] = int(len(self._data.y_val))
        return result

    def train_local_only(self, epochs_total: int) -> np.ndarray:
        """Trains a fresh model on this hospital's patients alone; returns weights.

        The model starts from the same initial weights as the federation and
        makes ``epochs_total`` passes, as many as the federation's rounds
        times local epochs. A separate trainer is used, so the federated
        trainer's state (shuffling stream, any privacy accounting) is untouched.
        """
        from federation.models import build_model, get_weights
        from federation.training import LocalTrainer

        c = self._config
        initial = get_weights(build_model(
            c.model, self._data.X_train.shape[1], c.hidden, c.seed
        ))
        trainer = LocalTrainer(
            c.model, self._data.X_train, self._data.y_train,
            batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
            hidden=c.hidden, seed=c.seed + 1000 * (self._index + 1),
        )
        result = trainer.fit(initial, epochs_total)
        return (initial + result.delta).astype(np.float32)

    def _validate(self, weights: np.ndarray) -> dict:
        if self._val_scorer is None:
            return {"auroc": math.nan, "loss": math.nan}
        try:
            # What the trainer's evaluate computes, without rebuilding a model.
            return self._val_scorer.metrics(weights, loss=True)
        except ValueError as exc:
            # A diverged local model (non-finite outputs) cannot be scored;
            # the coordinator's update screening decides what happens to it.
            log.warning("%s: local validation failed: %s", self.name, exc)
            return {"auroc": math.nan, "loss": math.nan}


class _NeverRaised(Exception):
    """Stands for ``BudgetExhausted`` where no privacy budget exists."""


def _configure_logging() -> None:
    """Gives actor processes INFO logs on stderr, which Ray forwards to the driver."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )


def trainer_cpus(count: int, cluster_cpus: float, reserved: float = 0.0) -> float:
    """CPU share per hospital: ``TRAINER_CPUS``, less when many share few cores.

    reserved: CPUs other actors of the job need (the coordinator). The share
    never drops below 0.01 CPU; beyond that the cluster is too small.
    """
    if count < 1:
        raise ValueError(f"need at least one hospital, got {count}")
    share = min(TRAINER_CPUS, (cluster_cpus - reserved) / count)
    if share < 0.01:
        raise ValueError(
            f"{count} hospitals do not fit on {cluster_cpus:g} CPU(s); use fewer "
            "hospitals or more CPUs (--num-cpus, or a larger cluster)"
        )
    return round(share, 4)


def reserve_bundles(
    count: int, cpus_per_bundle: float = TRAINER_CPUS, timeout_s: float = 60.0
) -> PlacementGroup:
    """Reserves one placement-group bundle per hospital and waits until ready.

    The bundles spread over nodes (``SPREAD``) when the cluster has more than
    one, and pack onto the one node otherwise. Raises RuntimeError naming the
    shortfall when the cluster cannot hold them within ``timeout_s`` seconds.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    strategy = "SPREAD" if len(nodes) > 1 else "PACK"
    group = placement_group([{"CPU": cpus_per_bundle}] * count, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        free = ray.available_resources().get("CPU", 0.0)
        raise RuntimeError(
            f"could not place {count} hospitals ({count * cpus_per_bundle:.1f} CPU) "
            f"within {timeout_s:.0f} s; {free:.1f} CPU free. Use fewer hospitals "
            "or a larger cluster (--num-cpus)"
        )
    log.info("placed %d hospital bundles of %g CPU (%s over %d node(s))", count,
             cpus_per_bundle, strategy, len(nodes))
    return group


class HospitalGroup:
    """Driver-side handle on one hospital's actors, all on one bundle.

    Creating a group starts its actors; ``trainer`` is the training actor's
    handle; ``agent`` is its ``HospitalAgent`` when the run uses secure
    aggregation (else None). ``cpus`` is the bundle's CPU share, split
    between the actors. ``kill`` ends them for good (no restart).
    agent_fault: test-only ``actors.hospital_agent.AgentFault``.
    state_dir: the hospital's privacy record folder (``HospitalTrainer``).
    """

    def __init__(
        self,
        config,
        index: int,
        name: str,
        group: PlacementGroup | None = None,
        fault: Fault | None = None,
        cpus: float = TRAINER_CPUS,
        agent_fault=None,
        state_dir: str | None = None,
    ) -> None:
        self.index = index
        self.name = name
        secure = config.secure_agg.mode != "none"
        # The agent masks or encrypts once per round: a third of the share.
        trainer_share = round(cpus * 2 / 3, 4) if secure else cpus
        options: dict = {"num_cpus": trainer_share}
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index,
            )
        self.trainer = HospitalTrainer.options(**options).remote(
            config, index, fault, state_dir
        )
        self.agent = None
        if secure:
            from actors.hospital_agent import HospitalAgent, noise_from_config

            options = dict(options, num_cpus=round(cpus - trainer_share, 4))
            self.agent = HospitalAgent.options(**options).remote(
                index, name, self.trainer,
                ckks_key_holder=(index == 0 and config.secure_agg.mode == "ckks"),
                noise=noise_from_config(config), fault=agent_fault,
            )

    def actors(self) -> list:
        """Every actor handle of this hospital."""
        return [self.trainer] + ([self.agent] if self.agent is not None else [])

    def kill(self) -> None:
        for actor in self.actors():
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone: nothing left to end
                log.debug("%s: kill: %s", self.name, exc)

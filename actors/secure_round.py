"""Coordinator-side drivers of one secure round over ``HospitalAgent`` actors.

``masked_round`` runs SecAgg+ masking stage by stage: every stage calls the
agents still in the round, waits with ``ray.wait`` up to the stage's time
limit, and treats an agent that raised, died or did not answer in time as
dropped at that stage. The pure ``MaskingServer`` then recovers the sum of
the survivors while at most ``threshold``-tolerable hospitals dropped; past
that it raises ``AggregationAborted``, which propagates with the stage
record added to its reason, and no sum is returned.

``ckks_round`` has every agent encrypt its weighted update under the key
holder's public context, adds the ciphertexts here (this side never holds a
secret key: ``CKKSAggregator`` refuses one) and has the key-holder agent
decrypt the one sum.

Both return (summed weighted delta as float32, total weight as int, report)
for ``strategy.apply(global_weights, summed, total_weight)``. The report
holds, per stage, ``seconds`` (wall time at the coordinator), ``bytes_in``
and ``bytes_out`` (message payloads received from and sent to agents) and
``dropped`` (hospital names), plus ``dropped_at`` as {name: stage} and
``errors`` as {name: "stage: reason"}.

Inputs: per hospital, (source, weight). source is an ``ObjectRef`` (passed
to the agent as a top-level argument, so Ray resolves it in the agent), an
array, or None for the update the agent kept from ``HospitalAgent.train``.
Prefer None with ``train``: a reference the coordinator owns to a value
under Ray's inline threshold (100 KiB) already sits in the coordinator's
memory (see ``actors.hospital_agent``).

Known shortcomings: a timed-out call is cancelled on a best-effort basis
only; a running call on a stalled agent keeps that agent busy, and Ray
queues its next calls behind it. Hospital ids are positions in ``agents``,
so the coordinator must keep that order fixed for a run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import numpy as np
import ray
import ray.exceptions

from federation.secagg.ckks import CKKSAggregator
from federation.secagg.config import MaskingConfig
from federation.secagg.errors import AggregationAborted
from federation.secagg.server import MaskingServer

log = logging.getLogger(__name__)

MASKING_STAGES = (
    "identity", "begin_round", "advertise", "share_keys", "masked_input",
    "unmask_response",
)
CKKS_STAGES = ("public_context", "encrypt", "decrypt")

Observer = Callable[[str, str, object], None]
"""Called as observer(stage, hospital name, message) for every message the
coordinator receives from an agent, as it arrives (audit, tests)."""


def _limit(timeout_s: float | Mapping[str, float], stage: str) -> float:
    """The time limit of ``stage`` in seconds."""
    if isinstance(timeout_s, Mapping):
        if stage not in timeout_s:
            raise ValueError(
                f"no time limit for stage {stage!r} in timeout_s {dict(timeout_s)}; "
                "give every stage one, or a single number"
            )
        return float(timeout_s[stage])
    return float(timeout_s)


def _reason(error: BaseException) -> str:
    """A one-line account of why an agent's call failed."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause if error.cause is not None else error
        return f"{type(cause).__name__}: {str(cause).splitlines()[-1][:300]}"
    if isinstance(error, ray.exceptions.RayActorError):
        return "agent died (RayActorError)"
    return f"{type(error).__name__}: {str(error)[:300]}"


class _Stages:
    """Runs stages over agents and keeps the per-stage record."""

    def __init__(self, timeout_s, observer: Observer | None) -> None:
        self.timeout_s = timeout_s
        self.observer = observer
        self.stages: dict[str, dict] = {}
        self.dropped: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def record(self, stage: str) -> dict:
        return self.stages.setdefault(
            stage, {"seconds": 0.0, "bytes_in": 0, "bytes_out": 0, "dropped": []}
        )

    def drop(self, stage: str, name: str, reason: str) -> None:
        self.dropped[name] = stage
        self.errors[name] = f"{stage}: {reason}"
        self.record(stage)["dropped"].append(name)
        log.warning("secure round: %s dropped at %s: %s", name, stage, reason)

    def run(
        self,
        stage: str,
        calls: Mapping[str, ray.ObjectRef],
        on_result: Callable[[str, object], None] | None = None,
    ) -> dict[str, object]:
        """Waits for ``calls`` (name -> ref) up to the stage's limit.

        Each result is passed to ``on_result`` as it arrives (an exception
        there drops that hospital); returns {name: result} of the hospitals
        that answered. The stage's seconds include the handling of results.
        """
        record = self.record(stage)
        start = time.perf_counter()
        deadline = start + _limit(self.timeout_s, stage)
        names = {ref: name for name, ref in calls.items()}
        pending = list(calls.values())
        results: dict[str, object] = {}

        while pending:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in ready:
                name = names[ref]
                try:
                    result = ray.get(ref)
                except Exception as error:  # the agent failed: it drops here
                    self.drop(stage, name, _reason(error))
                    continue
                if self.observer is not None:
                    self.observer(stage, name, result)
                try:
                    if on_result is not None:
                        on_result(name, result)
                except AggregationAborted:
                    raise
                except Exception as error:  # a malformed message: it drops here
                    self.drop(stage, name, _reason(error))
                    continue
                results[name] = result

        limit = _limit(self.timeout_s, stage)
        for ref in pending:
            self.drop(stage, names[ref], f"no answer within {limit:.1f} s")
            try:
                ray.cancel(ref)
            except Exception as error:  # cancelling is best effort only
                log.debug("cancel of %s at %s failed: %s", names[ref], stage, error)
        record["seconds"] += time.perf_counter() - start
        return results

    def report(self) -> dict:
        return {"stages": self.stages, "dropped_at": dict(self.dropped),
                "errors": dict(self.errors)}


def _aborted(error: AggregationAborted, stages: _Stages) -> AggregationAborted:
    """The same abort, with who dropped where added to reason and details."""
    where = ", ".join(f"{n} at {s}" for n, s in sorted(stages.dropped.items()))
    reason = f"{error.reason} (dropped: {where or 'none'})"
    details = dict(error.details)
    details.update(stages.report())
    return AggregationAborted(reason, details)


def masked_round(
    agents: Mapping[str, ray.actor.ActorHandle],
    inputs: Mapping[str, tuple[object, int | None]],
    config: MaskingConfig,
    round: int,
    timeout_s: float | Mapping[str, float],
    device: str = "cpu",
    *,
    directory: Mapping[int, bytes] | None = None,
    observer: Observer | None = None,
) -> tuple[np.ndarray, int, dict]:
    """Runs one SecAgg+ round over hospital agents.

    agents: hospital name -> ``HospitalAgent`` handle, all hospitals of the
        run; a hospital's id is its position here and ``config.n`` must
        equal ``len(agents)``.
    inputs: name -> (source, weight) for the hospitals with an update this
        round (see the module docstring); weight None takes the update's
        ``num_samples``. Agents without an input sit the round out.
    config: the round's ``MaskingConfig`` (pickled to every agent).
    round: the round number.
    timeout_s: seconds each stage may take, one number or {stage: seconds}
        over ``MASKING_STAGES``. The ``masked_input`` limit covers waiting
        for an unfinished ``ObjectRef`` input too.
    device: where the server sums and unmasks ("cpu", "cuda", "torch-cpu",
        "auto"; see ``federation.secagg.modsum``).
    directory: identity public keys by id; None asks every agent (stage
        ``identity``), which trusts the agents' answers: pass a directory
        registered out of band when that trust is not given.
    observer: see ``Observer``.

    Returns (sum of weight * update over the survivors as float32, their
    total weight, report). The report is ``MaskingServer.aggregate``'s
    (``survivors``, ``dropped``, ``silent`` as ids, ``bytes_in``,
    ``bytes_out``, ``sum_seconds``, ``unmask_seconds``, ``clipped``, ...)
    plus ``ids`` ({name: id}), ``survivor_names``, ``stages``,
    ``dropped_at`` ({name: stage}), ``errors`` and ``seconds`` (the whole
    round). Survivors are the hospitals whose masked input is in the sum;
    for distributed-DP accounting, ``len(survivors)`` hospitals' noise
    shares are in it. Raises ``AggregationAborted`` (details include the
    stage record) when the sum cannot be recovered; nothing is returned.
    """
    if config.n != len(agents):
        raise ValueError(
            f"config.n={config.n} but {len(agents)} agents were given; make the "
            "MaskingConfig for all hospitals of the run"
        )
    unknown = set(inputs) - set(agents)
    if unknown:
        raise ValueError(f"inputs for unknown hospitals {sorted(unknown)}")
    started = time.perf_counter()
    ids = {name: i for i, name in enumerate(agents)}
    names = {i: name for name, i in ids.items()}
    stages = _Stages(timeout_s, observer)
    taking_part = [name for name in agents if name in inputs]
    for name in agents:
        if name not in inputs:
            log.info("round %d: %s has no update and sits the round out", round,
                     name)

    try:
        return _masked_stages(
            agents, inputs, config, round, device, directory, stages, ids, names,
            taking_part, started,
        )
    except AggregationAborted as error:
        aborted = _aborted(error, stages)
        log.error("round %d: masked aggregation aborted: %s", round, aborted.reason)
        raise aborted from error


def _masked_stages(
    agents, inputs, config, round, device, directory, stages, ids, names,
    taking_part, started,
) -> tuple[np.ndarray, int, dict]:
    """The stages of ``masked_round``; see there."""
    # Identity keys: from the caller's directory, or asked of the agents.
    if directory is None:
        keys = stages.run(
            "identity",
            {n: agents[n].identity_public.remote() for n in taking_part},
        )
        directory = {ids[n]: bytes(k) for n, k in keys.items()}
    alive = [n for n in taking_part if ids[n] in directory]
    directory = dict(directory)

    begun = stages.run(
        "begin_round",
        {n: agents[n].begin_round.remote(round, config, directory) for n in alive},
    )
    alive = [n for n in alive if n in begun]

    # Stage 1: adverts.
    server = MaskingServer(config, round, directory, device)
    adverts = stages.run(
        "advertise", {n: agents[n].advertise.remote(round) for n in alive}
    )
    stages.record("advertise")["bytes_in"] += sum(a.nbytes() for a in adverts.values())
    accepted = {a.hospital for a in server.receive_adverts(list(adverts.values()))}
    for n in adverts:
        if ids[n] not in accepted:
            stages.drop("advertise", n, "advert rejected by the server")
    alive = [n for n in alive if ids[n] in accepted]

    # Stage 2: each hospital gets its neighbours' adverts, returns shares.
    calls = {}
    for n in alive:
        relay = server.relay_for(ids[n])
        stages.record("share_keys")["bytes_out"] += sum(a.nbytes() for a in relay)
        calls[n] = agents[n].share_keys.remote(round, relay)
    bundles = stages.run("share_keys", calls)
    stages.record("share_keys")["bytes_in"] += sum(
        s.nbytes() for bundle in bundles.values() for s in bundle
    )
    routed = server.route_shares(list(bundles.values()))
    alive = [n for n in alive if n in bundles]

    # Stage 3: masked inputs, added to the running sum as they arrive.
    calls = {}
    for n in alive:
        shares = routed.get(ids[n], [])
        stages.record("masked_input")["bytes_out"] += sum(s.nbytes() for s in shares)
        source, weight = inputs[n]
        calls[n] = agents[n].masked_input.remote(round, source, weight, shares)

    def receive(name: str, masked) -> None:
        if masked.hospital != ids[name]:
            raise ValueError(
                f"{name} sent a masked input for hospital {masked.hospital}"
            )
        server.receive_masked_input(masked)
        stages.record("masked_input")["bytes_in"] += masked.nbytes()

    stages.run("masked_input", calls, receive)
    del calls

    # Stage 4: survivors reveal the shares that remove the masks.
    survivors, dropped = server.unmask_request()
    calls = {
        names[i]: agents[names[i]].unmask_response.remote(
            round, sorted(survivors), sorted(dropped)
        )
        for i in sorted(survivors)
    }

    def reveal(name: str, response) -> None:
        server.receive_unmask(response)
        stages.record("unmask_response")["bytes_in"] += response.nbytes()

    stages.run("unmask_response", calls, reveal)

    total, weight, report = server.aggregate()
    report.pop("quantised_sum", None)
    report.update(stages.report())
    report["ids"] = dict(ids)
    report["survivor_names"] = [names[i] for i in report["survivors"]]
    report["seconds"] = time.perf_counter() - started
    log.info(
        "round %d: masked sum of %d hospitals in %.2f s, dropped %s",
        round, len(report["survivors"]), report["seconds"], stages.dropped or "none",
    )
    return total, weight, report


def ckks_round(
    agents: Mapping[str, ray.actor.ActorHandle],
    key_holder_name: str,
    inputs: Mapping[str, tuple[object, int | None]],
    round: int,
    timeout_s: float | Mapping[str, float],
    *,
    public_context: bytes | None = None,
    observer: Observer | None = None,
) -> tuple[np.ndarray, int, dict]:
    """Runs one CKKS round over hospital agents.

    agents: hospital name -> ``HospitalAgent`` handle.
    key_holder_name: the hospital whose agent was built with
        ``ckks_key_holder=True``; it decrypts the sum and nothing else.
    inputs: as for ``masked_round``.
    timeout_s: seconds per stage, one number or {stage: seconds} over
        ``CKKS_STAGES``.
    public_context: the key holder's public context if already fetched
        (fetch once per run; it is about a megabyte); None asks for it.

    Returns (sum of weight * update as float32, total weight rounded to an
    int, report with ``stages``, ``dropped_at``, ``errors``, ``contributors``
    (names), ``total_weight_decrypted`` (the approximate CKKS value),
    ``ciphertexts_per_hospital`` and ``seconds``). The aggregator here
    refuses a context that holds a secret key.
    Raises ``AggregationAborted`` if the key holder cannot be reached or
    refuses to decrypt, or no ciphertext arrived.
    """
    if key_holder_name not in agents:
        raise ValueError(
            f"key holder {key_holder_name!r} is not among the agents {list(agents)}"
        )
    started = time.perf_counter()
    stages = _Stages(timeout_s, observer)
    holder = agents[key_holder_name]

    try:
        if public_context is None:
            got = stages.run(
                "public_context",
                {key_holder_name: holder.ckks_public_context.remote()},
            )
            if key_holder_name not in got:
                raise AggregationAborted(
                    f"round {round}: CKKS key holder {key_holder_name} did not hand "
                    "out its public context; no hospital can encrypt"
                )
            public_context = got[key_holder_name]
            stages.record("public_context")["bytes_in"] += len(public_context)
        aggregator = CKKSAggregator(public_context, round)
        context_ref = ray.put(public_context)

        # Encrypt at the hospitals, add here as ciphertexts arrive.
        calls = {
            n: agents[n].ckks_encrypt.remote(source, weight, round, context_ref)
            for n, (source, weight) in inputs.items()
        }
        stages.record("encrypt")["bytes_out"] += len(public_context) * len(calls)
        sizes: dict[str, int] = {}

        def add(name: str, encrypted) -> None:
            aggregator.add(encrypted)
            sizes[name] = encrypted.nbytes()

        stages.run("encrypt", calls, add)
        stages.record("encrypt")["bytes_in"] += sum(sizes.values())
        if not sizes:
            raise AggregationAborted(
                f"round {round}: no encrypted update arrived; nothing to sum"
            )
        total = aggregator.total()

        # Only the sum goes to the key holder, which decrypts once per round.
        stages.record("decrypt")["bytes_out"] += total.nbytes()
        got = stages.run(
            "decrypt", {key_holder_name: holder.ckks_decrypt_sum.remote(total)}
        )
        if key_holder_name not in got:
            raise AggregationAborted(
                f"round {round}: key holder {key_holder_name} did not decrypt the "
                f"sum: {stages.errors.get(key_holder_name, 'no answer')}"
            )
    except AggregationAborted as error:
        aborted = _aborted(error, stages)
        log.error("round %d: CKKS aggregation aborted: %s", round, aborted.reason)
        raise aborted from error

    values, weight = got[key_holder_name]
    stages.record("decrypt")["bytes_in"] += int(np.asarray(values).nbytes) + 8
    report = stages.report()
    report.update({
        "round": round,
        "contributors": sorted(sizes),
        "total_weight_decrypted": float(weight),
        "ciphertexts_per_hospital": len(total.chunks),
        "seconds": time.perf_counter() - started,
    })
    log.info("round %d: CKKS sum of %d hospitals in %.2f s, dropped %s", round,
             len(sizes), report["seconds"], stages.dropped or "none")
    return np.asarray(values, dtype=np.float32), _nearest_int(weight), report


def _nearest_int(value: float) -> int:
    """Nearest integer of an approximate CKKS weight sum."""
    return int(np.rint(value))

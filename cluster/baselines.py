"""The two yardsticks a federated model is judged against.

- Centralised: the same model trained on the pooled training patients of all
  hospitals (what a federation approximates without moving data), for as
  many epochs as the federation's rounds times local epochs, with the same
  batch size, learning rate and optimizer. It runs in the driver process.
- Local-only: each hospital trains the same model on its own patients alone
  (``HospitalTrainer.train_local_only``), inside its actor; only weights come
  back.

All models are scored on the same held-out test patients with
``federation.metrics.binary_metrics``.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import ray
import torch

from federation.metrics import binary_metrics
from federation.models import build_model, get_weights
from federation.training import LocalTrainer, predict_proba

log = logging.getLogger(__name__)


def score(config, weights: np.ndarray, X: np.ndarray, y: np.ndarray) -> dict:
    """``binary_metrics`` of the model with ``weights`` on ``(X, y)``."""
    p = predict_proba(config.model, weights, X, hidden=config.hidden)
    return binary_metrics(y, p)


def centralized(config, prepared) -> dict:
    """Trains on the pooled training patients; returns test metrics and weights.

    Returns ``binary_metrics`` on the test patients plus ``epochs``,
    ``seconds`` and ``weights`` (flat float32, for callers that keep it).
    """
    started = time.perf_counter()
    n_features = prepared.X_train.shape[1]
    initial = get_weights(build_model(config.model, n_features, config.hidden,
                                      config.seed))
    trainer = LocalTrainer(
        config.model, prepared.X_train, prepared.y_train,
        batch_size=config.batch_size, lr=config.lr, optimizer=config.optimizer,
        hidden=config.hidden, seed=config.seed,
    )
    epochs = config.rounds * config.local_epochs
    # Small models train several times faster on one thread than on a pool
    # that the Ray processes also compete for; the caller's setting returns.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = (initial + trainer.fit(initial, epochs).delta).astype(np.float32)
    finally:
        torch.set_num_threads(threads)

    result = score(config, weights, prepared.X_test, prepared.y_test)
    result["epochs"] = epochs
    result["seconds"] = time.perf_counter() - started
    result["weights"] = weights
    log.info("centralised baseline: test AUROC %.4f after %d epochs (%.1f s)",
             result["auroc"], epochs, result["seconds"])
    return result


def local_only(config, prepared, hospitals, federated_weights: np.ndarray,
               timeout_s: float) -> tuple[dict, list[dict]]:
    """Trains each hospital alone and scores every model on the test patients.

    hospitals: ``actors.hospital.HospitalGroup`` per hospital.
    federated_weights: the final global model, also scored on each hospital's
        own validation patients for the per-hospital comparison.
    Returns ``({"mean_auroc", "per_hospital": [...]}, failures)``; each
    per-hospital entry holds ``name``, ``size``, ``label_rate``, the
    ``binary_metrics`` of the local-only model on the test patients (flat:
    ``auroc``, ``auprc``, ..., ``calibration``), ``local_val`` (local-only
    model on the hospital's validation patients) and ``federated_local_val``
    (the federated model there). A hospital that fails is left out of the mean
    and listed in ``failures``.
    """
    epochs = config.rounds * config.local_epochs
    calls = [h.trainer.train_local_only.remote(epochs) for h in hospitals]
    info = {h["name"]: h for h in prepared.hospitals}

    per_hospital, failures = [], []
    for group, call in zip(hospitals, calls):
        try:
            weights = ray.get(call, timeout=timeout_s)
            local_val = ray.get(group.trainer.evaluate.remote(weights),
                                timeout=timeout_s)
            fed_val = ray.get(group.trainer.evaluate.remote(federated_weights),
                              timeout=timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            reason = f"local-only baseline failed: {type(exc).__name__}: {exc}"
            reason = reason.splitlines()[0][:300]
            log.warning("%s: %s", group.name, reason)
            failures.append({"round": None, "hospital": group.name,
                             "kind": "baseline", "reason": reason})
            continue
        test = score(config, weights, prepared.X_test, prepared.y_test)
        meta = info.get(group.name, {})
        per_hospital.append({
            "name": group.name,
            "size": meta.get("size"),
            "label_rate": meta.get("label_rate"),
            **test,
            "local_val": _summary(local_val),
            "federated_local_val": _summary(fed_val),
        })

    aurocs = [e["auroc"] for e in per_hospital if math.isfinite(e["auroc"])]
    mean = float(np.mean(aurocs)) if aurocs else math.nan
    log.info("local-only baseline: mean test AUROC %.4f over %d hospital(s)",
             mean, len(aurocs))
    return {"mean_auroc": mean, "epochs": epochs,
            "per_hospital": per_hospital}, failures


def _summary(metrics: dict) -> dict:
    """Drops the reliability curve: per-hospital tables need the scores only."""
    return {k: v for k, v in metrics.items() if k != "calibration"}

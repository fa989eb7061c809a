"""Cost of secure aggregation: plain sum vs SecAgg+ masking vs CKKS.

For n hospitals and d update values it measures, per hospital and at the
coordinator, seconds and bytes of one aggregation round:

- none: the hospital computes weight * update in float32 and sends it; the
  coordinator adds the vectors.
- mask: every stage of ``federation.secagg`` masking, all n hospitals run for
  real in this process; per-hospital figures are the mean over hospitals
  (hospitals run in parallel in a deployment), the coordinator figure is the
  sum of all its stages (verification, routing, summing, unmasking).
- ckks: one hospital encrypts (measured once; every hospital does the same
  work in parallel); the coordinator deserializes and adds n encrypted
  vectors, measured on n copies of that hospital's ciphertexts (addition cost
  does not depend on their content); the key holder's decryption is listed
  separately.

Local training is not part of the per-cell figures (aggregation only). The
end-to-end figure adds it: a full round = one hospital's local training of
an MLP with about 100k weights (``federation.training.LocalTrainer``, one
epoch on a hospital-sized partition of ``--rows`` rows; hospitals train in
parallel, so one training counts once) + the aggregation pipeline above,
plain vs mask, at n = 10. Everything runs in this one process. Usage:

    python benchmarks/secure_agg_cost.py [--quick] [--device cpu|torch-cpu|cuda]
        [--rows 7000]

The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.secagg import (
    MaskingClient,
    MaskingConfig,
    MaskingServer,
    run_masked_round,
)
from federation.secagg.ckks import CKKSAggregator, CKKSClient, CKKSKeyHolder

MAX_WEIGHT = 10_000


class LazyUpdates:
    """Update vectors built on access, so n x d floats never sit in memory."""

    def __init__(self, n: int, d: int, seed: int = 0) -> None:
        self.n, self.d, self.seed = n, d, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed * 100_003 + i)
        return rng.uniform(-0.5, 0.5, self.d).astype(np.float32)


def weights_for(n: int) -> list[int]:
    rng = np.random.default_rng(1)
    return [int(w) for w in rng.integers(100, MAX_WEIGHT, n)]


def plain_cell(n: int, d: int) -> dict:
    """Plain float32 weighted sum."""
    values, weights = LazyUpdates(n, d), weights_for(n)
    hospital, coordinator = [], 0.0
    total = np.zeros(d, dtype=np.float32)
    for i in range(n):
        x = values[i]
        start = time.perf_counter()
        weighted = x * np.float32(weights[i])
        hospital.append(time.perf_counter() - start)

        start = time.perf_counter()
        total += weighted
        coordinator += time.perf_counter() - start
    return {
        "hospital_seconds": statistics.mean(hospital),
        "coordinator_seconds": coordinator,
        "hospital_bytes_out": 4 * d + 8,
        "coordinator_bytes_in": n * (4 * d + 8),
        "basis": "all n measured",
    }


def mask_cell(
    n: int, d: int, device: str, dropped: frozenset[int] = frozenset()
) -> dict:
    """One full masked round with real clients; ``dropped`` vanish before masking."""
    config = MaskingConfig(n=n, clip_range=1.0, max_weight=MAX_WEIGHT)
    identities = [Ed25519PrivateKey.generate() for _ in range(n)]
    directory = {i: key.public_key() for i, key in enumerate(identities)}
    round_number = random.randrange(1, 2**31)
    clients = [
        MaskingClient(i, identities[i], config, round_number, directory=directory)
        for i in range(n)
    ]
    server = MaskingServer(config, round_number, directory, device)
    _, weight, report = run_masked_round(
        clients, LazyUpdates(n, d), weights_for(n), drop_before_masking=dropped,
        server=server,
    )
    assert weight == sum(w for i, w in enumerate(weights_for(n)) if i not in dropped)
    survivors = [i for i in range(n) if i not in dropped]
    return {
        "hospital_seconds": statistics.mean(
            report["client_seconds"][i] for i in survivors
        ),
        "coordinator_seconds": report["server_seconds"],
        "coordinator_unmask_and_sum_seconds": report["sum_seconds"]
        + report["unmask_seconds"],
        "hospital_bytes_out": statistics.mean(
            report["client_bytes_out"][i] for i in survivors
        ),
        "coordinator_bytes_in": report["bytes_in"],
        "coordinator_bytes_out": report["bytes_out"],
        "degree": config.degree,
        "threshold": config.threshold,
        "dropped": len(dropped),
        "basis": "all n measured",
    }


def ckks_cell(n: int, d: int, holder: CKKSKeyHolder, public: bytes) -> dict:
    """CKKS: one hospital encrypts; the coordinator adds n copies."""
    x, w = LazyUpdates(1, d)[0], weights_for(n)[0]
    client = CKKSClient(public)
    start = time.perf_counter()
    update = client.encrypt(x, w, round=n * 10_000_000 + d)
    hospital = time.perf_counter() - start

    coordinator = CKKSAggregator(public, round=update.round)
    start = time.perf_counter()
    for _ in range(n):
        coordinator.add(update)
    encrypted = coordinator.total()
    coordinator_seconds = time.perf_counter() - start

    start = time.perf_counter()
    total, weight = holder.decrypt_sum(encrypted)
    key_holder_seconds = time.perf_counter() - start
    error = np.abs(total - n * w * x.astype(np.float64)).max() / (w * n * 0.5)
    return {
        "hospital_seconds": hospital,
        "coordinator_seconds": coordinator_seconds,
        "key_holder_seconds": key_holder_seconds,
        "hospital_bytes_out": update.nbytes(),
        "coordinator_bytes_in": coordinator.bytes_in,
        "ciphertexts_per_hospital": len(update.chunks),
        "max_relative_error": float(error),
        "basis": "hospital: one measured; coordinator: n copies of its ciphertexts",
    }


E2E_FEATURES = 128
E2E_HIDDEN = 780  # 128 * 780 + 780 + 780 + 1 = 101,401 weights


def training_seconds(rows: int, repeats: int = 3) -> tuple[float, int]:
    """Median seconds of one local epoch of the ~100k-weight MLP; its size.

    Synthetic rows (standard normal features, a logistic label) stand in for
    a hospital's partition: the cost depends on rows and weights only.
    """
    import torch

    from federation.models import build_model, get_weights
    from federation.training import LocalTrainer

    torch.set_num_threads(1)  # a hospital actor trains on one thread
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, E2E_FEATURES)).astype(np.float32)
    y = (rng.random(rows) < 1 / (1 + np.exp(-X[:, 0]))).astype(np.float32)
    weights = get_weights(build_model("mlp", E2E_FEATURES, E2E_HIDDEN, 0))
    trainer = LocalTrainer("mlp", X, y, batch_size=256, lr=0.1,
                           hidden=E2E_HIDDEN, seed=0)
    trainer.fit(weights, 1)  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.fit(weights, 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times), int(weights.size)


def median_round(cell, repeats: int) -> dict:
    """The run whose pipeline time (hospital + coordinator) is the median."""
    runs = sorted(
        (cell() for _ in range(repeats)),
        key=lambda r: r["hospital_seconds"] + r["coordinator_seconds"],
    )
    return runs[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid (about 1 min)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "torch-cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=7000,
                        help="training rows of one hospital for the end-to-end "
                             "round (Diabetes 130 over 10 hospitals: ~5-8k)")
    args = parser.parse_args()
    started = time.perf_counter()

    if args.quick:
        grid = [(10, 10_000), (10, 100_000), (50, 10_000)]
        ckks_grid = {(10, 10_000), (10, 100_000)}
    else:
        grid = [(n, d) for n in (10, 50, 100) for d in (10_000, 100_000, 1_000_000)]
        ckks_grid = set(grid)
    holder = CKKSKeyHolder(min_contributors=1)
    public = holder.public_context()

    rows = []
    for n, d in grid:
        rows.append({"method": "none", "n": n, "d": d, **plain_cell(n, d)})
        rows.append({"method": "mask", "n": n, "d": d, **mask_cell(n, d, args.device)})
        if (n, d) in ckks_grid:
            cell = ckks_cell(n, d, holder, public)
            rows.append({"method": "ckks", "n": n, "d": d, **cell})

    # Headline 1: masking vs plain at n = 10, d = 100k, median of 5 rounds each.
    plain = median_round(lambda: plain_cell(10, 100_000), 5)
    masked = median_round(lambda: mask_cell(10, 100_000, args.device), 5)
    plain_pipeline = plain["hospital_seconds"] + plain["coordinator_seconds"]
    mask_pipeline = masked["hospital_seconds"] + masked["coordinator_seconds"]

    # Headline 1b: a full round, local training included.
    train_s, e2e_d = training_seconds(args.rows)
    e2e_plain = median_round(lambda: plain_cell(10, e2e_d), 5)
    e2e_mask = median_round(lambda: mask_cell(10, e2e_d, args.device), 5)
    full_plain = train_s + e2e_plain["hospital_seconds"] + e2e_plain[
        "coordinator_seconds"]
    full_mask = train_s + e2e_mask["hospital_seconds"] + e2e_mask[
        "coordinator_seconds"]

    # Headline 2: the coordinator's unmask-and-sum for 100 x 1M, without and
    # with 5 hospitals dropping after key sharing.
    big = mask_cell(100, 1_000_000, args.device)
    big_drop = mask_cell(100, 1_000_000, args.device, frozenset(range(0, 100, 20)))

    header = (
        f"{'method':6} {'n':>4} {'d':>9} {'hosp s':>9} {'coord s':>9} "
        f"{'hosp bytes':>12} {'coord bytes in':>15}  basis"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:6} {r['n']:>4} {r['d']:>9} {r['hospital_seconds']:>9.4f} "
            f"{r['coordinator_seconds']:>9.4f} {r['hospital_bytes_out']:>12.0f} "
            f"{r['coordinator_bytes_in']:>15.0f}  {r['basis']}"
        )
    definition = (
        "pipeline time = mean per-hospital seconds (hospitals run in parallel) + "
        "coordinator seconds for one aggregation; plain = weight*update in float32 "
        "and a float32 sum; mask = all SecAgg+ stages on both sides; local training "
        "excluded"
    )
    print()
    print(f"n=10, d=100k: plain {plain_pipeline:.4f} s, mask {mask_pipeline:.4f} s, "
          f"ratio {mask_pipeline / plain_pipeline:.1f}x (goal 1.3x); {definition}")
    e2e_definition = (
        f"full round = one hospital's local training (MLP {E2E_FEATURES}-"
        f"{E2E_HIDDEN}-1, {e2e_d} weights, 1 epoch of {args.rows} rows, batch 256, "
        "1 thread; hospitals train in parallel) + the aggregation pipeline "
        "time above at n=10, d=that model; one process"
    )
    print(f"n=10 full round: training {train_s:.4f} s; plain {full_plain:.4f} s, "
          f"mask {full_mask:.4f} s, ratio {full_mask / full_plain:.2f}x "
          f"(goal 1.3x); {e2e_definition}")
    print(
        f"n=100, d=1M coordinator unmask+sum on {args.device}: "
        f"{big['coordinator_unmask_and_sum_seconds']:.3f} s (goal < 2 s), "
        f"{big_drop['coordinator_unmask_and_sum_seconds']:.3f} s with 5 dropped; "
        f"all coordinator stages {big['coordinator_seconds']:.3f} s"
    )
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")

    print(json.dumps({
        "mode": "quick" if args.quick else "full",
        "device": args.device,
        "cells": rows,
        "ratio_definition": definition,
        "plain_pipeline_seconds_n10_d100k": plain_pipeline,
        "mask_pipeline_seconds_n10_d100k": mask_pipeline,
        "mask_overhead_seconds_n10_d100k": mask_pipeline - plain_pipeline,
        "mask_vs_plain_ratio_n10_d100k": mask_pipeline / plain_pipeline,
        "mask_vs_plain_ratio_goal": 1.3,
        "full_round_definition": e2e_definition,
        "full_round_model_weights": e2e_d,
        "full_round_training_rows": args.rows,
        "full_round_training_seconds": train_s,
        "full_round_plain_seconds_n10": full_plain,
        "full_round_mask_seconds_n10": full_mask,
        "full_round_mask_vs_plain_ratio_n10": full_mask / full_plain,
        "coordinator_unmask_and_sum_seconds_n100_d1M": big[
            "coordinator_unmask_and_sum_seconds"
        ],
        "coordinator_unmask_and_sum_seconds_n100_d1M_5_dropped": big_drop[
            "coordinator_unmask_and_sum_seconds"
        ],
        "coordinator_all_stages_seconds_n100_d1M": big["coordinator_seconds"],
        "hospital_seconds_n100_d1M": big["hospital_seconds"],
        "coordinator_unmask_and_sum_goal_seconds": 2.0,
        "benchmark_seconds": time.perf_counter() - started,
    }))


if __name__ == "__main__":
    main()

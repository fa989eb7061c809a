"""CKKS sums: correct within 1e-3, and the coordinator cannot decrypt."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from federation.secagg.ckks import (
    CKKSAggregator,
    CKKSClient,
    CKKSKeyHolder,
    run_ckks_round,
)


@pytest.fixture(scope="module")
def key_holder() -> CKKSKeyHolder:
    return CKKSKeyHolder(min_contributors=2)


def test_sum_decrypts_to_the_plain_sum_across_chunks(key_holder):
    public = key_holder.public_context()
    rng = np.random.default_rng(0)
    d = 9000  # three ciphertexts of 4096 slots with the weight slot
    values = [rng.normal(0, 0.1, d).astype(np.float32) for _ in range(4)]
    weights = [120, 75, 300, 42]

    coordinator = CKKSAggregator(public, round=1)
    sent = 0
    for v, w in zip(values, weights):
        update = CKKSClient(public).encrypt(v, w, round=1)
        sent += update.nbytes()
        coordinator.add(update)
    encrypted = coordinator.total()
    total, weight = key_holder.decrypt_sum(encrypted)

    plain = sum(w * v.astype(np.float64) for v, w in zip(values, weights))
    assert len(encrypted.chunks) == 3 and encrypted.contributors == 4
    assert np.abs(total - plain).max() <= 1e-3 * np.abs(plain).max()
    assert round(weight) == sum(weights)
    # Ciphertexts are far larger than the plain float32 vector they carry.
    assert coordinator.bytes_in == sent > 10 * 4 * (d + 1) * 4


def test_coordinator_holds_no_secret_key_and_cannot_decrypt(key_holder):
    public = key_holder.public_context()
    context = ts.context_from(public)
    update = CKKSClient(public).encrypt(np.ones(10, np.float32), 5, round=2)

    assert not context.is_private()
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(context, update.chunks[0]).decrypt()


def test_key_holder_decrypts_one_sum_per_round_of_enough_hospitals():
    holder = CKKSKeyHolder(min_contributors=2)
    public = holder.public_context()
    single = CKKSAggregator(public, round=3)
    single.add(CKKSClient(public).encrypt(np.ones(5, np.float32), 1, round=3))
    with pytest.raises(PermissionError, match="fewer than min_contributors 2"):
        holder.decrypt_sum(single.total())

    pair = CKKSAggregator(public, round=4)
    for _ in range(2):
        pair.add(CKKSClient(public).encrypt(np.ones(5, np.float32), 2, round=4))
    total, weight = holder.decrypt_sum(pair.total())
    np.testing.assert_allclose(total, np.full(5, 4.0), rtol=1e-6)
    with pytest.raises(PermissionError, match="already decrypted"):
        holder.decrypt_sum(pair.total())


def test_coordinator_refuses_a_private_context():
    holder = CKKSKeyHolder()
    with pytest.raises(ValueError, match="secret key"):
        CKKSAggregator(holder._context.serialize(save_secret_key=True), round=1)


def test_round_helper_returns_the_weighted_sum_and_bytes():
    holder = CKKSKeyHolder()
    rng = np.random.default_rng(5)
    values = [rng.normal(0, 1, 100).astype(np.float32) for _ in range(3)]

    total, weight, report = run_ckks_round(holder, values, [1, 2, 3], round=9)

    plain = values[0] + 2 * values[1] + 3 * values[2]
    assert np.abs(total - plain).max() <= 1e-3 * np.abs(plain).max()
    assert round(weight) == 6 and total.dtype == np.float32
    assert report["coordinator_bytes_in"] == sum(report["hospital_bytes_out"])

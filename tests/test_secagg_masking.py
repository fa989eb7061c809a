"""SecAgg+ masking: exact recovery, dropouts, uniform-looking inputs, checks."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy import stats

from federation.secagg import (
    AggregationAborted,
    InvalidAdvert,
    InvalidShare,
    MaskingClient,
    MaskingConfig,
    MaskingServer,
    OutOfRange,
    run_masked_round,
)
from federation.secagg.neighbours import neighbourhoods


def make_round(config: MaskingConfig, round_number: int = 1, seed: int = 0):
    """Clients with deterministic identity keys and randomness, for repeatability."""
    source = random.Random(seed)
    identities = [
        Ed25519PrivateKey.from_private_bytes(source.randbytes(32))
        for _ in range(config.n)
    ]
    directory = {i: key.public_key() for i, key in enumerate(identities)}
    clients = [
        MaskingClient(
            i, identities[i], config, round_number,
            random.Random(f"{seed}/{round_number}/{i}").randbytes,
            directory=directory,
        )
        for i in range(config.n)
    ]
    return clients, directory


def updates(n: int, d: int, seed: int = 0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    values = [rng.uniform(-scale, scale, d).astype(np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(1, 5000, n)]
    return values, weights


def quantised_sum(config, values, weights, members):
    """The exact integer sum the protocol must reproduce."""
    total = 0
    for i in members:
        levels, _ = config.quantiser.quantise(values[i])
        total = total + weights[i] * levels
    return total


def test_masked_sum_equals_plain_sum_within_quantisation_error():
    config = MaskingConfig(n=10)
    clients, _ = make_round(config)
    values, weights = updates(10, 2000)

    total, weight, report = run_masked_round(clients, values, weights, device="cpu")

    plain = sum(w * v.astype(np.float64) for v, w in zip(values, weights))
    # Rounding to 2^-16 costs at most half a step per value, times its weight;
    # the float32 result adds one float32 rounding of the sum.
    bound = config.error_bound(sum(weights)) + np.abs(plain).max() * 2.0**-23
    assert weight == sum(weights)
    assert np.abs(total - plain).max() <= bound
    assert total.dtype == np.float32
    assert report["survivors"] == list(range(10)) and report["dropped"] == []
    assert report["bytes_in"] > 10 * 2001 * 8


@pytest.mark.parametrize("dropped", [{3}, {0, 5, 9}])
def test_dropouts_within_threshold_recover_the_survivors_sum_exactly(dropped):
    config = MaskingConfig(n=10, threshold=5)
    clients, directory = make_round(config, seed=3)
    values, weights = updates(10, 500, seed=3)
    server = MaskingServer(config, 1, directory, device="cpu")

    total, weight, report = run_masked_round(
        clients, values, weights, drop_before_masking=dropped, server=server
    )

    survivors = [i for i in range(10) if i not in dropped]
    np.testing.assert_array_equal(
        server.quantised_sum, quantised_sum(config, values, weights, survivors)
    )
    assert weight == sum(weights[i] for i in survivors)
    assert report["dropped"] == sorted(dropped)


def test_hospitals_silent_after_masking_stay_in_the_sum():
    config = MaskingConfig(n=10, threshold=5)
    clients, directory = make_round(config, seed=4)
    values, weights = updates(10, 300, seed=4)
    server = MaskingServer(config, 1, directory, device="cpu")

    _, weight, report = run_masked_round(
        clients, values, weights, drop_before_masking={2}, drop_after_masking={7, 8},
        server=server,
    )

    survivors = [i for i in range(10) if i != 2]
    np.testing.assert_array_equal(
        server.quantised_sum, quantised_sum(config, values, weights, survivors)
    )
    assert weight == sum(weights[i] for i in survivors)
    assert report["silent"] == [7, 8]


def test_hospital_vanishing_before_sharing_keys_is_left_out_exactly():
    config = MaskingConfig(n=10, threshold=5)
    clients, directory = make_round(config, seed=14)
    values, weights = updates(10, 200, seed=14)
    server = MaskingServer(config, 1, directory, device="cpu")

    _, weight, report = run_masked_round(
        clients, values, weights, drop_before_sharing={4}, server=server
    )

    survivors = [i for i in range(10) if i != 4]
    np.testing.assert_array_equal(
        server.quantised_sum, quantised_sum(config, values, weights, survivors)
    )
    assert weight == sum(weights[i] for i in survivors)
    assert report["dropped"] == [] and report["survivors"] == survivors


def test_too_many_dropouts_abort_the_round_with_a_reason():
    config = MaskingConfig(n=10, threshold=5)
    clients, _ = make_round(config, seed=5)
    values, weights = updates(10, 100, seed=5)

    # Silence 4 of hospital 0's 8 neighbours: only 4 can reveal its seed, t = 5.
    neighbours = sorted(neighbourhoods(10, config.degree, config.graph_seed, 1)[0])
    with pytest.raises(AggregationAborted, match="cannot rebuild the seed") as caught:
        run_masked_round(
            clients, values, weights, drop_after_masking=set(neighbours[:4]),
            device="cpu"
        )
    assert caught.value.details["shares_available"][0] == 4
    assert caught.value.details["threshold"] == 5


def test_too_few_survivors_abort_before_any_share_is_revealed():
    config = MaskingConfig(n=6, threshold=3, min_survivors=4)
    clients, _ = make_round(config, seed=6)
    values, weights = updates(6, 50, seed=6)

    with pytest.raises(AggregationAborted, match="only 3 masked inputs"):
        run_masked_round(
            clients, values, weights, drop_before_masking={0, 1, 2}, device="cpu"
        )


def test_masked_inputs_look_uniform_and_change_every_round():
    config = MaskingConfig(n=5, clip_range=1.0)
    d = 20_000
    values = [np.full(d, 0.25, dtype=np.float32) for _ in range(5)]
    seen = []
    for round_number in (1, 2):
        clients, directory = make_round(config, round_number=round_number, seed=7)
        routed = {c.hospital_id: [] for c in clients}
        for c in clients:
            for share in c.share_keys([x.advertise() for x in clients]):
                routed[share.recipient].append(share)
        seen.append(clients[0].masked_input(values[0], 1, routed[0]).data)

    # The top 8 of the 48 bits of every entry, binned: uniform masks leave
    # 256 equally likely bins. The unmasked input (one constant) fails at once.
    top = (seen[0] >> np.uint64(config.modulus_bits - 8)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3
    plain = np.full(d, int(0.25 * 2**16), dtype=np.int64) >> (config.modulus_bits - 8)
    assert stats.chisquare(np.bincount(plain, minlength=256) + 1).pvalue < 1e-9

    assert np.mean(seen[0] == seen[1]) < 1e-3


def test_out_of_range_values_raise_in_error_mode_naming_index_and_value():
    config = MaskingConfig(n=4, clip_range=1.0)
    clients, _ = make_round(config, seed=8)
    values, weights = updates(4, 100, seed=8, scale=0.5)
    values[2] = values[2].copy()
    values[2][17] = 3.5

    with pytest.raises(OutOfRange, match="index 17: 3.5") as caught:
        run_masked_round(clients, values, weights, device="cpu")
    assert (caught.value.index, caught.value.value, caught.value.count) == (17, 3.5, 1)


def test_clip_mode_clips_and_reports_the_count():
    config = MaskingConfig(n=4, clip_range=1.0, clip_mode="clip")
    clients, directory = make_round(config, seed=9)
    values, weights = updates(4, 100, seed=9, scale=0.5)
    values[1] = values[1].copy()
    values[1][[3, 4, 5]] = [2.0, -7.0, 1.5]
    server = MaskingServer(config, 1, directory, device="cpu")

    _, _, report = run_masked_round(clients, values, weights, server=server)

    assert report["clipped"] == {0: 0, 1: 3, 2: 0, 3: 0}
    assert report["clipped_total"] == 3
    clipped = [np.clip(v, -1.0, 1.0) for v in values]
    np.testing.assert_array_equal(
        server.quantised_sum, quantised_sum(config, clipped, weights, range(4))
    )


def test_modulus_too_small_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"modulus 2\^32 overflows: 100 hospitals"):
        MaskingConfig(
            n=100, clip_range=8.0, frac_bits=16, modulus_bits=32, max_weight=1000
        )
    accepted = MaskingConfig(
        n=100, clip_range=8.0, frac_bits=16, modulus_bits=40, max_weight=1000
    )
    assert accepted.modulus_bits == 40


def test_weight_above_the_declared_maximum_is_refused():
    config = MaskingConfig(n=4, max_weight=1000)
    clients, _ = make_round(config)
    values, _ = updates(4, 10)

    with pytest.raises(ValueError, match=r"integer in \[1, 1000\], got 1001"):
        run_masked_round(clients, values, [10, 20, 1001, 30], device="cpu")


def test_forged_advert_is_rejected_by_coordinator_and_hospitals():
    config = MaskingConfig(n=6, threshold=2)
    clients, directory = make_round(config, seed=10)
    values, weights = updates(6, 50, seed=10)
    adverts = [c.advertise() for c in clients]
    forged = dataclasses.replace(
        adverts[4],
        signature=Ed25519PrivateKey.generate().sign(adverts[4].signed_bytes()),
    )

    with pytest.raises(InvalidAdvert, match="hospital 4 .* invalid signature"):
        clients[0].share_keys(adverts[:4] + [forged] + adverts[5:])

    # The coordinator drops the forger; the round completes without hospital 4.
    clients, directory = make_round(config, seed=10)
    server = MaskingServer(config, 1, directory, device="cpu")
    relay = server.receive_adverts(
        [c.advertise() if c.hospital_id != 4 else forged for c in clients]
    )
    assert [a.hospital for a in relay] == [0, 1, 2, 3, 5]
    alive = [c for c in clients if c.hospital_id != 4]
    routed = server.route_shares([c.share_keys(relay) for c in alive])
    for c in alive:
        server.receive_masked_input(
            c.masked_input(
                values[c.hospital_id], weights[c.hospital_id], routed[c.hospital_id]
            )
        )
    survivors, dropped = server.unmask_request()
    for c in alive:
        server.receive_unmask(c.unmask_response(survivors, dropped))
    _, weight, report = server.aggregate()
    assert weight == sum(weights) - weights[4]
    assert "invalid signature" in report["rejected"][4]


def test_tampered_share_is_detected():
    config = MaskingConfig(n=4)
    clients, _ = make_round(config, seed=11)
    adverts = [c.advertise() for c in clients]
    shares = clients[1].share_keys(adverts)
    clients[0].share_keys(adverts)
    to_zero = next(s for s in shares if s.recipient == 0)
    flipped = bytes([to_zero.ciphertext[0] ^ 1]) + to_zero.ciphertext[1:]

    with pytest.raises(InvalidShare, match="failed authentication"):
        clients[0].masked_input(
            np.zeros(4, np.float32),
            1,
            [dataclasses.replace(to_zero, ciphertext=flipped)],
        )


def test_hospital_refuses_to_reveal_both_secrets_or_answer_twice():
    config = MaskingConfig(n=4)
    clients, _ = make_round(config, seed=12)
    adverts = [c.advertise() for c in clients]
    routed = {c.hospital_id: [] for c in clients}
    for c in clients:
        for share in c.share_keys(adverts):
            routed[share.recipient].append(share)
    clients[0].masked_input(np.zeros(8, np.float32), 1, routed[0])

    with pytest.raises(AggregationAborted, match="both survived and dropped"):
        clients[0].unmask_response({0, 1, 2, 3}, {1})
    clients[0].unmask_response({0, 1, 2}, {3})
    with pytest.raises(AggregationAborted, match="already answered"):
        clients[0].unmask_response({0, 1, 2, 3}, set())


def test_each_stage_runs_once_so_masks_and_nonces_are_never_reused():
    config = MaskingConfig(n=4)
    clients, _ = make_round(config, seed=15)
    adverts = [c.advertise() for c in clients]
    routed = {c.hospital_id: [] for c in clients}
    for c in clients:
        for share in c.share_keys(adverts):
            routed[share.recipient].append(share)

    with pytest.raises(AggregationAborted, match="share_keys called when"):
        clients[0].share_keys(adverts)
    clients[0].masked_input(np.zeros(8, np.float32), 1, routed[0])
    with pytest.raises(AggregationAborted, match="masked_input called when"):
        clients[0].masked_input(np.ones(8, np.float32), 1, routed[0])
    with pytest.raises(AggregationAborted, match="unmask_response called when"):
        clients[1].unmask_response({0, 1, 2, 3}, set())


def _sum_on(device: str, seed: int = 13):
    config = MaskingConfig(n=8, threshold=4, modulus_bits=62)
    clients, directory = make_round(config, seed=seed)
    values, weights = updates(8, 3000, seed=seed)
    server = MaskingServer(config, 1, directory, device=device)
    total, weight, _ = run_masked_round(
        clients, values, weights, drop_before_masking={6}, server=server
    )
    return server.quantised_sum, total, weight


def test_torch_arithmetic_matches_numpy_on_cpu():
    numpy_levels, numpy_total, numpy_weight = _sum_on("cpu")
    torch_levels, torch_total, torch_weight = _sum_on("torch-cpu")

    np.testing.assert_array_equal(numpy_levels, torch_levels)
    np.testing.assert_array_equal(numpy_total, torch_total)
    assert numpy_weight == torch_weight


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; none here"
)
def test_cuda_matches_cpu_exactly():
    cpu_levels, cpu_total, cpu_weight = _sum_on("cpu")
    cuda_levels, cuda_total, cuda_weight = _sum_on("cuda")

    np.testing.assert_array_equal(cpu_levels, cuda_levels)
    np.testing.assert_array_equal(cpu_total, cuda_total)
    assert cpu_weight == cuda_weight


def test_masked_input_after_the_unmasking_request_is_refused():
    config = MaskingConfig(n=5, threshold=3)
    clients, directory = make_round(config, seed=16)
    values, _ = updates(5, 20, seed=16)
    server = MaskingServer(config, 1, directory, device="cpu")
    server.receive_adverts([c.advertise() for c in clients])
    routed = server.route_shares(
        [c.share_keys(server.relay_for(c.hospital_id)) for c in clients]
    )
    for c in clients[:4]:
        masked = c.masked_input(values[c.hospital_id], 1, routed[c.hospital_id])
        server.receive_masked_input(masked)
    survivors, dropped = server.unmask_request()

    late = clients[4].masked_input(values[4], 1, routed[4])
    with pytest.raises(ValueError, match="after the unmasking request"):
        server.receive_masked_input(late)
    assert dropped == {4} and survivors == {0, 1, 2, 3}


def test_keys_given_as_raw_bytes_work_like_key_objects():
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    config = MaskingConfig(n=4)
    identities = [Ed25519PrivateKey.generate() for _ in range(4)]
    directory = {
        i: k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        for i, k in enumerate(identities)
    }
    raw = [
        k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        for k in identities
    ]
    clients = [
        MaskingClient(i, raw[i], config, 2, directory=directory) for i in range(4)
    ]
    values, weights = updates(4, 30, seed=17)

    _, weight, _ = run_masked_round(clients, values, weights, device="cpu")

    assert weight == sum(weights)

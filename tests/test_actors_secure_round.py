"""Secure rounds over Ray: masking and CKKS run by hospital agents, dropouts
at each stage, distributed-DP noise, and what the coordinator gets to see."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import tenseal as ts

from actors.hospital_agent import AgentFault, HospitalAgent, NoiseConfig
from actors.secure_round import ckks_round, masked_round
from federation.distributed_dp import clip_l2
from federation.secagg import AggregationAborted, MaskedInput, MaskingConfig

N = 5
D = 1000
NAMES = [f"hospital-{i:02d}" for i in range(N)]
KEY_HOLDER = NAMES[0]
TIMEOUT = 30.0


def make_agents(noise: NoiseConfig | None = None) -> dict:
    agents = {}
    for i, name in enumerate(NAMES):
        agents[name] = HospitalAgent.remote(
            i, name, ckks_key_holder=(name == KEY_HOLDER), noise=noise
        )
    ray.get([a.ping.remote() for a in agents.values()])
    return agents


@pytest.fixture(scope="module")
def agents(ray_local):
    """Five agents shared by the module; a test that kills one replaces it."""
    pool = make_agents()
    yield pool
    for agent in pool.values():
        ray.kill(agent)


@pytest.fixture()
def clear_faults(agents):
    yield
    ray.get([a.inject_fault.remote(None) for a in agents.values()])


def updates(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    values = {n: rng.uniform(-scale, scale, D).astype(np.float32) for n in NAMES}
    weights = {n: int(w) for n, w in zip(NAMES, rng.integers(1, 3000, N))}
    return values, weights


def plain_sum(values, weights, members) -> np.ndarray:
    return sum(weights[n] * values[n].astype(np.float64) for n in members)


def bound(config: MaskingConfig, weights, members, plain) -> float:
    """Half a quantisation step per value times its weight, plus float32."""
    total = sum(weights[n] for n in members)
    return config.error_bound(total) + float(np.abs(plain).max()) * 2.0**-23


def test_masked_sum_over_agents_equals_plain_weighted_sum(agents):
    config = MaskingConfig(n=N)
    values, weights = updates(1)
    # Inputs travel as ObjectRefs resolved inside each agent.
    inputs = {n: (ray.put(values[n]), weights[n]) for n in NAMES}

    total, weight, report = masked_round(agents, inputs, config, 1, TIMEOUT)

    plain = plain_sum(values, weights, NAMES)
    assert weight == sum(weights.values())
    assert np.abs(total - plain).max() <= bound(config, weights, NAMES, plain)
    assert report["survivor_names"] == NAMES
    assert report["dropped_at"] == {} and report["dropped"] == []
    for stage in ("advertise", "share_keys", "masked_input", "unmask_response"):
        assert report["stages"][stage]["bytes_in"] > 0, stage
        assert report["stages"][stage]["seconds"] > 0, stage
        assert report["stages"][stage]["dropped"] == []
    assert report["stages"]["masked_input"]["bytes_in"] >= N * (D + 1) * 8


def test_coordinator_receives_only_masked_values(agents):
    config = MaskingConfig(n=N)
    values, weights = updates(2)
    received = []

    total, _, _ = masked_round(
        agents, {n: (values[n], weights[n]) for n in NAMES}, config, 2, TIMEOUT,
        observer=lambda stage, name, message: received.append((stage, name, message)),
    )

    masked = {name: m for stage, name, m in received if stage == "masked_input"}
    assert set(masked) == set(NAMES)
    for name, message in masked.items():
        assert isinstance(message, MaskedInput)
        levels, _ = config.quantiser.quantise(values[name])
        weighted = (levels * weights[name]).view(np.uint64) & np.uint64(
            config.modulus_mask
        )
        # A uniform residue mod 2^48 matches the plain one by chance ~never.
        assert np.mean(message.data[:-1] == weighted) < 0.01, name
        assert np.mean(np.abs(message.data[:-1].astype(np.float64)) < 2**40) < 0.05
    # No other message carries a vector.
    for stage, name, message in received:
        if stage != "masked_input":
            assert not isinstance(message, np.ndarray), (stage, name)
    assert np.isfinite(total).all()


@ray.remote(num_cpus=0.05)
class StubTrainer:
    """Stands in for the hospital trainer: a fixed delta per (round, hospital)."""

    def fit(self, round, global_weights, epochs=None, config=None):
        from federation.aggregation import Update

        hospital = config["hospital"]
        delta = np.random.default_rng([round, hospital]).uniform(-1, 1, D)
        return Update(f"h{hospital}", round, delta.astype(np.float32),
                      100 + hospital, {"loss": 0.5})


def test_agents_train_and_mask_without_the_update_leaving(agents):
    trainer = StubTrainer.remote()
    ray.get([a.attach_trainer.remote(trainer) for a in agents.values()])
    weights_ref = ray.put(np.zeros(D, dtype=np.float32))
    fits = ray.get([
        agents[n].train.remote(3, [weights_ref], None, {"hospital": i})
        for i, n in enumerate(NAMES)
    ])
    received = []

    total, weight, _ = masked_round(
        agents, {n: (None, None) for n in NAMES}, MaskingConfig(n=N), 3, TIMEOUT,
        observer=lambda stage, name, message: received.append(message),
    )

    deltas = [np.random.default_rng([3, i]).uniform(-1, 1, D).astype(np.float32)
              for i in range(N)]
    plain = sum((100 + i) * deltas[i].astype(np.float64) for i in range(N))
    assert [f["num_samples"] for f in fits] == [100 + i for i in range(N)]
    assert all("delta" not in f for f in fits)
    assert weight == sum(100 + i for i in range(N))
    assert np.abs(total - plain).max() <= weight * 2.0**-17 + 1e-3
    assert not any(isinstance(m, np.ndarray) for m in received)
    ray.kill(trainer)


def test_agent_killed_after_its_masked_input_is_recovered(agents):
    config = MaskingConfig(n=N)
    values, weights = updates(4)
    victim = NAMES[3]

    def kill_after_input(stage, name, message):
        if stage == "masked_input" and name == victim:
            ray.kill(agents[victim])

    try:
        total, weight, report = masked_round(
            agents, {n: (values[n], weights[n]) for n in NAMES}, config, 4,
            TIMEOUT, observer=kill_after_input,
        )
    finally:
        agents[victim] = HospitalAgent.remote(3, victim)

    # Its input arrived, so it is in the sum; its self-mask seed is rebuilt
    # from its neighbours' shares.
    plain = plain_sum(values, weights, NAMES)
    assert weight == sum(weights.values())
    assert np.abs(total - plain).max() <= bound(config, weights, NAMES, plain)
    assert report["dropped_at"] == {victim: "unmask_response"}
    assert report["silent"] == [3]


@pytest.mark.usefixtures("clear_faults")
@pytest.mark.parametrize(
    ("stage", "dropped"),
    [
        # n=5: degree 4, threshold 3. A survivor's self-mask seed is rebuilt
        # from 3 shares held by other survivors, so one hospital may drop.
        ("advertise", [NAMES[1]]),
        ("share_keys", [NAMES[4]]),
        ("masked_input", [NAMES[0]]),
    ],
)
def test_dropouts_within_threshold_give_the_survivors_sum(agents, stage, dropped):
    config = MaskingConfig(n=N)
    values, weights = updates(5)
    for name in dropped:
        agents[name].inject_fault.remote(AgentFault(stage, "raise"))

    total, weight, report = masked_round(
        agents, {n: (values[n], weights[n]) for n in NAMES}, config, 5, TIMEOUT
    )

    members = [n for n in NAMES if n not in dropped]
    plain = plain_sum(values, weights, members)
    assert weight == sum(weights[n] for n in members)
    assert np.abs(total - plain).max() <= bound(config, weights, members, plain)
    assert report["dropped_at"] == {n: stage for n in dropped}
    assert "injected failure" in report["errors"][dropped[0]]


def test_agent_process_exiting_mid_round_is_dropped(agents):
    config = MaskingConfig(n=N)
    values, weights = updates(11)
    victim = NAMES[1]
    agents[victim].inject_fault.remote(AgentFault("share_keys", "exit"))

    try:
        total, _, report = masked_round(
            agents, {n: (values[n], weights[n]) for n in NAMES}, config, 11,
            TIMEOUT,
        )
    finally:
        agents[victim] = HospitalAgent.remote(1, victim)

    members = [n for n in NAMES if n != victim]
    plain = plain_sum(values, weights, members)
    assert report["dropped_at"] == {victim: "share_keys"}
    assert "died" in report["errors"][victim]
    assert np.abs(total - plain).max() <= bound(config, weights, members, plain)


@pytest.mark.usefixtures("clear_faults")
def test_stalled_agent_is_dropped_at_the_stage_time_limit(agents):
    config = MaskingConfig(n=N)
    values, weights = updates(6)
    slow = NAMES[2]
    agents[slow].inject_fault.remote(AgentFault("masked_input", "hang", seconds=4))
    limits = {s: TIMEOUT for s in ("identity", "begin_round", "advertise",
                                   "share_keys", "unmask_response")}
    limits["masked_input"] = 2.0

    total, _, report = masked_round(
        agents, {n: (values[n], weights[n]) for n in NAMES}, config, 6, limits
    )

    members = [n for n in NAMES if n != slow]
    plain = plain_sum(values, weights, members)
    assert report["dropped_at"] == {slow: "masked_input"}
    assert "no answer within 2.0 s" in report["errors"][slow]
    assert np.abs(total - plain).max() <= bound(config, weights, members, plain)
    # Let the stalled call finish before the next test uses this agent.
    ray.get(agents[slow].ping.remote(), timeout=30)


@pytest.mark.usefixtures("clear_faults")
@pytest.mark.parametrize(
    ("dropped", "why"),
    [
        (NAMES[3:], "cannot rebuild the seed of hospitals [0, 1, 2]"),
        (NAMES[2:], "only 2 masked inputs arrived, fewer than min_survivors 3"),
    ],
)
def test_more_dropouts_than_tolerated_abort_with_reason(agents, dropped, why):
    config = MaskingConfig(n=N)
    values, weights = updates(7)
    for name in dropped:
        agents[name].inject_fault.remote(AgentFault("masked_input", "raise"))

    with pytest.raises(AggregationAborted) as caught:
        masked_round(
            agents, {n: (values[n], weights[n]) for n in NAMES}, config, 7, TIMEOUT
        )

    reason = caught.value.reason
    assert why in reason
    for name in dropped:
        assert f"{name} at masked_input" in reason
    assert caught.value.details["dropped_at"] == {n: "masked_input" for n in dropped}


def test_ckks_over_agents_equals_plain_sum_and_coordinator_has_no_secret(agents):
    values, weights = updates(8)
    received = []

    total, weight, report = ckks_round(
        agents, KEY_HOLDER, {n: (values[n], weights[n]) for n in NAMES}, 8, 60.0,
        observer=lambda stage, name, message: received.append((stage, message)),
    )

    plain = plain_sum(values, weights, NAMES)
    assert weight == sum(weights.values())
    assert np.abs(total - plain).max() <= 1e-3 * np.abs(plain).max()
    assert report["contributors"] == sorted(NAMES)
    context = next(m for stage, m in received if stage == "public_context")
    assert not ts.context_from(context).is_private()
    assert report["stages"]["encrypt"]["bytes_in"] > N * D * 8

    # The key holder decrypts one sum per round; other agents hold no key.
    encrypted = next(m for stage, m in received if stage == "encrypt")
    with pytest.raises(PermissionError, match="already decrypted"):
        ray.get(agents[KEY_HOLDER].ckks_decrypt_sum.remote(encrypted))
    with pytest.raises(PermissionError, match="not the CKKS key holder"):
        ray.get(agents[NAMES[1]].ckks_public_context.remote())


@pytest.mark.usefixtures("clear_faults")
def test_ckks_hospital_failing_to_encrypt_is_left_out_of_the_sum(agents):
    values, weights = updates(10)
    agents[NAMES[2]].inject_fault.remote(AgentFault("ckks_encrypt", "raise"))

    total, weight, report = ckks_round(
        agents, KEY_HOLDER, {n: (values[n], weights[n]) for n in NAMES}, 10, 60.0
    )

    members = [n for n in NAMES if n != NAMES[2]]
    plain = plain_sum(values, weights, members)
    assert weight == sum(weights[n] for n in members)
    assert np.abs(total - plain).max() <= 1e-3 * np.abs(plain).max()
    assert report["dropped_at"] == {NAMES[2]: "encrypt"}


@pytest.mark.usefixtures("clear_faults")
def test_ckks_without_the_key_holder_aborts(agents):
    values, weights = updates(9)
    agents[KEY_HOLDER].inject_fault.remote(AgentFault("ckks_decrypt_sum", "raise"))

    with pytest.raises(AggregationAborted, match="did not decrypt the sum"):
        ckks_round(agents, KEY_HOLDER, {n: (values[n], weights[n]) for n in NAMES},
                   9, 60.0)


@pytest.mark.parametrize("kind", ["discrete", "gaussian"])
def test_distributed_noise_matches_the_configured_total_sigma(ray_local, kind):
    sigma_total = 2.0
    # Updates have L2 norm about 18: the bound of 10 clips every one.
    noise = NoiseConfig(kind, sigma_total, n_expected=N, clip_norm=10.0, seed=11)
    noisy = make_agents(noise)
    config = MaskingConfig(n=N)
    rng = np.random.default_rng(12)
    values = {n: rng.uniform(-1, 1, D).astype(np.float32) for n in NAMES}
    weights = {n: int(w) for n, w in zip(NAMES, rng.integers(10, 60, N))}
    # One hospital drops: its noise share leaves with it.
    noisy[NAMES[4]].inject_fault.remote(AgentFault("masked_input", "raise"))

    try:
        total, _, report = masked_round(
            noisy, {n: (values[n], weights[n]) for n in NAMES}, config, 1, TIMEOUT
        )
    finally:
        for agent in noisy.values():
            ray.kill(agent)

    members = NAMES[:4]
    clipped = {n: clip_l2(values[n], 10.0)[0] for n in members}
    deviation = total.astype(np.float64) - plain_sum(clipped, weights, members)
    expected = sigma_total * np.sqrt(len(members) / N)
    assert report["dropped_at"] == {NAMES[4]: "masked_input"}
    # Sample standard deviation of 1000 draws is within 10% with margin.
    assert 0.9 * expected <= deviation.std() <= 1.1 * expected
    assert abs(deviation.mean()) <= 4 * expected / np.sqrt(D)

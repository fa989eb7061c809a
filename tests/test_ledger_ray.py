"""The ledger as Ray actors: failover under load, idempotent retries, a torn
Raft log tail repaired on restart, a lost block file tail re-applied from the
Raft log, and rejections recorded end to end."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pytest
import ray

from actors.ledger_replica import NotLeader, ReplicaConfig
from cluster.cli import main as medfed
from cluster.ledger_service import start_ledger
from ledger import entries as E
from ledger.chain import BLOCKS_FILE
from ledger.recordlog import HEADER_SIZE, RecordLog

pytestmark = pytest.mark.timeout(120)

ZERO = "00" * 32


def h(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


@pytest.fixture
def service(ray_local, tmp_path):
    svc = start_ledger(tmp_path / "ledger", replicas=3, hospitals=3)
    yield svc
    svc.stop()


def finish_round_zero(svc) -> str:
    """Open round 0, accept one update and its global model; returns the model."""
    coordinator, hospital = svc.signer("coordinator"), svc.signer("hospital-00")
    result = svc.client.submit([
        E.round_open(coordinator, round=0, base_model_hash=ZERO, timestamp=1.0),
        E.model_update(hospital, round=0, base_model_hash=ZERO,
                       update_hash=h("u0"), num_samples=10, timestamp=2.0),
        E.global_model(coordinator, round=0, model_hash=h("m0"),
                       update_hashes=[h("u0")], timestamp=3.0),
    ])
    assert [o["accepted"] for o in result["outcomes"]] == [True, True, True]
    return h("m0")


def audit(svc, tag: str) -> bytes:
    """An entry the rules accept any number of times (a prediction audit)."""
    return E.prediction_audit(svc.signer("server"), root=h(tag), count=1,
                              model_hash=h("m0"), timestamp=4.0)


def wait_converged(svc, timeout_s: float = 20.0) -> list[dict]:
    """Poll until every replica answers with the same head; returns the heads."""
    deadline = time.monotonic() + timeout_s
    heads: list = []
    while time.monotonic() < deadline:
        heads = svc.client.heads(timeout_s=2.0)
        if all(heads) and len({(x["hash"], x["state_hash"]) for x in heads}) == 1:
            return heads
        time.sleep(0.1)
    raise AssertionError(f"replicas did not converge: {heads}")


def chain_ids(svc, index: int) -> set[str]:
    rows = ray.get(svc.replicas[index].query.remote(), timeout=10)
    return {row["entry_id"] for row in rows}


def test_leader_killed_under_load_loses_no_acknowledged_entry(service):
    svc = service
    finish_round_zero(svc)
    acked: list[tuple[float, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        k = 0
        while not stop.is_set():
            try:
                result = svc.client.submit([audit(svc, f"load-{k}")], timeout_s=10)
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)
                return
            acked.append((time.monotonic(), result["outcomes"][0]["entry_id"]))
            k += 1

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(0.5)
    old = svc.client.wait_for_leader()
    before = ray.get(svc.replicas[old].status.remote())
    killed_at = time.monotonic()
    svc.kill_replica(old, restart=True)
    time.sleep(2.0)
    stop.set()
    worker.join(timeout=30)

    assert not errors, errors
    after = [t for t, _ in acked if t > killed_at]
    assert after, "no entry was acknowledged after the leader was killed"
    assert after[0] - killed_at < 2.0, f"first commit {after[0] - killed_at:.2f} s"
    assert len(acked) > 20

    # The killed replica came back from its own disk and caught up.
    heads = wait_converged(svc)
    status = ray.get(svc.replicas[old].status.remote())
    assert status["started_at"] > before["started_at"]
    assert status["term"] > before["term"] or status["role"] != "leader"
    ids = {entry_id for _, entry_id in acked}
    for index in range(3):
        assert ids <= chain_ids(svc, index), f"replica {index} lost entries"
    assert heads[0]["height"] >= 2


def test_retried_submit_with_same_key_is_applied_once(service):
    svc = service
    finish_round_zero(svc)
    entry = audit(svc, "once")
    first = svc.client.submit([entry], key="audit-once")
    again = svc.client.submit([entry], key="audit-once")
    assert again == first

    # Two racing calls with one key on the leader, and a follower asked
    # after the fact, all give the original result.
    leader = svc.client.wait_for_leader()
    racing = audit(svc, "race")
    refs = [svc.replicas[leader].submit.remote([racing], "race-key") for _ in range(2)]
    raced = ray.get(refs, timeout=10)
    assert raced[0] == raced[1]
    wait_converged(svc)
    follower = (leader + 1) % 3
    assert ray.get(svc.replicas[follower].submit.remote([entry], "audit-once")) == first

    # Each entry is on every chain exactly once.
    for index in range(3):
        rows = ray.get(svc.replicas[index].query.remote(type=E.PREDICTION_AUDIT))
        ids = [row["entry_id"] for row in rows]
        assert ids.count(first["outcomes"][0]["entry_id"]) == 1
        assert ids.count(raced[0]["outcomes"][0]["entry_id"]) == 1

    # The same bytes under a new key reach the rules, which reject the replay.
    replay = svc.client.submit([entry], key="other-key")
    assert not replay["outcomes"][0]["accepted"]
    assert "replay" in replay["outcomes"][0]["reason"]

    # A follower refuses new work and names the leader.
    with pytest.raises(NotLeader) as info:
        ray.get(svc.replicas[follower].submit.remote([audit(svc, "x")], "new-key"))
    assert info.value.leader_hint == leader


def test_concurrent_submissions_share_blocks(service):
    svc = service
    finish_round_zero(svc)
    entries = [audit(svc, f"burst-{k}") for k in range(40)]

    async def burst() -> list[dict]:
        return await asyncio.gather(*(svc.client.submit_async([e]) for e in entries))

    results = asyncio.run(burst())
    assert all(r["outcomes"][0]["accepted"] for r in results)
    assert [r["outcomes"][0]["entry_id"] for r in results] == [
        E.entry_id(e) for e in entries
    ]
    # Group commit: forty submissions went into fewer blocks.
    assert len({r["block_height"] for r in results}) < len(entries)
    wait_converged(svc)
    ids = [row["entry_id"] for row in ray.get(svc.replicas[0].query.remote())]
    assert all(ids.count(E.entry_id(e)) == 1 for e in entries)


def test_torn_raft_log_tail_is_repaired_and_caught_up(service):
    svc = service
    finish_round_zero(svc)
    leader = svc.client.wait_for_leader()
    victim = (leader + 1) % 3
    for k in range(5):
        svc.client.submit([audit(svc, f"before-{k}")])
    wait_converged(svc)

    svc.kill_replica(victim, restart=False)
    acked = [svc.client.submit([audit(svc, f"down-{k}")]) for k in range(5)]
    log_file = svc.replica_dir(victim) / "raft" / "log.dat"
    with RecordLog(log_file, repair=False) as records:
        last = records.offsets[-1]
    data = log_file.read_bytes()
    cut = last + HEADER_SIZE + 5
    assert cut < len(data)
    log_file.write_bytes(data[:cut])  # the last record ends mid-payload

    svc.start_replica(victim)
    svc.client.submit([audit(svc, "after")])
    wait_converged(svc)
    status = ray.get(svc.replicas[victim].status.remote())
    assert status["repaired"] and "dropped" in status["repaired"]
    ids = chain_ids(svc, victim)
    for result in acked:
        assert result["outcomes"][0]["entry_id"] in ids


def test_block_file_tail_lost_is_reapplied_from_raft_log(service):
    svc = service
    finish_round_zero(svc)
    leader = svc.client.wait_for_leader()
    victim = (leader + 1) % 3
    acked = [svc.client.submit([audit(svc, f"b{k}")]) for k in range(6)]
    heads = wait_converged(svc)

    # Blocks are not fsynced: a machine crash may cut the block file's tail
    # while the (fsynced) Raft log keeps the entries. Cut the last three
    # blocks, the last one mid-record.
    svc.kill_replica(victim, restart=False)
    blocks_file = svc.replica_dir(victim) / BLOCKS_FILE
    with RecordLog(blocks_file, repair=False) as records:
        cut = records.offsets[-3] + HEADER_SIZE + 7
    data = blocks_file.read_bytes()
    assert cut < len(data)
    blocks_file.write_bytes(data[:cut])

    svc.start_replica(victim)
    after = wait_converged(svc)
    assert after[victim]["hash"] == heads[leader]["hash"]
    assert after[victim]["height"] == heads[leader]["height"]
    ids = chain_ids(svc, victim)
    for result in acked:
        assert result["outcomes"][0]["entry_id"] in ids
    with RecordLog(blocks_file, repair=False) as records:
        assert len(records) == heads[leader]["height"]
    svc.client.submit([audit(svc, "after")])
    assert len({x["hash"] for x in wait_converged(svc)}) == 1


def test_rejections_recorded_and_chain_verified(service, tmp_path, capsys):
    svc = service
    model0 = finish_round_zero(svc)
    coordinator = svc.signer("coordinator")
    h1, h2 = svc.signer("hospital-01"), svc.signer("hospital-02")
    svc.client.submit([E.round_open(coordinator, round=1, base_model_hash=model0,
                                    timestamp=5.0)])

    update = E.model_update(h1, round=1, base_model_hash=model0,
                            update_hash=h("u1"), num_samples=10, timestamp=6.0)
    assert svc.client.submit([update])["outcomes"][0]["accepted"]
    replayed = svc.client.submit([update], key="replayed")["outcomes"][0]

    honest = E.model_update(h2, round=1, base_model_hash=model0,
                            update_hash=h("u2"), num_samples=10, timestamp=7.0)
    forged_bytes = honest.replace(b'"num_samples":10', b'"num_samples":99')
    forged = svc.client.submit([forged_bytes])["outcomes"][0]

    stale_bytes = E.model_update(h2, round=1, base_model_hash=ZERO,
                                 update_hash=h("u3"), num_samples=10, timestamp=8.0)
    stale = svc.client.submit([stale_bytes])["outcomes"][0]

    assert not replayed["accepted"] and "replay" in replayed["reason"]
    assert not forged["accepted"] and "bad signature" in forged["reason"]
    assert not stale["accepted"] and "stale" in stale["reason"]
    wait_converged(svc)
    for index in range(3):
        rows = ray.get(svc.replicas[index].query.remote(accepted=False))
        reasons = {row["entry_id"]: row["reason"] for row in rows}
        for outcome in (replayed, forged, stale):
            assert reasons[outcome["entry_id"]] == outcome["reason"]

    svc.stop()
    replica = svc.replica_dir(0)
    capsys.readouterr()
    assert medfed(["ledger", "verify", "--dir", str(replica)]) == 0
    assert "ok" in capsys.readouterr().out
    assert medfed(["ledger", "verify", "--dir", str(svc.dir)]) == 0
    assert "3 replicas agree" in capsys.readouterr().out

    path = replica / BLOCKS_FILE
    with RecordLog(path, repair=False) as records:
        second = records.offsets[1]
    data = bytearray(path.read_bytes())
    data[second + HEADER_SIZE + 40] ^= 0x04
    path.write_bytes(bytes(data))
    assert medfed(["ledger", "verify", "--dir", str(replica)]) == 1
    assert "FAILED at block 2" in capsys.readouterr().out


def test_keys_survive_restart_and_snapshot_catch_up(ray_local, tmp_path):
    config = ReplicaConfig(compact_every=4)
    svc = start_ledger(tmp_path / "ledger", replicas=3, hospitals=3, config=config)
    try:
        finish_round_zero(svc)
        early = {f"early-{k}": svc.client.submit([audit(svc, f"e{k}")],
                                                 key=f"early-{k}") for k in range(3)}
        leader = svc.client.wait_for_leader()
        lagging = (leader + 1) % 3
        wait_converged(svc)

        # While one replica is down the others compact past what it holds, so
        # it can only catch up through a snapshot carrying the key table.
        svc.kill_replica(lagging, restart=False)
        late = {f"late-{k}": svc.client.submit([audit(svc, f"l{k}")],
                                               key=f"late-{k}") for k in range(12)}
        first = ray.get(svc.replicas[leader].committed_log.remote(1))
        assert first["snapshot"] is not None, "the leader never compacted"
        svc.start_replica(lagging)
        svc.client.submit([audit(svc, "after")], key="after")
        wait_converged(svc)
        assert (svc.replica_dir(lagging) / "raft" / "snapshot.dat").exists()
        # Restored from the leader's snapshot: blocks before it were not copied.
        early_id = early["early-0"]["outcomes"][0]["entry_id"]
        assert early_id not in chain_ids(svc, lagging)
        assert early_id in chain_ids(svc, leader)

        # Every replica, the restarted one included, answers old keys with
        # the original results instead of applying them again.
        svc.kill_replica(leader, restart=True)
        svc.client.wait_for_leader()
        wait_converged(svc)
        for key, result in {**early, **late}.items():
            for index in (lagging, leader):
                answer = ray.get(svc.replicas[index].submit.remote([b"x"], key))
                assert answer == result, (index, key)
        height = svc.client.head()["height"]
        assert svc.client.submit([audit(svc, "e0")], key="early-0") == early["early-0"]
        assert svc.client.head()["height"] == height
    finally:
        svc.stop()


def test_named_hospitals_get_keys_and_a_genesis(tmp_path):
    from cluster.ledger_service import _ensure_genesis
    from ledger.genesis import load_consortium

    genesis = _ensure_genesis(tmp_path, 3, ["st-marys", "general"], "trial")
    consortium = load_consortium(tmp_path)
    assert consortium.hospitals == ["st-marys", "general"]
    assert set(consortium.signers) >= {"st-marys", "general", "coordinator"}
    assert genesis.voters == ["replica-0", "replica-1", "replica-2"]
    # An existing genesis is reused, never replaced; a size mismatch is refused.
    assert _ensure_genesis(tmp_path, 3, 5, "other").hash() == genesis.hash()
    with pytest.raises(ValueError, match="names 3 replicas"):
        _ensure_genesis(tmp_path, 5, 5, "trial")

"""Blocks, chain verification, Merkle proofs, replica determinism and the CLI."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from cluster.cli import main as medfed
from ledger import entries as E
from ledger import merkle
from ledger.chain import BLOCKS_FILE, read_blocks, verify, verify_proof
from ledger.genesis import load_consortium, make_consortium
from ledger.recordlog import HEADER_SIZE, RecordLog, encode_record
from ledger.store import DivergedError, Ledger


def h(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    return make_consortium(tmp_path_factory.mktemp("consortium"), hospitals=4)


def make_batches(s, rounds: int = 3, seed: int = 0) -> list[list[bytes]]:
    """A run of ``rounds`` rounds with some bad entries mixed in, as Raft batches."""
    rng = random.Random(seed)
    t = 1_700_000_000.0
    batches = []
    base = "00" * 32
    hospitals = sorted(k for k in s if k.startswith("hospital"))
    for r in range(rounds):
        t += 10
        batch = [E.round_open(s["coordinator"], round=r, base_model_hash=base,
                              timestamp=t, nonce=f"open-{r}")]
        updates = []
        for i, name in enumerate(hospitals):
            tag = f"{name}-{r}"
            raw = E.model_update(s[name], round=r, base_model_hash=base,
                                 update_hash=h(tag), num_samples=100 + i,
                                 timestamp=t + i, nonce=f"{tag}-n")
            batch.append(raw)
            updates.append(h(tag))
            if rng.random() < 0.5:
                batch.append(raw)  # a replay
        batches.append(batch)
        model = h(f"model-{r}")
        batches.append([
            E.global_model(s["coordinator"], round=r, model_hash=model,
                           update_hashes=updates, timestamp=t + 9, nonce=f"gm-{r}"),
            E.prediction_audit(s["server"], root=h(f"p{r}"), count=10,
                               model_hash=model, timestamp=t + 9, nonce=f"pa-{r}"),
        ])
        base = model
    return batches


def build(directory, genesis, batches) -> Ledger:
    led = Ledger(directory, genesis)
    for raft_index, batch in enumerate(batches, start=1):
        led.apply_raft_entry(raft_index, E.encode_batch(batch))
    return led


def write_ledger(directory, consortium, batches) -> None:
    """A ledger folder as a run leaves it: genesis.json and every replica named."""
    (directory / "genesis.json").write_text(
        (consortium.dir / "genesis.json").read_text())
    for name in consortium.genesis.voters:
        build(directory / name, consortium.genesis, batches).close()


def test_replicas_applying_same_batches_build_identical_chains(tmp_path, consortium):
    batches = make_batches(consortium.signers)
    a = build(tmp_path / "a", consortium.genesis, batches)
    b = build(tmp_path / "b", consortium.genesis, batches)
    hashes_a = [blk.hash for blk in a.blocks()]
    assert hashes_a == [blk.hash for blk in b.blocks()]
    assert len(hashes_a) == len(batches)
    assert a.state.state_hash() == b.state.state_hash()
    assert (tmp_path / "a" / BLOCKS_FILE).read_bytes() == \
        (tmp_path / "b" / BLOCKS_FILE).read_bytes()
    assert a.records(accepted=False), "the replays must show up as rejections"

    # A different order of the same entries gives a different chain.
    c = build(tmp_path / "c", consortium.genesis, [batches[0][::-1], *batches[1:]])
    assert [blk.hash for blk in c.blocks()][0] != hashes_a[0]


def test_reopen_rebuilds_state_and_ignores_redelivered_entries(tmp_path, consortium):
    batches = make_batches(consortium.signers)
    led = build(tmp_path / "r", consortium.genesis, batches)
    state_hash, head = led.state.state_hash(), led.head_hash
    led.close()

    led = Ledger(tmp_path / "r", consortium.genesis)
    assert (led.state.state_hash(), led.head_hash) == (state_hash, head)
    assert led.applied_raft_index == len(batches)
    assert led.apply_raft_entry(2, E.encode_batch(batches[1])) is None
    assert led.head_hash == head
    assert led.apply_raft_entry(len(batches) + 1, b"") is None  # a leader's no-op
    assert led.height == len(batches)


def test_flipped_byte_in_a_block_is_named_by_verify(tmp_path, consortium):
    build(tmp_path / "r", consortium.genesis, make_batches(consortium.signers)).close()
    path = tmp_path / "r" / BLOCKS_FILE
    assert verify(path, consortium.genesis.hash()).ok
    with RecordLog(path) as records:
        third = records.offsets[2]
    data = bytearray(path.read_bytes())
    data[third + HEADER_SIZE + 40] ^= 0x04
    path.write_bytes(bytes(data))

    result = verify(path, consortium.genesis.hash())
    assert not result.ok and result.first_bad_height == 3 and result.blocks == 2
    assert "damaged" in result.reason


def _rewrite_block(path, height, change) -> None:
    """Edit block ``height`` and re-checksum its record, as a forger would."""
    with RecordLog(path) as records:
        payloads = list(records)
    raw = json.loads(payloads[height - 1])
    change(raw)
    payloads[height - 1] = E.canonical(raw)
    path.write_bytes(b"".join(encode_record(p) for p in payloads))


@pytest.mark.parametrize("height,change,expect", [
    (2, lambda b: b["entries"][1].update(accepted=not b["entries"][1]["accepted"]),
     "merkle root"),
    (4, lambda b: b["header"].update(raft_index=99), "block hash"),
    (3, lambda b: b["header"].update(prev_hash="ab" * 32), "prev_hash"),
])
def test_forged_block_with_valid_checksum_is_named(tmp_path, consortium, height,
                                                   change, expect):
    build(tmp_path / "r", consortium.genesis, make_batches(consortium.signers)).close()
    path = tmp_path / "r" / BLOCKS_FILE
    _rewrite_block(path, height, change)
    result = verify(path, consortium.genesis.hash())
    assert (result.ok, result.first_bad_height) == (False, height)
    assert expect in result.reason


def test_chain_of_another_genesis_fails_at_block_one(tmp_path, consortium):
    build(tmp_path / "r", consortium.genesis, make_batches(consortium.signers)).close()
    result = verify(tmp_path / "r", "ff" * 32)
    assert (result.ok, result.first_bad_height) == (False, 1)


def _reforge(path, genesis_hash, height, change_entries) -> None:
    """Change block ``height``'s entries and redo every hash after it."""
    from ledger.chain import Block

    blocks, _ = read_blocks(path)
    forged, prev = [], genesis_hash
    for block in blocks:
        entries = list(block.entries)
        if block.height == height:
            entries = change_entries(entries)
        rebuilt = Block.build(block.height, prev, block.raft_index, entries)
        forged.append(rebuilt.to_bytes())
        prev = rebuilt.hash
    path.write_bytes(b"".join(encode_record(p) for p in forged))


def test_forged_verdict_is_divergence_at_reopen(tmp_path, consortium):
    from ledger.chain import BlockEntry

    build(tmp_path / "r", consortium.genesis, make_batches(consortium.signers)).close()
    _reforge(tmp_path / "r" / BLOCKS_FILE, consortium.genesis.hash(), 1,
             lambda es: [BlockEntry(es[0].raw, False, "made up"), *es[1:]])
    with pytest.raises(DivergedError, match="block 1 entry 0"):
        Ledger(tmp_path / "r", consortium.genesis)


def test_merkle_proofs_verify_and_fail_when_tampered(tmp_path, consortium):
    led = build(tmp_path / "r", consortium.genesis, make_batches(consortium.signers))
    block = next(led.blocks())
    assert len(block.entries) >= 5
    for entry in block.entries:
        proof = led.prove(entry.id)
        assert verify_proof(proof, block.merkle_root)
        assert verify_proof(proof, block.hash)
    proof = led.prove(block.entries[3].id)

    def tampered(**changes):
        bad = json.loads(json.dumps(proof))
        for key, value in changes.items():
            if key == "accepted":
                bad["leaf"]["accepted"] = value
            else:
                bad[key] = value
        return bad

    assert not verify_proof(proof, "00" * 32)
    assert not verify_proof(tampered(accepted=not proof["leaf"]["accepted"]),
                            block.merkle_root)
    assert not verify_proof(tampered(leaf_index=proof["leaf_index"] ^ 1),
                            block.merkle_root)
    assert not verify_proof(tampered(path=proof["path"][::-1]), block.merkle_root)
    assert not verify_proof(tampered(entry=block.entries[2].raw.hex()),
                            block.merkle_root)
    with pytest.raises(ValueError, match="lacks fields"):
        verify_proof({"entry_id": "x"})
    with pytest.raises(ValueError, match="is not in the ledger"):
        led.prove("deadbeefdeadbeef")


def test_merkle_matches_rfc6962_shape():
    # Three leaves: root = node(node(leaf0, leaf1), leaf2), per RFC 6962 section 2.1.
    leaves = [b"a", b"b", b"c"]
    expected = merkle.node_hash(
        merkle.node_hash(merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")),
        merkle.leaf_hash(b"c"),
    )
    assert merkle.root(leaves) == expected
    assert merkle.root([]) == hashlib.sha256(b"").digest()
    for n in (1, 2, 5, 8, 13):
        data = [bytes([i]) for i in range(n)]
        r = merkle.root(data)
        for i in range(n):
            path = merkle.inclusion_path(i, data)
            assert merkle.verify_inclusion(data[i], i, n, path, r)


def test_snapshot_restore_continues_the_same_chain(tmp_path, consortium):
    batches = make_batches(consortium.signers, rounds=4)
    full = build(tmp_path / "full", consortium.genesis, batches)
    partial = build(tmp_path / "old", consortium.genesis, batches[:3])

    fresh = Ledger(tmp_path / "fresh", consortium.genesis)
    fresh.restore(partial.snapshot())
    for raft_index in range(4, len(batches) + 1):
        fresh.apply_raft_entry(raft_index, E.encode_batch(batches[raft_index - 1]))
    assert fresh.head_hash == full.head_hash
    assert fresh.state.state_hash() == full.state.state_hash()
    fresh.close()

    reopened = Ledger(tmp_path / "fresh", consortium.genesis)
    assert reopened.head_hash == full.head_hash
    result = verify(tmp_path / "fresh")
    assert result.ok and result.blocks == len(batches) - 3


def test_consortium_keys_reload_and_private_keys_are_0600(consortium):
    again = load_consortium(consortium.dir)
    assert again.genesis == consortium.genesis
    assert set(again.signers) == {m.id for m in consortium.genesis.members}
    key_file = consortium.dir / "keys" / "hospital-00.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert again.signers["admin"].public_key == consortium.signers["admin"].public_key


def test_cli_verify_show_prove(tmp_path, consortium, capsys):
    batches = make_batches(consortium.signers)
    write_ledger(tmp_path, consortium, batches)

    assert medfed(["ledger", "verify", "--dir", str(tmp_path)]) == 0
    assert "3 replicas agree" in capsys.readouterr().out

    out = tmp_path / "rejected.jsonl"
    assert medfed(["ledger", "show", "--dir", str(tmp_path), "--round", "1",
                   "--member", "hospital-02", "--jsonl", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["body"]["round"] == 1 for r in rows)
    assert all("hospital-02" in (r["signer"], r["body"].get("hospital")) for r in rows)

    target = rows[0]["entry_id"]
    proof_file = tmp_path / "proof.json"
    assert medfed(["ledger", "prove", "--dir", str(tmp_path), target[:12],
                   "--out", str(proof_file)]) == 0
    block = [b for b in read_blocks(tmp_path / "replica-0")[0]
             if b.height == rows[0]["height"]][0]
    assert medfed(["ledger", "verify-proof", str(proof_file), "--root",
                   block.merkle_root]) == 0
    assert medfed(["ledger", "verify-proof", str(proof_file), "--root", "00" * 32]) == 1

    # One replica diverging (a forged but self-consistent block) is caught.
    _rewrite_block(tmp_path / "replica-1" / BLOCKS_FILE, 2,
                   lambda b: b["header"].update(raft_index=77))
    capsys.readouterr()
    assert medfed(["ledger", "verify", "--dir", str(tmp_path)]) == 1
    assert "replica-1: FAILED at block 2" in capsys.readouterr().out


def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert medfed(["ledger", "verify", "--dir", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert medfed(["ledger", "verify-proof", str(tmp_path / "bad.json")]) == 2
    (tmp_path / "partial.json").write_text('{"entry_id": "ab"}')
    assert medfed(["ledger", "verify-proof", str(tmp_path / "partial.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "lacks fields" in err[1]


def test_forged_verdict_with_every_hash_redone_is_caught_by_rejudging(tmp_path,
                                                                      consortium):
    from ledger.chain import BlockEntry
    from ledger.store import verify_replica

    build(tmp_path / "r", consortium.genesis, make_batches(consortium.signers)).close()
    path = tmp_path / "r" / BLOCKS_FILE
    blocks, _ = read_blocks(path)
    target = next(b.height for b in blocks if not all(e.accepted for e in b.entries))
    _reforge(path, consortium.genesis.hash(), target,
             lambda es: [BlockEntry(e.raw, True, None) for e in es])

    assert verify(path, consortium.genesis.hash()).ok, "hashes alone cannot tell"
    result = verify_replica(tmp_path / "r", consortium.genesis)
    assert (result.ok, result.first_bad_height) == (False, target)
    assert "but the rules give rejected (replay" in result.reason


def test_ledger_refuses_a_chain_of_another_genesis(tmp_path, consortium):
    build(tmp_path / "r", consortium.genesis, make_batches(consortium.signers)).close()
    other = make_consortium(tmp_path / "other", hospitals=1)
    with pytest.raises(DivergedError, match="block 1: prev_hash"):
        Ledger(tmp_path / "r", other.genesis)
    with pytest.raises(ValueError, match="already exists"):
        make_consortium(tmp_path / "other", hospitals=1)


def _proof_setup(tmp_path, consortium, capsys):
    """Two replicas of one ledger, a proof file of an entry in block 2, the block."""
    write_ledger(tmp_path, consortium, make_batches(consortium.signers))
    block = read_blocks(tmp_path / "replica-0")[0][1]
    proof_file = tmp_path / "proof.json"
    assert medfed(["ledger", "prove", "--dir", str(tmp_path), block.entries[1].id,
                   "--out", str(proof_file)]) == 0
    return proof_file, block, capsys.readouterr().out


def test_cli_prove_prints_full_hashes_and_how_to_check(tmp_path, consortium, capsys):
    proof_file, block, out = _proof_setup(tmp_path, consortium, capsys)

    assert block.entries[1].id in out
    assert f"block height {block.height}" in out
    assert f"block hash   {block.hash}" in out
    assert f"Merkle root  {block.merkle_root}" in out
    assert f"medfed ledger verify-proof {proof_file} --dir {tmp_path}" in out
    assert f"--root {block.hash}" in out


def test_cli_verify_proof_against_the_verified_chain(tmp_path, consortium, capsys):
    proof_file, block, _ = _proof_setup(tmp_path, consortium, capsys)

    assert medfed(["ledger", "verify-proof", str(proof_file),
                   "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 replicas agree" in out and "proof ok" in out
    assert f"the verified chain in {tmp_path}" in out and block.hash in out

    # A self-consistent proof from another chain passes alone, not against --dir.
    other = tmp_path / "other"
    led = build(other / "replica-0", consortium.genesis,
                make_batches(consortium.signers, seed=7)[1:])
    foreign = led.prove(next(led.blocks()).entries[0].id)
    led.close()
    foreign_file = tmp_path / "foreign.json"
    foreign_file.write_text(json.dumps(foreign))
    assert medfed(["ledger", "verify-proof", str(foreign_file)]) == 0
    assert "self-consistent, not that the entry is in your ledger" in (
        capsys.readouterr().out)
    assert medfed(["ledger", "verify-proof", str(foreign_file),
                   "--dir", str(tmp_path / "replica-0")]) == 1
    out = capsys.readouterr().out
    assert "proof FAILED" in out
    ours = read_blocks(tmp_path / "replica-0")[0][0].hash
    assert f"block 1 of the ledger has hash {ours}" in out

    # A damaged ledger proves nothing, even for a proof that matches it.
    _rewrite_block(tmp_path / "replica-1" / BLOCKS_FILE, 3,
                   lambda b: b["header"].update(raft_index=77))
    assert medfed(["ledger", "verify-proof", str(proof_file),
                   "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "replica-1: FAILED at block 3" in out and "did not verify" in out


def test_cli_verify_proof_root_mismatch_and_short_root(tmp_path, consortium, capsys):
    proof_file, block, _ = _proof_setup(tmp_path, consortium, capsys)

    assert medfed(["ledger", "verify-proof", str(proof_file), "--root",
                   block.hash.upper()]) == 0
    assert f"checked against root {block.hash}" in capsys.readouterr().out
    assert medfed(["ledger", "verify-proof", str(proof_file), "--root", "0" * 64]) == 1
    out = capsys.readouterr().out
    assert (f"root {'0' * 64} matches neither the proof's block hash {block.hash} "
            f"nor its Merkle root {block.merkle_root}") in out

    assert medfed(["ledger", "verify-proof", str(proof_file), "--root",
                   block.hash[:16]]) == 2
    err = capsys.readouterr().err
    assert "give all 64 hex characters (got 16)" in err


def test_proof_problem_names_the_failed_check(tmp_path, consortium):
    from ledger.chain import proof_on_chain, proof_problem

    led = build(tmp_path / "r", consortium.genesis, make_batches(consortium.signers))
    blocks = list(led.blocks())
    proof = led.prove(blocks[0].entries[2].id)
    led.close()

    assert proof_problem(proof) is None and proof_on_chain(proof, blocks) is None
    bad_path = dict(proof, path=proof["path"][::-1])
    assert "Merkle path from leaf 2" in proof_problem(bad_path)
    assert "has no block 1 (it holds heights 2-" in proof_on_chain(proof, blocks[1:])
    assert "has no block 1 (it holds no blocks)" in proof_on_chain(proof, [])

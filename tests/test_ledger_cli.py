"""`medfed ledger` on damaged, incomplete and rolled-back ledgers, and bad input."""

from __future__ import annotations

import shutil

import pytest

from cluster.cli import main as medfed
from ledger.chain import BLOCKS_FILE, read_blocks
from ledger.genesis import make_consortium
from ledger.recordlog import RecordLog
from test_ledger_chain import make_batches, write_ledger

BLOCKS = 6  # make_batches' default run: 3 rounds, 2 blocks each


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    return make_consortium(tmp_path_factory.mktemp("consortium"), hospitals=3)


@pytest.fixture()
def ledger(tmp_path, consortium):
    """A healthy three-replica ledger folder and its block hashes by height."""
    write_ledger(tmp_path, consortium, make_batches(consortium.signers))
    hashes = {b.height: b.hash for b in read_blocks(tmp_path / "replica-0")[0]}
    assert len(hashes) == BLOCKS
    return tmp_path, hashes


def keep_blocks(replica, count: int) -> None:
    """Cut a replica's block file back to its first ``count`` records, cleanly."""
    path = replica / BLOCKS_FILE
    with RecordLog(path) as records:
        end = records.offsets[count] if count < len(records.offsets) else None
    if end is not None:
        path.write_bytes(path.read_bytes()[:end])


def verify(directory, *extra, capsys) -> tuple[int, str, str]:
    code = medfed(["ledger", "verify", "--dir", str(directory), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_healthy_ledger_prints_height_and_head_per_replica(ledger, capsys):
    root, hashes = ledger

    code, out, _ = verify(root, capsys=capsys)

    assert code == 0
    for name in ("replica-0", "replica-1", "replica-2"):
        assert f"{name}: ok, height {BLOCKS}, head {hashes[BLOCKS]}" in out
    assert f"3 replicas agree on every shared block; height {BLOCKS}" in out
    assert "lags" not in out


def test_emptied_replica_is_reported_as_lagging(ledger, capsys):
    root, _ = ledger
    (root / "replica-1" / BLOCKS_FILE).write_bytes(b"")

    code, out, _ = verify(root, capsys=capsys)

    assert code == 0
    assert "replica-1: ok, height 0: empty" in out
    assert f"replica-1 lags: height 0 of {BLOCKS}" in out
    assert "1 lagging" in out


def test_replica_cut_back_is_a_lag_warning_with_heights(ledger, capsys):
    root, hashes = ledger
    keep_blocks(root / "replica-2", 2)

    code, out, _ = verify(root, capsys=capsys)

    assert code == 0
    assert f"replica-2: ok, height 2, head {hashes[2]}" in out
    assert f"replica-2 lags: height 2 of {BLOCKS}" in out


def test_highest_block_on_a_minority_fails(ledger, capsys):
    root, _ = ledger
    keep_blocks(root / "replica-1", 3)
    keep_blocks(root / "replica-2", 2)

    code, out, _ = verify(root, capsys=capsys)

    assert code == 1
    assert f"only 1 of 3 replicas (replica-0) hold the highest block {BLOCKS}" in out


def test_missing_replica_named_by_genesis_fails(ledger, capsys):
    root, _ = ledger
    shutil.rmtree(root / "replica-2")

    code, out, _ = verify(root, capsys=capsys)

    assert code == 1
    assert "replica-2: FAILED: replica 'replica-2' is listed in" in out
    assert "replicas agree" not in out


def test_missing_genesis_fails_naming_it(ledger, capsys):
    root, _ = ledger
    (root / "genesis.json").unlink()

    code, out, _ = verify(root, capsys=capsys)

    assert code == 1
    assert "replica-0: FAILED: no genesis.json in" in out
    assert "hashes only" in out


def test_all_replicas_empty_fails(ledger, capsys):
    root, _ = ledger
    for name in ("replica-0", "replica-1", "replica-2"):
        (root / name / BLOCKS_FILE).write_bytes(b"")

    code, out, _ = verify(root, capsys=capsys)

    assert code == 1
    assert "every replica" in out and "is empty" in out


def test_rollback_on_every_replica_is_caught_by_head(ledger, capsys):
    root, hashes = ledger
    assert verify(root, "--head", hashes[BLOCKS], capsys=capsys)[0] == 0
    for name in ("replica-0", "replica-1", "replica-2"):
        keep_blocks(root / name, 4)

    code, out, _ = verify(root, capsys=capsys)
    assert code == 0 and f"height 4, head {hashes[4]}" in out

    code, out, _ = verify(root, "--head", hashes[BLOCKS].upper(), capsys=capsys)
    assert code == 1
    assert (f"expected head {hashes[BLOCKS]}, found head {hashes[4]} at block 4"
            in out)
    assert "rolled back" in out

    code, out, _ = verify(root, "--head", hashes[BLOCKS], "--height", str(BLOCKS),
                          capsys=capsys)
    assert code == 1
    assert f"chain ends at block 4 with head {hashes[4]}" in out


def test_head_at_a_stated_height_allows_a_grown_chain(ledger, capsys):
    root, hashes = ledger

    assert verify(root, "--head", hashes[3], "--height", "3", capsys=capsys)[0] == 0

    code, out, _ = verify(root, "--head", hashes[3], capsys=capsys)
    assert code == 1 and "--height 3" in out
    code, out, _ = verify(root, "--head", hashes[2], "--height", "3", capsys=capsys)
    assert code == 1 and f"expected {hashes[2]} at block 3, found {hashes[3]}" in out


@pytest.mark.parametrize("argv,expect", [
    (["--head", "abc123"], "give all 64 hex characters (got 6)"),
    (["--height", "3"], "--height 3 needs --head"),
])
def test_bad_head_arguments_are_one_line_errors(ledger, capsys, argv, expect):
    root, _ = ledger

    code, _, err = verify(root, *argv, capsys=capsys)

    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1


def test_regular_file_as_ledger_dir_says_so(tmp_path, capsys):
    path = tmp_path / "report.md"
    path.write_text("not a ledger\n")

    code, _, err = verify(path, capsys=capsys)

    assert code == 2
    assert f"{path} is a file, not a ledger folder" in err


def test_prove_with_a_short_prefix_asks_for_eight_characters(ledger, capsys):
    root, _ = ledger
    entry = read_blocks(root / "replica-0")[0][0].entries[0].id

    assert medfed(["ledger", "prove", "--dir", str(root), entry[:5]]) == 2
    err = capsys.readouterr().err
    assert f"entry id prefix {entry[:5]!r} has 5 characters" in err
    assert "at least 8 hex characters" in err

    assert medfed(["ledger", "prove", "--dir", str(root), "zz" * 6]) == 2
    assert "is not hex" in capsys.readouterr().err


def test_binary_proof_file_is_named(tmp_path, capsys):
    path = tmp_path / "proof.bin"
    path.write_bytes(bytes(range(128, 256)))

    assert medfed(["ledger", "verify-proof", str(path)]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path} is not a JSON proof" in err[0]


def test_show_jsonl_into_a_directory_is_a_clear_error(ledger, capsys):
    root, _ = ledger
    folder = root / "out"
    folder.mkdir()

    code = medfed(["ledger", "show", "--dir", str(root), "--jsonl", str(folder)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"--jsonl {folder} is a directory" in err[0]


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_simulate_refuses_fewer_than_one_worker(workers, capsys):
    code = medfed(["ledger", "simulate", "--seeds", "1", "--workers", workers])

    assert code == 2
    assert f"--workers {workers}: give at least 1" in capsys.readouterr().err


def test_replica_restored_from_a_snapshot_counts_from_genesis(tmp_path, consortium,
                                                              capsys):
    from ledger import entries as E
    from ledger.store import Ledger

    batches = make_batches(consortium.signers)
    write_ledger(tmp_path, consortium, batches)
    old = Ledger(tmp_path / "old", consortium.genesis)
    for raft_index, batch in enumerate(batches[:3], start=1):
        old.apply_raft_entry(raft_index, E.encode_batch(batch))
    shutil.rmtree(tmp_path / "replica-1")
    fresh = Ledger(tmp_path / "replica-1", consortium.genesis)
    fresh.restore(old.snapshot())
    old.close()
    shutil.rmtree(tmp_path / "old")
    fresh.apply_raft_entry(4, E.encode_batch(batches[3]))
    fresh.close()
    head = read_blocks(tmp_path / "replica-0")[0][-1].hash

    code, out, _ = verify(tmp_path, capsys=capsys)

    assert code == 0
    assert "replica-1: ok, height 4" in out
    assert f"replica-1 lags: height 4 of {BLOCKS}" in out
    assert f"height {BLOCKS}, head {head}" in out

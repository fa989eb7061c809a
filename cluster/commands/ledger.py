"""`medfed ledger`: check, inspect and prove the audit ledger; simulate Raft.

    medfed ledger verify --dir DIR
    medfed ledger show --dir DIR [--round R] [--member M] [--type T] [--jsonl OUT]
    medfed ledger prove --dir DIR ENTRY_ID [--out proof.json]
    medfed ledger verify-proof PROOF.json [--dir DIR] [--root HEX]
    medfed ledger simulate --seeds N [--start S] [--workers W]

DIR is one replica directory (holding ``blocks.log``) or a directory holding
several. Every command here only reads ledger files; none repairs them.

A proof is only as good as what it is checked against: ``verify-proof --dir``
verifies the chain first and then finds the proof's block on it, and
``--root`` takes a full block hash or Merkle root obtained from a trusted
source. The hashes inside the proof file prove only that the file is
self-consistent.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path

from ledger.chain import (
    BLOCKS_FILE, make_proof, proof_on_chain, proof_problem, read_blocks, verify,
)
from ledger.genesis import GENESIS_FILE, Genesis
from ledger.store import (
    block_records, filter_records, find_record, verify_replica, write_jsonl,
)


def register(sub) -> None:
    parser = sub.add_parser("ledger", help="verify, inspect and prove the audit ledger")
    cmds = parser.add_subparsers(dest="ledger_command", required=True)

    p = cmds.add_parser("verify", help="walk every replica's chain and compare them")
    p.add_argument("--dir", required=True, help="replica directory or their parent")
    p.set_defaults(func=cmd_verify)

    p = cmds.add_parser("show", help="list entries with their verdicts")
    p.add_argument("--dir", required=True)
    p.add_argument("--round", type=int, default=None)
    p.add_argument("--member", default=None, help="signer or member named")
    p.add_argument("--type", default=None, help="entry type, e.g. model_update")
    p.add_argument("--jsonl", default=None, help="also write the entries as JSON lines")
    p.set_defaults(func=cmd_show)

    p = cmds.add_parser("prove", help="Merkle inclusion proof of one entry")
    p.add_argument("--dir", required=True)
    p.add_argument("entry_id", help="entry id (hex), or a unique prefix of 8+ chars")
    p.add_argument("--out", default=None, help="write the proof here (default stdout)")
    p.set_defaults(func=cmd_prove)

    p = cmds.add_parser("verify-proof", help="check a proof written by `prove`")
    p.add_argument("proof", help="proof JSON file")
    p.add_argument("--root", default=None,
                   help="trusted Merkle root or block hash (full 64 hex characters)")
    p.add_argument("--dir", default=None,
                   help="ledger directory: verify its chain and find the proof's "
                        "block on it (the trustworthy check)")
    p.set_defaults(func=cmd_verify_proof)

    p = cmds.add_parser("simulate", help="run the deterministic Raft simulator")
    p.add_argument("--seeds", type=int, required=True, help="how many seeds")
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--workers", type=int, default=1, help="processes, if supported")
    p.set_defaults(func=cmd_simulate)


def replica_dirs(directory: str) -> list[Path]:
    """Replica directories at or below ``directory`` (two levels), sorted."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"ledger directory {root} not found")
    if (root / BLOCKS_FILE).exists():
        return [root]
    found = sorted({p.parent for p in root.glob(f"*/{BLOCKS_FILE}")}
                   | {p.parent for p in root.glob(f"*/*/{BLOCKS_FILE}")})
    if not found:
        raise FileNotFoundError(f"no {BLOCKS_FILE} in {root} or its subdirectories")
    return found


def find_genesis(replica: Path, stop: Path) -> Genesis | None:
    """The nearest genesis in ``replica`` or its parents, up to ``stop``'s parent."""
    for folder in [replica, *replica.parents]:
        if (folder / GENESIS_FILE).exists():
            return Genesis.load(folder / GENESIS_FILE)
        if folder == stop.parent or folder == folder.parent:
            break
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    failed, _ = verify_ledger(args.dir)
    return 1 if failed else 0


def verify_ledger(directory: str) -> tuple[int, dict[Path, list]]:
    """Verifies every replica under ``directory`` and compares them; prints why.

    Returns ``(failures, blocks)``: the number of replicas that failed or
    diverged, and the blocks of each replica whose chain verified.
    """
    root = Path(directory)
    replicas = replica_dirs(directory)
    failed = 0
    heads: dict[Path, dict[int, str]] = {}
    good: dict[Path, list] = {}
    for replica in replicas:
        genesis = find_genesis(replica, root)
        if genesis is not None:
            result = verify_replica(replica, genesis)
            checked = "genesis and every verdict checked"
        else:
            result = verify(replica)
            checked = "hashes only: no genesis file found"
        if result.ok:
            print(f"{replica}: ok, {result.blocks} blocks ({checked})")
            good[replica] = read_blocks(replica)[0]
            heads[replica] = {b.height: b.hash for b in good[replica]}
        else:
            failed += 1
            print(f"{replica}: FAILED at block {result.first_bad_height}: "
                  f"{result.reason}")

    # Healthy replicas must agree on every height they share.
    names = list(heads)
    for other in names[1:]:
        shared = set(heads[names[0]]) & set(heads[other])
        differ = sorted(h for h in shared if heads[names[0]][h] != heads[other][h])
        if differ:
            failed += 1
            print(f"{other}: DIVERGES from {names[0]} at block {differ[0]}")
    if len(names) > 1 and failed == 0:
        print(f"{len(names)} replicas agree on every shared block")
    return failed, good


def _load_records(directory: str) -> tuple[Path, list, list]:
    """The longest replica's blocks and entry records, read-only."""
    best: tuple[Path, list] | None = None
    for replica in replica_dirs(directory):
        blocks, problem = read_blocks(replica)
        if problem:
            print(f"warning: {replica}: {problem}; showing blocks before it")
        if best is None or len(blocks) > len(best[1]):
            best = (replica, blocks)
    assert best is not None
    replica, blocks = best
    records, seq = [], 1
    for block in blocks:
        records.extend(block_records(block, seq))
        seq += len(block.entries)
    return replica, blocks, records


def cmd_show(args: argparse.Namespace) -> int:
    replica, _, records = _load_records(args.dir)
    chosen = filter_records(records, round=args.round, member=args.member,
                            type=args.type)
    print(f"{replica}: {len(chosen)} of {len(records)} entries")
    print(f"{'block':>5} {'seq':>5}  {'type':<16} {'signer':<12} {'round':>5}  "
          f"{'verdict':<8} {'entry id':<16}  reason")
    for r in chosen:
        rnd = (r.body or {}).get("round", "")
        verdict = "accepted" if r.accepted else "REJECTED"
        print(f"{r.height:>5} {r.seq:>5}  {r.type or '?':<16} {r.signer or '?':<12} "
              f"{rnd!s:>5}  {verdict:<8} {r.entry_id[:16]}  {r.reason or ''}")
    if args.jsonl:
        with open(args.jsonl, "w") as out:
            n = write_jsonl(chosen, out)
        print(f"wrote {n} entries to {args.jsonl}")
    return 0


def cmd_prove(args: argparse.Namespace) -> int:
    replica, blocks, records = _load_records(args.dir)
    record = find_record(records, args.entry_id, where=str(replica))
    block = next(b for b in blocks if b.height == record.height)
    text = json.dumps(make_proof(block, record.position), indent=2, sort_keys=True)
    if not args.out:
        print(text)
        return 0

    Path(args.out).write_text(text + "\n")
    print(f"proof of entry {record.entry_id} written to {args.out}")
    print(f"  block height {block.height}")
    print(f"  block hash   {block.hash}")
    print(f"  Merkle root  {block.merkle_root}")
    print("check it against the ledger (verifies the chain, then the proof):")
    print(f"  medfed ledger verify-proof {args.out} --dir {args.dir}")
    print("or against a block hash obtained from a trusted source:")
    print(f"  medfed ledger verify-proof {args.out} --root {block.hash}")
    return 0


def _full_hex(value: str) -> str:
    """``value`` lower-cased when it is a full SHA-256 hex digest; else ValueError."""
    text = value.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(
            f"--root {value!r} is not a full block hash or Merkle root: give all 64 "
            f"hex characters (got {len(text)}), as printed by `medfed ledger prove`"
        )
    return text


def cmd_verify_proof(args: argparse.Namespace) -> int:
    path = Path(args.proof)
    if not path.exists():
        raise FileNotFoundError(f"proof file {path} not found")
    try:
        proof = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    root = _full_hex(args.root) if args.root is not None else None

    # Shape first: a file that is not a proof is a usage error, not a failure.
    problem = proof_problem(proof, root)
    checked = []
    if root is not None:
        checked.append(f"root {root}")
    if problem is None and args.dir is not None:
        failed, chains = verify_ledger(args.dir)
        if failed or not chains:
            problem = f"the ledger in {args.dir} did not verify (see above)"
        else:
            for blocks in chains.values():
                problem = proof_on_chain(proof, blocks)
                if problem is None:
                    break
            checked.append(f"the verified chain in {args.dir}")

    entry = str(proof.get("entry_id"))
    if problem is not None:
        print(f"proof FAILED: entry {entry}: {problem}")
        return 1
    verdict = "accepted" if proof["leaf"]["accepted"] else "rejected"
    print(f"proof ok: entry {entry} ({verdict}) is in block "
          f"{proof['block']['height']} (hash {proof['block_hash']})")
    if checked:
        print(f"checked against {' and '.join(checked)}")
    else:
        print("checked against the block header inside the proof file only: this "
              "shows the file is self-consistent, not that the entry is in your "
              "ledger. Give --dir LEDGER_DIR or --root <full block hash> from a "
              "trusted source.")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: give at least 1")
    from ledger.raft.sim import run_seeds

    if not getattr(args, "verbose", False):
        # One line per election across thousands of seeds drowns the verdict.
        logging.getLogger("ledger.raft").setLevel(logging.WARNING)

    kwargs = {"start": args.start}
    if "workers" in inspect.signature(run_seeds).parameters:
        kwargs["workers"] = args.workers
    elif args.workers != 1:
        print("note: this simulator runs seeds in one process; --workers ignored")
    result = run_seeds(args.seeds, **kwargs)
    violations = int(result.get("violations", 0))
    seconds = float(result.get("seconds", 0.0))
    print(f"seeds {args.start}..{args.start + args.seeds - 1}: {violations} "
          f"violations in {seconds:.1f} s")
    if violations:
        print(f"first failing seed: {result.get('first_failing_seed')}")
        return 1
    return 0

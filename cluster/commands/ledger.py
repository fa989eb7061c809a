"""`medfed ledger`: check, inspect and prove the audit ledger; simulate Raft.

    medfed ledger verify --dir DIR
    medfed ledger show --dir DIR [--round R] [--member M] [--type T] [--jsonl OUT]
    medfed ledger prove --dir DIR ENTRY_ID [--out proof.json]
    medfed ledger verify-proof PROOF.json [--root HEX]
    medfed ledger simulate --seeds N [--start S] [--workers W]

DIR is one replica directory (holding ``blocks.log``) or a directory holding
several. Every command here only reads ledger files; none repairs them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path

from ledger.chain import BLOCKS_FILE, make_proof, read_blocks, verify, verify_proof
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
    p.add_argument("--root", default=None, help="trusted Merkle root or block hash")
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
    root = Path(args.dir)
    replicas = replica_dirs(args.dir)
    failed = 0
    heads: dict[Path, dict[int, str]] = {}
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
            heads[replica] = {b.height: b.hash for b in read_blocks(replica)[0]}
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
    return 1 if failed else 0


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
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"proof of {record.entry_id[:16]} in block {block.height} "
              f"(root {block.merkle_root[:16]}) written to {args.out}")
    else:
        print(text)
    return 0


def cmd_verify_proof(args: argparse.Namespace) -> int:
    path = Path(args.proof)
    if not path.exists():
        raise FileNotFoundError(f"proof file {path} not found")
    try:
        proof = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    ok = verify_proof(proof, args.root)
    against = f"root {args.root}" if args.root else "its own block header only"
    if ok:
        verdict = "accepted" if proof["leaf"]["accepted"] else "rejected"
        print(f"proof ok: entry {proof['entry_id'][:16]} ({verdict}) is in block "
              f"{proof['block']['height']}, checked against {against}")
        return 0
    print(f"proof FAILED: entry {str(proof['entry_id'])[:16]} against {against}")
    return 1


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

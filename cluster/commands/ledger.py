"""`medfed ledger`: check, inspect and prove the audit ledger; simulate Raft.

    medfed ledger verify --dir DIR [--head HASH [--height N]]
    medfed ledger show --dir DIR [--round R] [--member M] [--type T] [--jsonl OUT]
    medfed ledger prove --dir DIR ENTRY_ID [--out proof.json]
    medfed ledger verify-proof PROOF.json [--dir DIR] [--root HEX]
    medfed ledger simulate --seeds N [--start S] [--workers W]

DIR is one replica directory (holding ``blocks.log``) or the ledger directory
holding ``genesis.json`` and the replica directories it names. Every command
here only reads ledger files; none repairs them.

``verify`` fails (exit 1) on a damaged or diverging replica, a replica that
genesis names but that is missing, a missing genesis, a ledger with no block
at all, and a highest block held by fewer than a majority of the replicas. A
replica behind the others whose blocks match theirs is only a warning: a
follower may lag. A rollback of the last blocks on every replica keeps the
chain valid, so only ``--head`` (the head hash from the run's report) can
catch it.

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
from dataclasses import dataclass, field
from pathlib import Path

from ledger.chain import (
    BLOCKS_FILE, make_proof, proof_on_chain, proof_problem, read_anchor, read_blocks,
    verify,
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
    p.add_argument("--head", default=None,
                   help="expected head hash (all 64 hex characters), e.g. from the "
                        "run's report.md; the chain must end at it")
    p.add_argument("--height", type=int, default=None,
                   help="with --head: the block height the hash belongs to; the "
                        "chain must hold it there (it may have grown since)")
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
    p.add_argument("--workers", type=int, default=1,
                   help="processes, at least 1 (default 1)")
    p.set_defaults(func=cmd_simulate)


def replica_dirs(directory: str) -> list[Path]:
    """Replica directories at or below ``directory`` (two levels), sorted."""
    root = Path(directory)
    if root.is_file():
        raise ValueError(
            f"{root} is a file, not a ledger folder: give the folder holding "
            f"{GENESIS_FILE} and the replica folders, or one replica folder "
            f"holding {BLOCKS_FILE}")
    if not root.is_dir():
        raise FileNotFoundError(f"ledger directory {root} not found")
    if (root / BLOCKS_FILE).exists():
        return [root]
    found = sorted({p.parent for p in root.glob(f"*/{BLOCKS_FILE}")}
                   | {p.parent for p in root.glob(f"*/*/{BLOCKS_FILE}")})
    if not found:
        raise FileNotFoundError(f"no {BLOCKS_FILE} in {root} or its subdirectories")
    return found


def _genesis_path(replica: Path, stop: Path) -> Path | None:
    """The nearest ``genesis.json`` in ``replica`` or its parents, up to ``stop``'s
    parent; None when there is none."""
    for folder in [replica, *replica.parents]:
        if (folder / GENESIS_FILE).exists():
            return folder / GENESIS_FILE
        if folder == stop.parent or folder == folder.parent:
            break
    return None


def find_genesis(replica: Path, stop: Path) -> Genesis | None:
    """The nearest genesis in ``replica`` or its parents, up to ``stop``'s parent."""
    path = _genesis_path(replica, stop)
    return Genesis.load(path) if path is not None else None


@dataclass
class ReplicaState:
    """What ``verify`` found in one replica directory.

    ``height`` counts from genesis (a snapshot anchor's height included);
    ``hashes`` maps each height the file holds (the anchor's too) to its hash.
    """

    path: Path
    ok: bool
    height: int = 0
    head_hash: str | None = None
    hashes: dict[int, str] = field(default_factory=dict)
    blocks: list = field(default_factory=list)
    diverged: bool = False


def _check_replica(replica: Path, genesis: Genesis | None) -> ReplicaState:
    """Verifies one replica and prints one line: its height and head hash."""
    if genesis is not None:
        result = verify_replica(replica, genesis)
        checked = "genesis and every verdict checked"
    else:
        result = verify(replica)
        checked = "hashes only"
    if not result.ok:
        print(f"{replica}: FAILED at block {result.first_bad_height}: {result.reason}")
        return ReplicaState(replica, False)

    blocks = read_blocks(replica)[0]
    anchor = read_anchor(replica)
    hashes = {b.height: b.hash for b in blocks}
    if anchor is not None:
        hashes[anchor.height] = anchor.hash
    height = (anchor.height if anchor is not None else 0) + result.blocks
    if height == 0:
        print(f"{replica}: ok, height 0: empty, no blocks ({checked})")
        return ReplicaState(replica, True, 0, None, hashes, blocks)
    print(f"{replica}: ok, height {height}, head {result.head_hash} ({checked})")
    return ReplicaState(replica, True, height, result.head_hash, hashes, blocks)


def cmd_verify(args: argparse.Namespace) -> int:
    head = _full_hex(args.head, "--head") if args.head is not None else None
    if args.height is not None and head is None:
        raise ValueError(f"--height {args.height} needs --head HASH: the hash "
                         "expected at that height")
    if args.height is not None and args.height < 1:
        raise ValueError(f"--height {args.height}: block heights start at 1")
    failed, _ = verify_ledger(args.dir, head=head, height=args.height)
    return 1 if failed else 0


def verify_ledger(
    directory: str, head: str | None = None, height: int | None = None,
) -> tuple[int, dict[Path, list]]:
    """Verifies every replica under ``directory`` and compares them; prints why.

    Prints each replica's height and head hash. Counts as failures: a replica
    whose chain does not verify or that diverges from the longest one, a
    missing genesis, a replica named by genesis but missing (when
    ``directory`` is the ledger folder, not one replica), a ledger with no
    blocks, a highest block held by fewer than a majority of genesis's
    replicas, and, with ``head`` (64 hex), a chain that does not end at
    ``head`` (or, with ``height``, does not hold ``head`` at ``height``).
    A replica that is a strict prefix of the longest one is a lagging
    follower: a warning, not a failure.

    Returns ``(failures, blocks)``: the number of problems found, and the
    blocks of each replica whose chain verified.
    """
    root = Path(directory)
    replicas = replica_dirs(directory)
    single = replicas == [root]
    failed = 0

    # Genesis first: without it block 1 and the verdicts cannot be checked.
    geneses: dict[Path, Genesis] = {}
    states: list[ReplicaState] = []
    for replica in replicas:
        where = _genesis_path(replica, root)
        genesis = None
        if where is None:
            failed += 1
            print(f"{replica}: FAILED: no {GENESIS_FILE} in {replica} or "
                  f"{replica.parent}; without it block 1 and the verdicts cannot "
                  "be checked (restore it from the run's ledger folder)")
        else:
            genesis = geneses.setdefault(where, Genesis.load(where))
        states.append(_check_replica(replica, genesis))

    if not single:
        present = set(replicas)
        for where, genesis in geneses.items():
            for voter in genesis.voters:
                if where.parent / voter not in present:
                    failed += 1
                    print(f"{where.parent / voter}: FAILED: replica {voter!r} is "
                          f"listed in {where} but its {BLOCKS_FILE} is missing")

    good = [s for s in states if s.ok]
    failed += len(states) - len(good)
    if not good:
        print(f"verify FAILED: no replica in {root} verified")
        return failed, {}

    # Every healthy replica must be a prefix of (or equal to) the longest one.
    longest = max(good, key=lambda s: s.height)
    top = longest.height
    for state in good:
        shared = set(state.hashes) & set(longest.hashes)
        differ = sorted(h for h in shared if state.hashes[h] != longest.hashes[h])
        if differ:
            state.diverged = True
            failed += 1
            print(f"{state.path}: DIVERGES from {longest.path} at block {differ[0]}")
    agreeing = [s for s in good if not s.diverged]
    lagging = [s for s in agreeing if s.height < top]
    for state in lagging:
        print(f"warning: {state.path} lags: height {state.height} of {top}; its "
              f"blocks match {longest.path}'s (a follower may lag)")

    if top == 0:
        failed += 1
        print(f"FAILED: every replica in {root} is empty: the ledger holds no block")
    elif not single:
        failed += _check_majority(agreeing, top, list(geneses.values()))
    if head is not None and top > 0:
        failed += _check_head(longest, head, height)

    if failed == 0:
        agree = (f"{len(agreeing)} replicas agree on every shared block; "
                 if len(agreeing) > 1 else "")
        behind = f"; {len(lagging)} lagging" if lagging else ""
        print(f"{agree}height {top}, head {longest.head_hash}{behind}")
    else:
        print(f"verify FAILED: {failed} problem(s) in {root}, named above")
    return failed, {s.path: s.blocks for s in good}


def _check_majority(agreeing: list[ReplicaState], top: int,
                    geneses: list[Genesis]) -> int:
    """1 (and why) when fewer than a majority of voters hold block ``top``."""
    voters = max((len(g.voters) for g in geneses), default=len(agreeing))
    quorum = voters // 2 + 1
    holders = [s for s in agreeing if s.height == top]
    if len(holders) >= quorum:
        return 0
    names = ", ".join(s.path.name for s in holders)
    print(f"FAILED: only {len(holders)} of {voters} replicas ({names}) hold the "
          f"highest block {top}; a committed block is on at least {quorum}, so "
          "blocks were lost from the others or were never committed")
    return 1


def _check_head(chain: ReplicaState, head: str, height: int | None) -> int:
    """1 (and why) when ``chain`` does not end at ``head``, or with ``height``
    does not hold ``head`` at that height."""
    if height is not None:
        found = chain.hashes.get(height)
        if found == head:
            print(f"head check ok: block {height} is {head}")
            return 0
        if height > chain.height:
            print(f"FAILED: expected head {head} at block {height}, but the chain "
                  f"ends at block {chain.height} with head {chain.head_hash}: "
                  "blocks were lost or rolled back")
        else:
            print(f"FAILED: expected {head} at block {height}, found "
                  f"{found or 'no block there (before the snapshot anchor)'}")
        return 1

    if chain.head_hash == head:
        print(f"head check ok: the chain ends at {head} (block {chain.height})")
        return 0
    earlier = [h for h, v in chain.hashes.items() if v == head]
    if earlier:
        print(f"FAILED: expected head {head}, found head {chain.head_hash} at block "
              f"{chain.height}; the expected hash is block {earlier[0]}, so the "
              f"ledger grew since; check it with --height {earlier[0]}")
    else:
        print(f"FAILED: expected head {head}, found head {chain.head_hash} at block "
              f"{chain.height}, and no block has the expected hash: the last "
              "blocks were rolled back or this is another ledger")
    return 1


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
    jsonl = _writable(args.jsonl, "--jsonl") if args.jsonl else None
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
    if jsonl is not None:
        try:
            with open(jsonl, "w") as out:
                n = write_jsonl(chosen, out)
        except OSError as exc:
            raise ValueError(f"--jsonl {jsonl}: cannot write: {exc}") from exc
        print(f"wrote {n} entries to {jsonl}")
    return 0


def cmd_prove(args: argparse.Namespace) -> int:
    out = _writable(args.out, "--out") if args.out else None
    replica, blocks, records = _load_records(args.dir)
    record = find_record(records, args.entry_id, where=str(replica))
    block = next(b for b in blocks if b.height == record.height)
    text = json.dumps(make_proof(block, record.position), indent=2, sort_keys=True)
    if out is None:
        print(text)
        return 0

    try:
        out.write_text(text + "\n")
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write: {exc}") from exc
    print(f"proof of entry {record.entry_id} written to {args.out}")
    print(f"  block height {block.height}")
    print(f"  block hash   {block.hash}")
    print(f"  Merkle root  {block.merkle_root}")
    print("check it against the ledger (verifies the chain, then the proof):")
    print(f"  medfed ledger verify-proof {args.out} --dir {args.dir}")
    print("or against a block hash obtained from a trusted source:")
    print(f"  medfed ledger verify-proof {args.out} --root {block.hash}")
    return 0


def _full_hex(value: str, flag: str = "--root") -> str:
    """``value`` lower-cased when it is a full SHA-256 hex digest; else ValueError."""
    text = value.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        what = ("head hash, as in the run's report.md" if flag == "--head" else
                "block hash or Merkle root, as printed by `medfed ledger prove`")
        raise ValueError(
            f"{flag} {value!r} is not a full {what}: give all 64 hex characters "
            f"(got {len(text)})"
        )
    return text


def _writable(path: str, flag: str) -> Path:
    """``path`` as a Path when a file can be written there; else ValueError."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise ValueError(f"{flag} {target}: folder {target.parent} does not exist")
    return target


def cmd_verify_proof(args: argparse.Namespace) -> int:
    path = Path(args.proof)
    if not path.exists():
        raise FileNotFoundError(f"proof file {path} not found")
    if path.is_dir():
        raise ValueError(f"proof file {path} is a directory; give the JSON file "
                         "written by `medfed ledger prove --out`")
    try:
        proof = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a JSON proof: it is not text ({exc.reason} "
                         f"at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    root = _full_hex(args.root) if args.root is not None else None

    # Shape first: a file that is not a proof is a usage error, not a failure.
    try:
        problem = proof_problem(proof, root)
    except ValueError as exc:
        raise ValueError(f"{path} is not a valid proof: {exc}") from exc
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
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give at least 1 process")
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

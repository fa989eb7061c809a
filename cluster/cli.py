"""The ``medfed`` command line: ``medfed run``, ``medfed data``, ``medfed ledger``.

Each command group lives in its own module under ``cluster.commands`` and
registers its sub-parser here; this module only dispatches and turns
expected errors into a one-line message and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.commands import data as data_cmd
from cluster.commands import ledger as ledger_cmd
from cluster.commands import run as run_cmd


class UsageError(Exception):
    """A problem with the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfed",
        description="Federated clinical risk models on Ray, with an audit ledger.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (run_cmd, data_cmd, ledger_cmd):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("medfed: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"medfed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

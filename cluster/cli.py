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
    except Exception as exc:
        problem = user_error(exc)
        if problem is None:
            raise
        print(f"medfed: error: {one_line(problem)}", file=sys.stderr)
        return 2


# Errors that come from the user's input or set-up, printed without traceback.
USER_ERRORS = (UsageError, ValueError, FileNotFoundError)


def user_error(exc: BaseException) -> BaseException | None:
    """The user's mistake behind ``exc``, or None for a genuine failure.

    An error raised inside a Ray actor or task reaches the driver wrapped
    (``RayTaskError``, or ``ActorDiedError`` when a constructor raised); the
    wrapper is also an instance of the original class and its message is a
    traceback, so the original (``.cause``) is what gets printed.
    """
    from cluster.runtime import RayStartError

    exceptions = sys.modules.get("ray.exceptions")
    for _ in range(4):
        if exceptions is not None and isinstance(exc, exceptions.RayError):
            cause = getattr(exc, "cause", None)
            if not isinstance(cause, BaseException):
                return None
            exc = cause
            continue
        if isinstance(exc, USER_ERRORS + (RayStartError,)):
            return exc
        return None
    return None


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its class name when empty)."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) or not text:
        text = f"{type(exc).__name__}: {text}"
    return text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())

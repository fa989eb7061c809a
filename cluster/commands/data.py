"""`medfed data`: fetch the Diabetes 130 zip, and summarise a copy of it.

``medfed data fetch [--dest DIR] [--url URL] [--timeout S] [--max-seconds S]``
downloads the official zip, keeping it only if its sha256 is the known one;
``--timeout`` bounds connecting and each read, ``--max-seconds`` the whole
download (default 600 s). ``medfed data info [--data
PATH]`` prints encounters, patients and label rates of a local copy.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clinical import diabetes130, preprocess
from clinical.errors import DataError


def register(sub) -> None:
    """Adds the ``data`` command group and its ``fetch`` and ``info`` commands."""
    parser = sub.add_parser("data", help="fetch or inspect the Diabetes 130 data")
    commands = parser.add_subparsers(dest="data_command", required=True)

    fetch = commands.add_parser(
        "fetch", help="download the official Diabetes 130 zip (sha256-checked)")
    fetch.add_argument(
        "--dest", default=None,
        help="folder to write dataset_diabetes.zip into "
             "(default: $MEDFED_DATA_DIR, else ./data/diabetes130)")
    fetch.add_argument("--url", default=diabetes130.OFFICIAL_URL,
                       help="download URL (default: the UCI repository)")
    fetch.add_argument("--timeout", type=float, default=60.0,
                       help="seconds allowed to connect and per read (default 60)")
    fetch.add_argument("--max-seconds", type=float,
                       default=diabetes130.DOWNLOAD_MAX_SECONDS,
                       help="seconds allowed for the whole download (default "
                            f"{diabetes130.DOWNLOAD_MAX_SECONDS:g})")
    fetch.set_defaults(func=run_fetch)

    info = commands.add_parser("info", help="print rows, patients and label rates")
    info.add_argument("--data", default=None,
                      help="zip, CSV or folder (default: $MEDFED_DATA_DIR)")
    info.set_defaults(func=run_info)


def run_fetch(args: argparse.Namespace) -> int:
    """Downloads the zip; returns 0 on success (errors raise DataError)."""
    dest = args.dest or os.environ.get("MEDFED_DATA_DIR") or "data/diabetes130"
    if args.timeout <= 0:
        raise DataError(f"--timeout must be positive seconds, got {args.timeout}")
    if args.max_seconds <= 0:
        raise DataError(
            f"--max-seconds must be positive seconds, got {args.max_seconds}")
    path = diabetes130.fetch(Path(dest), url=args.url, timeout=args.timeout,
                             max_seconds=args.max_seconds)
    print(f"saved {path} ({path.stat().st_size:,} bytes, sha256 verified)")
    print(f"use it with --data {path.parent} or MEDFED_DATA_DIR={path.parent}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Prints a summary of the data at ``--data``; returns 0."""
    source = diabetes130.resolve_path(args.data)
    raw = diabetes130.load_raw(source)
    kept = preprocess.cohort(raw)

    rows = [
        ("file", str(source)),
        ("encounters", f"{len(raw):,}"),
        ("patients", f"{raw['patient_nbr'].nunique():,}"),
        ("columns", f"{raw.shape[1]}"),
        ("after death/hospice removal", f"{len(kept):,} encounters"),
    ]
    for name in preprocess.TARGETS:
        rate_all = preprocess.target(raw, name).mean()
        rate_kept = preprocess.target(kept, name).mean()
        rows.append((f"label rate {name}",
                     f"{rate_all:.4f} (all), {rate_kept:.4f} (cohort)"))

    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0

"""Diabetes 130-US hospitals: the official file, its download and its loader.

Data: UCI Machine Learning Repository, data set 296, "Diabetes 130-US hospitals
for years 1999-2008" (Strack et al., BioMed Research International, 2014;
licence CC BY 4.0). The official zip holds
``dataset_diabetes/diabetic_data.csv``: 101,766 encounters, 50 columns, missing
values written as ``?``. There is no hospital identifier in it.

`load_raw` reads the zip, the CSV, or a folder holding either, and refuses a
file that is missing, truncated, corrupt or lacks expected columns. `fetch`
downloads the zip and keeps it only when its sha256 matches the known one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
import zipfile
import zlib
from pathlib import Path

import pandas as pd

from clinical.errors import DataError

log = logging.getLogger(__name__)

OFFICIAL_URL = (
    "https://archive.ics.uci.edu/static/public/296/"
    "diabetes+130-us+hospitals+for+years+1999-2008.zip"
)
ZIP_NAME = "dataset_diabetes.zip"
CSV_NAME = "diabetic_data.csv"
CSV_MEMBER = "dataset_diabetes/diabetic_data.csv"
IDS_MEMBER = "dataset_diabetes/IDs_mapping.csv"

ZIP_SHA256 = "3a17a3b55b6dd4a1926703185c0ad8e2ed30bc8e2f9b927cdd1000b733d1de8e"
ZIP_BYTES = 3_347_213
CSV_SHA256 = "0689e7ec031237dc63031b938805c48377748761a3b26acab621567afa24df97"
CSV_BYTES = 19_159_383
IDS_SHA256 = "f1bb82b471cb34649352597572c9b1fb00bd27f77b9f5a22a03dc3eb1039749e"
IDS_BYTES = 2_547

EXPECTED_ROWS = 101_766
EXPECTED_PATIENTS = 71_518
READMITTED_VALUES = ("NO", ">30", "<30")

MEDICATIONS = (
    "metformin", "repaglinide", "nateglinide", "chlorpropamide", "glimepiride",
    "acetohexamide", "glipizide", "glyburide", "tolbutamide", "pioglitazone",
    "rosiglitazone", "acarbose", "miglitol", "troglitazone", "tolazamide",
    "examide", "citoglipton", "insulin", "glyburide-metformin",
    "glipizide-metformin", "glimepiride-pioglitazone", "metformin-rosiglitazone",
    "metformin-pioglitazone",
)
COLUMNS = (
    "encounter_id", "patient_nbr", "race", "gender", "age", "weight",
    "admission_type_id", "discharge_disposition_id", "admission_source_id",
    "time_in_hospital", "payer_code", "medical_specialty", "num_lab_procedures",
    "num_procedures", "num_medications", "number_outpatient", "number_emergency",
    "number_inpatient", "diag_1", "diag_2", "diag_3", "number_diagnoses",
    "max_glu_serum", "A1Cresult", *MEDICATIONS, "change", "diabetesMed",
    "readmitted",
)
assert len(COLUMNS) == 50

_HOW_TO_GET = (
    "download it with `medfed data fetch --dest DIR` (or from "
    f"{OFFICIAL_URL}) and pass that folder or set $MEDFED_DATA_DIR"
)


def resolve_path(path: str | os.PathLike | None = None) -> Path:
    """Returns the zip or CSV file that `load_raw` would read.

    path: a zip, a CSV, or a folder holding ``dataset_diabetes.zip``,
        ``diabetic_data.csv`` or ``dataset_diabetes/diabetic_data.csv``;
        ``None`` reads ``$MEDFED_DATA_DIR``.
    Raises DataError when nothing usable is there, saying how to get it.
    """
    if path is None:
        env = os.environ.get("MEDFED_DATA_DIR")
        if not env:
            raise DataError(
                f"no data path given and $MEDFED_DATA_DIR is unset; {_HOW_TO_GET}"
            )
        path = env
    p = Path(path).expanduser()

    if p.is_file():
        return p
    if p.is_dir():
        candidates = (p / ZIP_NAME, p / CSV_NAME, p / "dataset_diabetes" / CSV_NAME)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise DataError(
            f"{p} holds neither {ZIP_NAME} nor {CSV_NAME}; {_HOW_TO_GET}"
        )
    raise DataError(f"Diabetes 130 data not found at {p}; {_HOW_TO_GET}")


def _read_csv(handle, source: str) -> pd.DataFrame:
    """Parses the CSV with ``?`` as the only missing marker ("None" is a value)."""
    try:
        return pd.read_csv(
            handle, na_values=["?"], keep_default_na=False, low_memory=False
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{source} is malformed ({exc}); fetch it again") from exc


def _read_zip(path: Path) -> pd.DataFrame:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            member = next(
                (n for n in names if n == CSV_MEMBER or n.endswith("/" + CSV_NAME)
                 or n == CSV_NAME),
                None,
            )
            if member is None:
                raise DataError(
                    f"{path} does not contain {CSV_MEMBER} (found {names[:5]}); "
                    f"is it the Diabetes 130 zip? {_HOW_TO_GET}"
                )
            with archive.open(member) as handle:
                return _read_csv(handle, f"{path}:{member}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(
            f"{path} is truncated or corrupt ({exc}); delete it and {_HOW_TO_GET}"
        ) from exc


def _check(frame: pd.DataFrame, source: str, expected_rows: int | None) -> None:
    """Checks columns, the last line and the row count, in that order."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{source} lacks expected column(s) {missing}; it is not the official "
            f"Diabetes 130 file; {_HOW_TO_GET}"
        )

    # A file cut mid-line parses with the tail of its last row missing.
    bad = ~frame["readmitted"].isin(READMITTED_VALUES)
    if bad.any():
        first = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{source} is truncated or malformed: row {first + 2} has readmitted="
            f"{frame['readmitted'].iloc[first]!r}, expected one of "
            f"{READMITTED_VALUES}; fetch it again"
        )

    if expected_rows is not None and len(frame) != expected_rows:
        problem = "truncated" if len(frame) < expected_rows else "not the official file"
        raise DataError(
            f"{source} has {len(frame):,} rows, expected {expected_rows:,} "
            f"({problem}); fetch it again"
        )


def load_raw(
    path: str | os.PathLike | None = None, *, expected_rows: int | None = EXPECTED_ROWS
) -> pd.DataFrame:
    """Reads the Diabetes 130 encounters as one row per encounter.

    path: see `resolve_path`; ``None`` reads ``$MEDFED_DATA_DIR``.
    expected_rows: the row count to insist on (``None`` skips that check, for
        deliberate subsets).
    Returns the 50 columns as parsed by pandas; ``?`` becomes missing, the
    string ``"None"`` (no test done) is kept as a value.
    Raises DataError for a missing file, a truncated or corrupt file, or
    missing columns, naming the problem.
    """
    source = resolve_path(path)

    if zipfile.is_zipfile(source) or source.suffix.lower() == ".zip":
        frame = _read_zip(source)
    else:
        with open(source, "rb") as handle:
            frame = _read_csv(handle, str(source))

    _check(frame, str(source), expected_rows)
    log.info("loaded %s: %d encounters, %d patients", source, len(frame),
             frame["patient_nbr"].nunique())
    return frame


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Returns the hex sha256 of a file, read in chunks of ``chunk`` bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


DOWNLOAD_MAX_SECONDS = 600.0


class DownloadInterrupted(DataError):
    """The process got SIGTERM during ``fetch``; the partial file was removed."""


@contextmanager
def _sigterm_raises(url: str) -> Iterator[None]:
    """Turns SIGTERM into ``DownloadInterrupted`` so cleanup code runs.

    Only in the main thread (Python delivers signals there); elsewhere the
    handler is left alone and a SIGTERM ends the process without cleanup.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise DownloadInterrupted(
            f"download of {url} stopped by SIGTERM; the partial file was removed")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM,
                      previous if previous is not None else signal.SIG_DFL)


def _prepare_dest(dest: Path) -> None:
    """Creates ``dest``; DataError when it is a file or cannot be made."""
    if dest.exists() and not dest.is_dir():
        raise DataError(
            f"destination {dest} is an existing file, not a folder: give a folder "
            f"to write {ZIP_NAME} into")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create destination folder {dest}: {exc}") from exc


def fetch(
    dest_dir: str | os.PathLike,
    url: str = OFFICIAL_URL,
    timeout: float = 60,
    *,
    sha256: str = ZIP_SHA256,
    max_seconds: float = DOWNLOAD_MAX_SECONDS,
) -> Path:
    """Downloads the official zip into ``dest_dir/dataset_diabetes.zip``.

    timeout: seconds allowed for connecting and for each read.
    max_seconds: seconds allowed for the whole download (default 600; the
    official zip is 3.3 MB). The deadline is checked between reads, so a
    download stops at most ``timeout`` seconds after it.
    The bytes go to a temporary file in ``dest_dir``, which is renamed over
    the destination only after its sha256 equals ``sha256``; a mismatch, a
    network error, the deadline, Ctrl-C or SIGTERM (in the main thread)
    deletes the partial file, so a complete file is never replaced by a bad
    one. Returns the path of the zip.
    Raises DataError naming the expected and received hashes on mismatch, the
    URL and the reason when the download fails or runs out of time, and the
    path when ``dest_dir`` is an existing file.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    dest = Path(dest_dir).expanduser()
    _prepare_dest(dest)
    target = dest / ZIP_NAME
    deadline = time.monotonic() + max_seconds

    with _sigterm_raises(url):
        fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=dest)
        tmp = Path(tmp_name)
        try:
            got, size = _download(url, fd, min(timeout, max_seconds), deadline,
                                  max_seconds)
            if got != sha256:
                raise DataError(
                    f"download of {url} has sha256 {got} ({size:,} bytes), expected "
                    f"{sha256}; the file was discarded. Retry, or check the URL"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    log.info("fetched %s to %s (%d bytes, sha256 ok)", url, target, size)
    return target


def _download(url: str, fd: int, timeout: float, deadline: float,
              max_seconds: float) -> tuple[str, int]:
    """Streams ``url`` into the open file ``fd`` (closed here) until EOF.

    Returns (sha256 hex, bytes). Raises DataError on a network error or
    when ``time.monotonic()`` passes ``deadline``.
    """
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                # read1 returns what has arrived, so a trickling server cannot
                # hold one read (and the deadline check) for long.
                read = getattr(response, "read1", response.read)
                while block := read(1 << 16):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
                    if time.monotonic() > deadline:
                        raise DataError(
                            f"download of {url} took longer than {max_seconds:g} s "
                            f"({size:,} bytes received); the partial file was "
                            "removed. Retry on a faster connection, or allow more "
                            "time (--max-seconds)")
        except OSError as exc:
            raise DataError(f"download of {url} failed: {exc}") from exc
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size

"""Diabetes 130 loader and download: good files load, bad files fail by name."""

from __future__ import annotations

import functools
import http.server
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from clinical import diabetes130
from clinical.errors import DataError
from cluster import cli


@pytest.fixture(scope="module")
def csv_lines(diabetes_zip) -> list[bytes]:
    with zipfile.ZipFile(diabetes_zip) as archive:
        return archive.read(diabetes130.CSV_MEMBER).splitlines(keepends=True)


def test_zip_loads_with_expected_shape(diabetes_zip):
    frame = diabetes130.load_raw(diabetes_zip)

    assert frame.shape == (diabetes130.EXPECTED_ROWS, 50)
    assert tuple(frame.columns) == diabetes130.COLUMNS
    assert frame["patient_nbr"].nunique() == diabetes130.EXPECTED_PATIENTS
    # "None" means "test not done" and must survive as a value.
    assert (frame["A1Cresult"] == "None").sum() > 80_000
    assert frame["race"].isna().sum() > 0


def test_folder_and_env_resolve_to_the_zip(diabetes_zip, monkeypatch):
    assert diabetes130.resolve_path(diabetes_zip.parent) == diabetes_zip

    monkeypatch.setenv("MEDFED_DATA_DIR", str(diabetes_zip.parent))
    assert diabetes130.resolve_path(None) == diabetes_zip


def test_csv_in_folder_loads(tmp_path, csv_lines):
    (tmp_path / "diabetic_data.csv").write_bytes(b"".join(csv_lines))

    frame = diabetes130.load_raw(tmp_path)

    assert len(frame) == diabetes130.EXPECTED_ROWS


def test_missing_file_says_how_to_fetch(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="medfed data fetch") as err:
        diabetes130.load_raw(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)

    monkeypatch.delenv("MEDFED_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="MEDFED_DATA_DIR"):
        diabetes130.load_raw(None)

    with pytest.raises(DataError, match="neither"):
        diabetes130.load_raw(tmp_path)


def test_csv_with_fewer_rows_is_truncated(tmp_path, csv_lines):
    path = tmp_path / "diabetic_data.csv"
    path.write_bytes(b"".join(csv_lines[:5001]))

    with pytest.raises(DataError, match="truncated") as err:
        diabetes130.load_raw(path)
    assert "5,000 rows" in str(err.value)


def test_csv_cut_mid_line_is_malformed(tmp_path, csv_lines):
    path = tmp_path / "diabetic_data.csv"
    body = b"".join(csv_lines)
    path.write_bytes(body[: len(body) - 40])

    with pytest.raises(DataError, match="truncated or malformed"):
        diabetes130.load_raw(path)


def test_missing_column_is_named(tmp_path, csv_lines):
    path = tmp_path / "diabetic_data.csv"
    cut = [b",".join(p for i, p in enumerate(line.rstrip(b"\n").split(b","))
                     if i != 22) + b"\n" for line in csv_lines[:2001]]
    path.write_bytes(b"".join(cut))

    with pytest.raises(DataError, match=r"\['max_glu_serum'\]"):
        diabetes130.load_raw(path)


def test_truncated_zip_is_reported(tmp_path, diabetes_zip):
    path = tmp_path / "dataset_diabetes.zip"
    path.write_bytes(diabetes_zip.read_bytes()[:1_000_000])

    with pytest.raises(DataError, match="truncated or corrupt"):
        diabetes130.load_raw(path)


def test_zip_with_flipped_byte_fails_crc(tmp_path, diabetes_zip):
    data = bytearray(diabetes_zip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "dataset_diabetes.zip"
    path.write_bytes(bytes(data))

    with pytest.raises(DataError, match="truncated or corrupt|malformed"):
        diabetes130.load_raw(path)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path, diabetes_zip):
    """A loopback HTTP server with a good and a corrupted copy of the zip."""
    root = tmp_path / "served"
    root.mkdir()
    shutil.copyfile(diabetes_zip, root / "good.zip")
    data = bytearray(diabetes_zip.read_bytes())
    data[1000] ^= 0x01
    (root / "corrupt.zip").write_bytes(bytes(data))

    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_fetch_keeps_a_verified_download(tmp_path, served):
    dest = tmp_path / "dest"

    path = diabetes130.fetch(dest, url=f"{served}/good.zip", timeout=10)

    assert path == dest / "dataset_diabetes.zip"
    assert path.stat().st_size == diabetes130.ZIP_BYTES
    assert diabetes130.sha256_of(path) == diabetes130.ZIP_SHA256
    assert [p.name for p in dest.iterdir()] == ["dataset_diabetes.zip"]
    assert len(diabetes130.load_raw(dest)) == diabetes130.EXPECTED_ROWS


def test_fetch_discards_a_corrupted_download(tmp_path, served):
    dest = tmp_path / "dest"

    with pytest.raises(DataError) as err:
        diabetes130.fetch(dest, url=f"{served}/corrupt.zip", timeout=10)

    message = str(err.value)
    corrupt_sha = diabetes130.sha256_of(tmp_path / "served" / "corrupt.zip")
    assert diabetes130.ZIP_SHA256 in message
    assert corrupt_sha in message
    assert list(dest.iterdir()) == []


def test_fetch_mismatch_leaves_a_good_file_in_place(tmp_path, served):
    dest = tmp_path / "dest"
    diabetes130.fetch(dest, url=f"{served}/good.zip", timeout=10)

    with pytest.raises(DataError):
        diabetes130.fetch(dest, url=f"{served}/corrupt.zip", timeout=10)

    kept = diabetes130.sha256_of(dest / "dataset_diabetes.zip")
    assert kept == diabetes130.ZIP_SHA256
    assert [p.name for p in dest.iterdir()] == ["dataset_diabetes.zip"]


def test_fetch_of_missing_url_is_a_data_error(tmp_path, served):
    dest = tmp_path / "dest"

    with pytest.raises(DataError, match="404"):
        diabetes130.fetch(dest, url=f"{served}/absent.zip", timeout=10)
    assert list(dest.iterdir()) == []


def test_cli_fetch_and_info(tmp_path, served, capsys):
    dest = tmp_path / "cli"

    assert cli.main(["data", "fetch", "--dest", str(dest),
                     "--url", f"{served}/good.zip"]) == 0
    assert cli.main(["data", "info", "--data", str(dest)]) == 0

    out = capsys.readouterr().out
    assert "sha256 verified" in out
    assert "101,766" in out and "71,518" in out
    assert "readmit30" in out and "0.1116" in out


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    assert cli.main(["data", "info", "--data", str(tmp_path / "absent")]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "medfed data fetch" in err[0]


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    """Promises 100,000 bytes and sends one byte every 50 ms, for up to 20 s."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(400):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass  # the client gave up, as it should

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def trickle():
    """A loopback HTTP server that sends its body one byte at a time."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrickleHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.zip"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_fetch_stops_a_trickling_download_at_the_deadline(tmp_path, trickle):
    dest = tmp_path / "dest"
    started = time.monotonic()

    with pytest.raises(DataError, match="took longer than 1 s") as err:
        diabetes130.fetch(dest, url=trickle, timeout=5, max_seconds=1)

    assert time.monotonic() - started < 4
    assert "bytes received" in str(err.value)
    assert list(dest.iterdir()) == []


def test_cli_fetch_max_seconds_is_one_line(tmp_path, trickle, capsys):
    code = cli.main(["data", "fetch", "--dest", str(tmp_path / "d"), "--url", trickle,
                     "--max-seconds", "0.5"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "took longer than 0.5 s" in err[0]
    assert list((tmp_path / "d").iterdir()) == []


def test_fetch_into_an_existing_file_names_the_path(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("a file, not a folder\n")

    code = cli.main(["data", "fetch", "--dest", str(path), "--url",
                     "http://127.0.0.1:9/unused.zip"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"destination {path} is an existing file, not a folder" in err[0]
    assert path.read_text() == "a file, not a folder\n"


def test_sigterm_during_fetch_removes_the_partial_file(tmp_path, trickle):
    dest = tmp_path / "dest"
    dest.mkdir()
    script = ("import sys; from clinical import diabetes130; "
              "diabetes130.fetch(sys.argv[1], url=sys.argv[2], timeout=5, "
              "max_seconds=30)")
    child = subprocess.Popen([sys.executable, "-c", script, str(dest), trickle],
                             stderr=subprocess.PIPE, text=True)
    try:
        give_up = time.monotonic() + 20
        while not list(dest.glob(".download-*.part")):
            assert child.poll() is None and time.monotonic() < give_up
            time.sleep(0.05)
        time.sleep(0.2)  # some bytes are in the part file by now

        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert "DownloadInterrupted" in err and "stopped by SIGTERM" in err
    assert list(dest.iterdir()) == []

"""Text from a relay, stored or printed: the key masked in any encoding, no terminal control (issue 25, items 1-3).

The hostile relay (tests/hostile_server.py, a real server on loopback) echoes the key with some characters
JSON-`\\u`-escaped, HTML-entity- or %-encoded, in any case, and sends escape sequences that would retitle,
clear or recolour a terminal. Every file a run leaves and every stream it prints is read back decoded and
searched for any run of FRAGMENT_CHARS characters of the key.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import polars as pl
import pytest
from conftest import TEST_KEY, run_here, write_csv, write_job
from test_hostile_relay import Hostile, run_shape

from batchrun.base.redaction import FRAGMENT_CHARS, redact, register_secret

sys.path.insert(0, str(Path(__file__).parent))
from hostile_server import ENTITY_KEY, ESCAPED_KEY, PERCENT_KEY, TERMINAL_TRICKS  # noqa: E402

_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


def decoded(text: str) -> str:
    """`text` read as a person or a browser would: escapes, entities and %-encoding undone, twice over."""
    for _ in range(2):
        text = html.unescape(unquote(_JSON_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)))
    return text.lower()


def assert_no_key_piece(text: str, where: object) -> None:
    plain, key = decoded(text), TEST_KEY.lower()
    for i in range(len(key) - FRAGMENT_CHARS + 1):
        assert key[i : i + FRAGMENT_CHARS] not in plain, f"{where}: {key[i : i + FRAGMENT_CHARS]!r}"


def assert_no_key_piece_anywhere(folder: Path, *results: subprocess.CompletedProcess[str]) -> None:
    for result in results:
        assert_no_key_piece(result.stdout + result.stderr, result.args)
    for path in folder.rglob("*"):
        if path.is_file():
            assert_no_key_piece(path.read_bytes().decode("latin-1"), path)
            if path.suffix == ".parquet":
                frame = pl.read_parquet(path).select(pl.all().cast(pl.String))
                assert_no_key_piece(frame.write_csv(), path)


def test_masking_reads_json_escapes_entities_and_percent_encoding_in_any_case() -> None:
    register_secret(TEST_KEY)
    for form in (ESCAPED_KEY, ESCAPED_KEY.lower(), ENTITY_KEY, ENTITY_KEY.upper(), PERCENT_KEY, PERCENT_KEY.lower()):
        assert redact(f"token {form} rejected") == "token *** rejected"
    nested = "%5Cu0073" + TEST_KEY[1:]  # a %-encoded backslash before `u0073`
    assert redact(f"a {nested} b") == "a *** b"
    ordinary = "50% off & free: C:\\temp\\u and &amp; %41"
    assert redact(ordinary) == ordinary


def test_an_encoded_key_in_an_answer_or_an_error_is_masked_everywhere(tmp_path: Path, hostile: Hostile) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "error").mkdir()
    row, first = run_shape(tmp_path / "ok", hostile, "encoded_key_in_answer")
    assert row["status"] == "ok" and row["response_text"] == "*** *** ***" and row["model"] == "***"
    report = run_here("report", str(tmp_path / "ok" / "job.yaml"))
    assert report.returncode == 0, report.stderr
    assert_no_key_piece_anywhere(tmp_path / "ok", first, report)
    row, first = run_shape(tmp_path / "error", hostile, "error_with_escaped_key")
    assert row["status"] == "error" and "***" in row["error"]
    report = run_here("report", str(tmp_path / "error" / "job.yaml"))
    assert_no_key_piece_anywhere(tmp_path / "error", first, report)


def test_a_relay_error_that_stops_the_run_prints_no_key_and_no_terminal_control(
    tmp_path: Path, hostile: Hostile
) -> None:
    rows = [[f"R{i}", f"row {i} [[shape: error_with_escaped_key]]"] for i in range(20)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = write_job(tmp_path, hostile.url, run={"concurrency": 1, "max_attempts": 2, "timeout_s": 10})
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 3, result.stderr
    assert "FAKE ok" in result.stderr and not _CONTROL.search(result.stderr), repr(result.stderr)
    status = run_here("status", str(job))
    assert not _CONTROL.search(status.stdout + status.stderr)
    assert_no_key_piece_anywhere(tmp_path, result, status)


def test_models_prints_no_key_and_no_terminal_control(hostile: Hostile) -> None:
    result = run_here("models", "--base-url", hostile.url, "--api-key-env", "TEST_RELAY_KEY")
    assert result.returncode == 0, result.stderr
    assert_no_key_piece(result.stdout + result.stderr, "models")
    assert not _CONTROL.search(result.stdout), repr(result.stdout)
    lines = result.stdout.splitlines()
    assert "gpt-5.4" in lines and "***" in lines and len(lines) == len(set(lines))
    assert TERMINAL_TRICKS not in result.stdout and any("FAKE ok" in line for line in lines)

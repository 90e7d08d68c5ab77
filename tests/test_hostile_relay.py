"""Whatever the relay answers, nothing is lost and nothing is paid twice (issue 12).

A hostile relay (tests/hostile_server.py, a real server process on loopback) answers one
row with an odd shape and the others normally. For each shape: no traceback, every row
once in input order, the odd row ok or the specified error row, the normal rows ok, and a
rerun sends zero requests (counted at the server).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import REPO, assert_finished, assert_key_nowhere, cli_env, die_with_parent, run_here, write_csv, write_job

ROWS = 5
ODD = 3  # the odd row comes after normal ones: a malformed answer before any success would stop the run (rule C)


class Hostile:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "hostile_server.py")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            preexec_fn=die_with_parent,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert "listening on" in line, line
        self.url = line.split("listening on ", 1)[1].strip()

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/_stats", timeout=10) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


def run_shape(tmp_path: Path, hostile: Hostile, shape: str, **overrides: Any) -> tuple[pl.DataFrame, Any]:
    """Runs a job whose row ODD asks for `shape`; checks the promises every shape shares; returns the output."""
    rows = [[f"R{i}", f"row {i}" + (f" [[shape: {shape}]]" if i == ODD else "")] for i in range(1, ROWS + 1)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    run = {"concurrency": 1, "max_attempts": 2, "timeout_s": 10, **overrides.pop("run", {})}
    job = write_job(tmp_path, hostile.url, run=run, **overrides)
    first = run_here("run", str(job), "--quiet", timeout=180)
    assert "Traceback" not in first.stderr, first.stderr
    assert_finished(first, tmp_path / "out" / "result.parquet")
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["review_id"].to_list() == [f"R{i}" for i in range(1, ROWS + 1)]
    normal = out.filter(pl.col("review_id") != f"R{ODD}")
    assert normal["status"].to_list() == ["ok"] * (ROWS - 1)
    before = hostile.stats().get("total", 0)
    again = run_here("run", str(job), "--quiet", timeout=60)
    assert_finished(again, tmp_path / "out" / "result.parquet")
    assert hostile.stats().get("total", 0) == before, "the rerun sent requests"
    assert_key_nowhere(tmp_path, first, again)
    return out.row(ODD - 1, named=True), first


@pytest.mark.parametrize("shape", ["usage_float", "usage_string", "usage_negative", "usage_huge", "usage_not_object"])
def test_odd_usage_is_null_with_a_note(tmp_path: Path, hostile: Hostile, shape: str) -> None:
    row, _ = run_shape(tmp_path, hostile, shape, pricing={"input_per_million": 1, "output_per_million": 1})
    assert row["status"] == "ok" and row["response_text"] == '"fine"'
    assert row["prompt_tokens"] is None or row["prompt_tokens"] >= 0
    assert row["cost"] is None or row["cost"] >= 0
    assert "usage" in row["error"] and "null" in row["error"]


@pytest.mark.parametrize(
    "shape",
    ["choices_null", "choices_object", "content_list", "message_string", "finish_list", "model_object", "no_fields"],
)
def test_malformed_shapes_are_malformed_rows(tmp_path: Path, hostile: Hostile, shape: str) -> None:
    row, _ = run_shape(tmp_path, hostile, shape)
    assert row["status"] == "error" and row["error_class"] == "malformed", row
    assert row["attempts"] == 2  # retried like any malformed answer


def test_deeply_nested_json_is_schema_invalid(tmp_path: Path, hostile: Hostile) -> None:
    row, _ = run_shape(tmp_path, hostile, "deep_json", output={"path": "out/result.parquet", "parse": "json"})
    assert row["error_class"] == "schema_invalid" and "nested deeper" in row["error"]


def test_the_key_is_masked_in_answers_and_cut_excerpts(tmp_path: Path, hostile: Hostile) -> None:
    row, _ = run_shape(tmp_path, hostile, "key_in_answer")
    assert row["status"] == "ok" and "***" in row["response_text"] and row["model"] == "***"
    (tmp_path / "out").rename(tmp_path / "first")
    row, _ = run_shape(tmp_path, hostile, "error_with_key")
    assert row["error_class"] == "server" and "***" in row["error"]


def test_an_unexpected_exception_is_the_rows_internal_error(tmp_path: Path, hostile: Hostile) -> None:
    """Injected for real: the odd row's answer holds an image, and images_dir is a file, so saving it fails."""
    (tmp_path / "not_a_folder").write_text("a file where the images folder should be")
    output = {"path": "out/result.parquet", "images_dir": "not_a_folder"}
    row, _ = run_shape(tmp_path, hostile, "markdown_image", output=output)
    assert row["status"] == "error" and row["error_class"] == "internal"
    assert row["error"].startswith("internal: FileExistsError")


def test_invalid_utf8_is_read_alike_streamed_or_not(tmp_path: Path, hostile: Hostile) -> None:
    whole, _ = run_shape(tmp_path, hostile, "bad_utf8")
    (tmp_path / "out").rename(tmp_path / "whole")
    streamed, _ = run_shape(tmp_path, hostile, "bad_utf8", stream=True)
    assert whole["status"] == streamed["status"] == "ok"
    assert whole["response_text"] == streamed["response_text"] == "caf\ufffd ok \ufffd"


@pytest.mark.parametrize(
    ("shape", "error_class", "stream"),
    [
        ("huge_json", "too_large", False),
        ("endless_data", "too_large", True),
        ("endless_line", "too_large", True),
        ("endless_pings", "timeout", True),
    ],
)
def test_endless_and_huge_answers_end_as_error_rows(
    tmp_path: Path, hostile: Hostile, shape: str, error_class: str, stream: bool
) -> None:
    run = {"max_answer_mb": 1, "answer_timeout_s": 1 if error_class == "timeout" else 3}  # pings come every 0.2 s
    row, _ = run_shape(tmp_path, hostile, shape, stream=stream, run=run)
    assert row["status"] == "error" and row["error_class"] == error_class, row


def _peak_rss_mb(process: subprocess.Popen[str]) -> float:
    """Peak RSS of a running process, from the kernel (VmHWM), polled until it exits."""
    import time

    peak = 0.0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except FileNotFoundError:
            break
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) / 1024)
        time.sleep(0.05)
    return peak


def test_a_long_stream_counts_what_is_kept_not_what_is_sent(tmp_path: Path, hostile: Hostile) -> None:
    row, _ = run_shape(tmp_path, hostile, "chatty_stream", stream=True, run={"max_answer_mb": 1})
    assert row["status"] == "ok" and row["response_text"] == "z" * 30_000


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["endless_data", "endless_line"])
def test_memory_stays_bounded_while_64_endless_answers_arrive(tmp_path: Path, hostile: Hostile, shape: str) -> None:
    rows = [[f"R{i}", f"row {i} [[shape: {shape}]]"] for i in range(64)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    run = {"concurrency": 64, "max_attempts": 1, "timeout_s": 10, "max_answer_mb": 4}
    job = write_job(tmp_path, hostile.url, stream=True, run=run)
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(job), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    peak = _peak_rss_mb(process)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 5 and "Traceback" not in stderr, stderr  # every row too_large: finished, rows failed
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["error_class"].to_list() == ["too_large"] * 64
    print(f"peak RSS with 64 endless answers ({shape}): {peak:.0f} MB")
    assert peak < 800, f"peak RSS {peak:.0f} MB"


def test_the_emulator_plays_the_hostile_shapes_as_named_faults(tmp_path: Path, emulator: Any) -> None:
    faults = {"usage-float": "ok", "choices-null": "malformed", "content-list": "malformed", "endless": "too_large"}
    rows = [["R0", "a normal row"]] + [[name, f"[[emulator: {name}]]"] for name in faults]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    run = {"concurrency": 1, "max_attempts": 2, "timeout_s": 10, "max_answer_mb": 2}
    job = write_job(tmp_path, emulator.url, run=run)
    result = run_here("run", str(job), "--quiet")
    assert "Traceback" not in result.stderr, result.stderr
    assert_finished(result, tmp_path / "out" / "result.parquet")
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    got = {r["review_id"]: r["error_class"] or r["status"] for r in out.iter_rows(named=True)}
    assert got == {"R0": "ok", **faults}
    assert out.filter(pl.col("review_id") == "usage-float")["prompt_tokens"].to_list() == [None]


def test_outage_timeout_keeps_its_word_in_a_storm_of_503s(tmp_path: Path) -> None:
    """503s halve the concurrency and pause ever longer; the breaker took minutes to open and the run never stopped."""
    import time

    from conftest import REVIEWS, start_emulator, stop_emulator

    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "stars"], REVIEWS)
    down = start_emulator("--fault", "503=1.0")
    try:
        run = {"concurrency": 8, "max_attempts": 5, "timeout_s": 30, "outage_timeout_s": 3}
        job = write_job(tmp_path, down.url, run=run)
        started = time.monotonic()
        result = run_here("run", str(job), "--quiet", timeout=120)
        took = time.monotonic() - started
    finally:
        stop_emulator(down)
    assert result.returncode == 3 and "every request failed for 3 s" in result.stderr, result.stderr
    assert took < 3 + 10, f"stopped after {took:.0f} s"

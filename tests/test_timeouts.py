"""docs/protocol.md §6.4 timeouts over loopback: a whole answer within run.timeout_s; a stream
has no total cap, only run.timeout_s between bytes."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from conftest import assert_finished, run_here, start_emulator, stop_emulator, write_csv, write_job


def _run(tmp_path: Path, emulator_args: list[str], text: str, stream: bool) -> pl.DataFrame:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], [["R1", text]])
    emulator = start_emulator(*emulator_args)
    try:
        job = write_job(tmp_path, emulator.url, stream=stream, run={"max_attempts": 1, "timeout_s": 0.5})
        result = run_here("run", str(job), "--quiet")
    finally:
        stop_emulator(emulator)
    assert_finished(result, tmp_path / "out" / "result.parquet")
    return pl.read_parquet(tmp_path / "out" / "result.parquet")


def test_a_whole_answer_later_than_timeout_s_is_a_timeout(tmp_path: Path) -> None:
    row = _run(tmp_path, ["--latency-ms", "1500"], "Slow kettle.", stream=False).row(0, named=True)
    assert row["status"] == "error" and row["error_class"] == "timeout"
    assert "no complete answer within 0.5 s" in row["error"]


def test_a_stream_quiet_for_longer_than_timeout_s_is_a_timeout(tmp_path: Path) -> None:
    row = _run(tmp_path, ["--stall-ms", "1500"], "Stalls. [[emulator: stall]]", stream=True).row(0, named=True)
    assert row["status"] == "error" and row["error_class"] == "timeout"


def test_a_stream_longer_than_timeout_s_in_total_but_never_quiet_succeeds(tmp_path: Path) -> None:
    # 14 events 150 ms apart: about 2 s in all, never 0.5 s without a byte.
    args = ["--chunk-delay-ms", "150", "--stream-pieces", "10", "--ping-ms", "0"]
    row = _run(tmp_path, args, "A long, slow, steady answer.", stream=True).row(0, named=True)
    assert row["status"] == "ok" and row["latency_s"] > 1.0

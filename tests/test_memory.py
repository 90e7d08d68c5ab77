"""Promise 5, bounded memory: peak RSS of `batchrun run` does not grow with the input's rows.

The CLI runs as a real child process against the emulator; its peak RSS comes from
the kernel. Each job resumes with all but 500 rows done, so every input row is
read, checked against the checkpoint and written to the output, and 500 are sent.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import polars as pl
import pytest
from conftest import Emulator

from batchrun.bench import throughput as bench
from batchrun.flow.limits import Limits
from batchrun.job import inputs
from batchrun.job.inputs import ROW_INDEX, InputTable


@pytest.mark.slow
def test_peak_memory_of_500k_rows_is_within_1_1x_of_10k_rows(tmp_path: Path, emulator: Emulator) -> None:
    """This process has imported polars, so the CLI inherits polars' allocator defaults, as under `batchrun bench`
    (with them, freed pages kept for 1.5 s made it 1.12x here, and 1.27x at 10 M rows: docs/memory.md)."""
    small = bench.resume_peak_rss_mb(tmp_path / "small", 10_000, 500, emulator.url)
    large = bench.resume_peak_rss_mb(tmp_path / "large", 500_000, 500, emulator.url)
    assert large <= 1.1 * small, f"10k rows: {small:.0f} MB, 500k rows: {large:.0f} MB"
    assert emulator.stats()["requests"] == 1000  # the finished rows were not requested again


def _read_all(path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> pl.DataFrame:
    monkeypatch.setattr(inputs, "BLOCK_BYTES", block_bytes)
    table = InputTable(str(path), None, path.with_name("job.yaml"))
    return pl.concat(list(table.batches(batch_rows=3))).drop(ROW_INDEX)


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1 << 20])
def test_csv_read_in_blocks_equals_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    path = tmp_path / "quoted.csv"
    path.write_bytes(
        b'id,text,n\r\n1,"two\nlines, and a comma",3\r\n2,"say ""hi""\n\nthen leave",4\r\n'
        b'3,plain,\r\n4,"",6\r\n5,"ends with a newline\n",7\r\n'
    )
    assert _read_all(path, monkeypatch, block_bytes).equals(pl.read_csv(path))


@pytest.mark.parametrize("block_bytes", [1, 13, 1 << 20])
def test_jsonl_read_in_blocks_equals_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"id": 1, "text": "a \\"quoted\\" line\\nand more"}\n{"id": 2, "text": "{}"}\n\n{"id": 3, "text": null}\n'
    )
    assert _read_all(path, monkeypatch, block_bytes).equals(pl.read_ndjson(path))


def test_parquet_glob_is_read_in_file_order_with_a_limit(tmp_path: Path) -> None:
    for i in range(3):
        pl.DataFrame({"n": list(range(i * 10, i * 10 + 10))}).write_parquet(tmp_path / f"part-{i}.parquet")
    table = InputTable(str(tmp_path / "part-*.parquet"), None, tmp_path / "job.yaml")
    rows = pl.concat(list(table.batches(limit=25, batch_rows=4)))
    assert rows["n"].to_list() == list(range(25)) and rows[ROW_INDEX].to_list() == list(range(25))


def test_the_limiter_keeps_a_minute_of_starts_in_8_bytes_each() -> None:
    """The limiter remembers the last minute or so of starts (a window learned mid-run counts them). At a fast
    relay that is hundreds of thousands of starts: as float objects in a deque and a list they took ~40 bytes
    each, the largest thing a large run held (3 M rows resumed: 218 vs 209 MB peak)."""
    limits = Limits(concurrency=64)
    now = 1000.0
    limits._clock = lambda: now
    starts = 120_000  # a minute at 2,000 requests/s
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(starts):
            now += 60 / starts
            ticket = limits.start_now(1, retry=False)
            assert ticket is not None
            limits.succeeded(ticket, None)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / starts <= 24, f"{held / starts:.1f} bytes a start"  # two arrays of 8: ~18 with their slack

"""The Python API's hard edges: frames that cannot become a table are one-line JobErrors, and one Ctrl-C stops
`batchrun.run()` called inside `asyncio.run()` (a real process, a real SIGINT)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from conftest import Emulator, cli_env, start_emulator, stop_emulator

import batchrun


def _job(url: str) -> dict[str, Any]:
    return {
        "name": "frames",
        "input": {"id_column": "review_id"},
        "provider": {"base_url": url, "api_key_env": "TEST_RELAY_KEY"},
        "model": "gpt-5.4",
        "prompt": {"user": "Review: {{ text }}"},
        "output": {"path": "out/labels.parquet"},
    }


class _Thing:
    """A Python object in a pandas object column: no table type for it."""


@pytest.mark.parametrize(
    "frame,column",
    [
        (pd.DataFrame({"review_id": [1, "R2"], "text": ["fine", "bad"]}), "review_id"),  # mixed id types
        (pd.DataFrame({"review_id": ["R1", "R2"], "text": [_Thing(), _Thing()]}), "text"),  # Python objects
        (pd.DataFrame({"review_id": ["R1", "R2"], "text": [1.5, "bad"]}), "text"),
        (pd.DataFrame({"review_id": ["R1", "R2"], "text": [1 + 2j, 3j]}), "text"),
    ],
)
def test_a_frame_that_cannot_be_a_table_is_one_line_naming_its_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulator: Emulator, frame: pd.DataFrame, column: str
) -> None:
    monkeypatch.chdir(tmp_path)
    for call in (batchrun.validate, batchrun.run):
        with pytest.raises(batchrun.JobError) as raised:
            call(_job(emulator.url), frame)
        message = str(raised.value)
        assert message.startswith(f"input: column {column!r} cannot be read as one typed column (")
        assert "\n" not in message and ".astype(str)" in message
    assert emulator.stats()["requests"] == 0


def test_an_arrow_table_is_converted_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulator: Emulator
) -> None:
    monkeypatch.chdir(tmp_path)
    table = pa.table({"review_id": ["R1", "R2"], "text": ["fine", "bad"]})
    assert batchrun.validate(_job(emulator.url), table).rows == 2


CELL = """
import asyncio, sys
import polars as pl
import batchrun

job = {
    "name": "ctrl-c", "input": {"id_column": "review_id"},
    "provider": {"base_url": sys.argv[1], "api_key_env": "TEST_RELAY_KEY"}, "model": "gpt-5.4",
    "prompt": {"user": "Review: {{ text }}"}, "output": {"path": "out/labels.parquet"},
}
frame = pl.DataFrame({"review_id": [f"S{i:03d}" for i in range(60)], "text": [f"Review {i}" for i in range(60)]})

async def cell() -> None:
    batchrun.run(job, input=frame, concurrency=2, quiet=True)

try:
    asyncio.run(cell())
    print("finished", flush=True)
except batchrun.RunInterrupted as e:
    print(f"interrupted {e.done}", flush=True)
"""


@pytest.mark.slow
def test_one_ctrl_c_stops_run_inside_asyncio_run(tmp_path: Path) -> None:
    slow = start_emulator("--latency-ms", "300")
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", CELL, slow.url],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while slow.stats()["requests"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # once
        out, err = process.communicate(timeout=60)
        sent = slow.stats()["requests"]
    finally:
        stop_emulator(slow)
    assert out.startswith("interrupted"), out + err
    assert sent < 30, sent
    assert "Traceback" not in err

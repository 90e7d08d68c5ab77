"""The Python API (batchrun.run / arun / validate / status), in this process, against the emulator as a real server."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from conftest import EXPECTED_LABELS, REVIEWS, TEST_KEY, Emulator, start_emulator, stop_emulator

import batchrun


@pytest.fixture
def notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A notebook's working folder: relative paths of a dict job start here; the key is in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TEST_RELAY_KEY", TEST_KEY)
    return tmp_path


def job_dict(base_url: str, **overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "name": "notebook-job",
        "input": {"id_column": "review_id"},
        "provider": {"api": "openai-chat", "base_url": base_url, "api_key_env": "TEST_RELAY_KEY"},
        "model": "gpt-5.4",
        "prompt": {"user": "Review: {{ text }}\nAnswer positive, negative or neutral."},
        "params": {"max_completion_tokens": 20},
        "output": {"path": "out/labels.parquet"},
        "run": {"concurrency": 4},
    }
    job.update(overrides)
    return job


def reviews_frame() -> pl.DataFrame:
    return pl.DataFrame(REVIEWS, schema=["review_id", "text", "stars"], orient="row")


def assert_labelled(df: pl.DataFrame) -> None:
    assert df["review_id"].to_list() == [r[0] for r in REVIEWS]
    assert set(df["status"]) == {"ok"}
    labels = dict(zip(df["review_id"], df["response_text"]))
    assert {rid: text.strip().lower().rstrip(".") for rid, text in labels.items()} == EXPECTED_LABELS


def test_a_polars_frame_in_the_output_frame_out(notebook: Path, emulator: Emulator) -> None:
    df = batchrun.run(job_dict(emulator.url), input=reviews_frame(), quiet=True)
    assert_labelled(df)
    assert (notebook / "out" / "labels.parquet").is_file()
    assert emulator.stats()["requests"] == len(REVIEWS)
    st = batchrun.status(job_dict(emulator.url), input=reviews_frame())
    assert (st.done, st.ok, st.failed, st.pending) == (6, 6, 0, 0)
    assert st.checkpoint == notebook / "out" / "labels.parquet.batchrun"
    assert not list(notebook.glob(".*"))  # no state beside the notebook's files


def test_a_pandas_frame_and_an_arrow_table(notebook: Path, emulator: Emulator) -> None:
    frame = pd.DataFrame(REVIEWS, columns=["review_id", "text", "stars"])
    assert_labelled(batchrun.run(job_dict(emulator.url), input=frame, quiet=True))
    table = pa.Table.from_pandas(frame)
    job = job_dict(emulator.url, output={"path": "out/arrow.parquet"})
    assert_labelled(batchrun.run(job, input=table, quiet=True))


def test_rerunning_the_cell_resumes_without_a_request(notebook: Path, emulator: Emulator) -> None:
    first = batchrun.run(job_dict(emulator.url), input=reviews_frame(), quiet=True)
    emulator.reset()
    again = batchrun.run(job_dict(emulator.url), input=reviews_frame(), quiet=True)
    assert emulator.stats()["requests"] == 0
    assert again.equals(first)


def test_a_changed_frame_is_refused_like_a_changed_job(notebook: Path, emulator: Emulator) -> None:
    batchrun.run(job_dict(emulator.url), input=reviews_frame(), quiet=True)
    changed = reviews_frame().with_columns(
        pl.when(pl.col("review_id") == "R2").then(pl.lit("Lovely lid.")).otherwise(pl.col("text")).alias("text")
    )
    emulator.reset()
    with pytest.raises(batchrun.JobError, match=r"the job changed since its checkpoint .*1 of 6 finished rows"):
        batchrun.run(job_dict(emulator.url), input=changed, quiet=True)
    assert emulator.stats()["requests"] == 0
    df = batchrun.run(job_dict(emulator.url), input=changed, rerun_changed=True, quiet=True)
    assert emulator.stats()["requests"] == 1
    assert df.filter(pl.col("review_id") == "R2")["response_text"].item().lower().startswith("positive")


def test_run_works_inside_a_running_event_loop(notebook: Path, emulator: Emulator) -> None:
    """As in Jupyter, whose loop is running when a cell calls batchrun.run."""

    async def cell() -> tuple[pl.DataFrame, pl.DataFrame]:
        ran = batchrun.run(job_dict(emulator.url), input=reviews_frame(), limit=3, quiet=True)
        plan = batchrun.validate(job_dict(emulator.url), input=reviews_frame(), show=1)
        assert list(plan.requests) == ["R1"]
        awaited = await batchrun.arun(job_dict(emulator.url), input=reviews_frame(), quiet=True)
        return ran, awaited

    ran, awaited = asyncio.run(cell())
    assert ran.height == 3
    assert_labelled(awaited)
    assert emulator.stats()["requests"] == len(REVIEWS)  # the awaited run resumed the first three


def test_validate_returns_the_plan_and_sends_nothing(notebook: Path, emulator: Emulator) -> None:
    plan = batchrun.validate(job_dict(emulator.url), input=reviews_frame())
    assert (plan.rows, plan.columns) == (6, ["review_id", "text", "stars"])
    assert "I love this kettle" in plan.requests["R1"]
    assert plan.estimate.rows == 6 and plan.estimate_lines[0].startswith("estimate for 6 rows")
    assert emulator.stats()["requests"] == 0


def test_errors_are_typed_one_line_and_never_system_exit(notebook: Path, emulator: Emulator) -> None:
    with pytest.raises(batchrun.JobError, match=r"<job dict>: prompt.user: the template uses 'missing'") as bad:
        batchrun.run(job_dict(emulator.url, prompt={"user": "{{ missing }}"}), input=reviews_frame())
    assert "\n" not in str(bad.value)
    with pytest.raises(batchrun.JobError, match="missing key 'input.path'"):
        batchrun.run(job_dict(emulator.url))
    with pytest.raises(batchrun.JobError, match="input: expected a polars or pandas DataFrame"):
        batchrun.run(job_dict(emulator.url), input=[1, 2])  # type: ignore[arg-type]
    auth = batchrun.run  # a refused key stops the run: RunAborted, the CLI's exit 3
    with pytest.raises(batchrun.RunAborted, match="the API key was refused"):
        refused = job_dict(emulator.url, prompt={"user": "{{ text }} [[emulator: 401]]"}, run={"concurrency": 1})
        auth(refused, input=reviews_frame(), quiet=True)
    assert emulator.stats()["requests"] == 3  # rule B: three refusals in a row, one at a time (more may be in flight)
    assert set(batchrun.__all__) == {
        "run",
        "arun",
        "validate",
        "status",
        "JobError",
        "RunAborted",
        "BudgetReached",
        "RunInterrupted",
    }


def test_ctrl_c_in_a_running_loop_stops_the_run_and_the_next_call_resumes(notebook: Path) -> None:
    """Jupyter's interrupt raises KeyboardInterrupt in the cell's thread; the run in its worker thread stops cleanly."""
    slow = start_emulator("--latency-ms", "300")
    try:
        ids = [f"S{i:03d}" for i in range(60)]
        frame = pl.DataFrame({"review_id": ids, "text": [f"Review {i}: fine." for i in range(60)]})
        job = job_dict(slow.url)

        async def cell() -> None:
            batchrun.run(job, input=frame, concurrency=2, quiet=True)

        loop = asyncio.new_event_loop()  # like a kernel's loop: SIGINT stays Python's KeyboardInterrupt

        def interrupt_once_sending() -> None:
            while slow.stats()["requests"] < 4:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt_once_sending, daemon=True).start()
        try:
            with pytest.raises(batchrun.RunInterrupted, match=r"^interrupted: \d+ of 60 rows done") as stopped:
                loop.run_until_complete(cell())
        finally:
            loop.close()
        assert 0 < stopped.value.done < 60
        first = slow.stats()["by_prompt"]
        slow.reset()
        df = batchrun.run(job, input=frame, quiet=True, concurrency=32)  # the rest, sooner
        assert df["review_id"].to_list() == ids and set(df["status"]) == {"ok"}
        assert not set(first) & set(slow.stats()["by_prompt"])  # no row answered before the stop is sent again
    finally:
        stop_emulator(slow)


def test_cancelling_arun_keeps_what_was_answered(notebook: Path) -> None:
    """arun's promise: cancelling the task stops the run, and every answer received before it is kept."""
    slow = start_emulator("--latency-ms", "150")
    try:
        ids = [f"C{i:03d}" for i in range(200)]
        frame = pl.DataFrame({"review_id": ids, "text": [f"Review {i}: fine." for i in range(200)]})
        job = job_dict(slow.url, run={"concurrency": 8})

        async def cell() -> float:
            task = asyncio.ensure_future(batchrun.arun(job, input=frame, quiet=True))
            while slow.stats()["requests"] < 40:
                await asyncio.sleep(0.01)
            cancelled_at = time.time()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return cancelled_at

        cancelled_at = asyncio.run(cell())
        first = slow.stats()
        slow.reset()
        df = batchrun.run(job, input=frame, quiet=True, concurrency=32)  # the rest, sooner
        assert df["review_id"].to_list() == ids and set(df["status"]) == {"ok"}
        again = [p for p in slow.stats()["by_prompt"] if p in first["by_prompt"]]
        for prompt in again:  # only rows still in flight at the cancel may be asked again
            answered = first["answered_at"].get(prompt)
            assert answered is None, f"answered {cancelled_at - answered:.2f} s before the cancel, asked again"
    finally:
        stop_emulator(slow)

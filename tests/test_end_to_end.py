"""A whole job through the CLI against the emulator over loopback."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from conftest import EXPECTED_LABELS, REVIEWS, Emulator, run_here, run_job, write_job


def test_run_writes_every_contract_column_in_input_order(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(
        tmp_path, emulator.url, pricing={"input_per_million": 2.5, "output_per_million": 10, "currency": "USD"}
    )
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "6 rows: 6 ok, 0 error" in result.stdout

    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df.columns == [
        "review_id",
        "text",
        "stars",
        "response_text",
        "tool_calls",
        "image_paths",
        "finish_reason",
        "model",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "latency_s",
        "attempts",
        "shared_from",
        "status",
        "error_class",
        "error",
        "cost",
    ]
    assert df["review_id"].to_list() == [r[0] for r in REVIEWS]
    assert df["text"].to_list() == [r[1] for r in REVIEWS]
    assert dict(zip(df["review_id"], df["response_text"])) == EXPECTED_LABELS
    assert set(df["status"]) == {"ok"} and set(df["finish_reason"]) == {"stop"}
    assert set(df["model"]) == {"gpt-5.4"}
    assert df["attempts"].to_list() == [1] * 6
    assert df["error_class"].null_count() == 6 and df["error"].null_count() == 6
    assert df["tool_calls"].null_count() == 6 and df["image_paths"].null_count() == 6
    assert df["shared_from"].null_count() == 6
    assert (df["prompt_tokens"] > 0).all() and (df["completion_tokens"] > 0).all()
    expected_cost = df["prompt_tokens"] * 2.5e-6 + df["completion_tokens"] * 1e-5
    assert (df["cost"] - expected_cost).abs().max() < 1e-12
    assert (df["latency_s"] >= 0).all()

    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["ok"] == 6 and summary["error"] == 0
    assert summary["prompt_tokens"] == df["prompt_tokens"].sum()
    assert abs(summary["cost"] - df["cost"].sum()) < 1e-9
    assert emulator.stats()["requests"] == 6


def test_default_id_is_the_row_index(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url, input={"path": "reviews.csv"})
    assert run_here("run", str(job), "--quiet").returncode == 0
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df.columns[:4] == ["row_index", "review_id", "text", "stars"]
    assert df["row_index"].to_list() == list(range(6))


def test_limit_runs_only_the_first_rows(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url)
    result = run_here("run", str(job), "--quiet", "--limit", "2")
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["review_id"].to_list() == ["R1", "R2"]
    assert emulator.stats()["requests"] == 2


def test_rerun_of_a_finished_job_sends_nothing(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url)
    assert run_here("run", str(job), "--quiet").returncode == 0
    emulator.reset()
    again = run_here("run", str(job), "--quiet")
    assert again.returncode == 0, again.stderr
    assert emulator.stats()["requests"] == 0
    assert pl.read_parquet(tmp_path / "out" / "result.parquet").height == 6


def test_jsonl_and_parquet_inputs(tmp_path: Path, emulator: Emulator) -> None:
    frame = pl.DataFrame({"review_id": [r[0] for r in REVIEWS], "text": [r[1] for r in REVIEWS]})
    frame.write_ndjson(tmp_path / "reviews.jsonl")
    for part in range(2):
        frame.slice(part * 3, 3).write_parquet(tmp_path / f"part-{part}.parquet")
    for source in ("reviews.jsonl", "part-*.parquet"):
        job = write_job(
            tmp_path,
            emulator.url,
            input={"path": source, "id_column": "review_id"},
            output={"path": f"out/{source.replace('*', 'all')}.parquet"},
        )
        result = run_here("run", str(job), "--quiet")
        assert result.returncode == 0, result.stderr
        df = pl.read_parquet(tmp_path / "out" / f"{source.replace('*', 'all')}.parquet")
        assert dict(zip(df["review_id"], df["response_text"])) == EXPECTED_LABELS


def test_retries_500_429_502_and_resets_until_every_row_is_ok(tmp_path: Path, emulator: Emulator) -> None:
    rows = [
        ["F1", "I love it. [[emulator: 500 x 2]]"],
        ["F2", "Broke at once. [[emulator: 429 x 1]]"],
        ["F3", "It is a box. [[emulator: 502 x 1]]"],
        ["F4", "Great value. [[emulator: reset x 1]]"],
        ["F5", "Terrible. [[emulator: 429-retry-after x 1]]"],
        ["F6", "Plain review with no fault."],
    ]
    _, df = run_job(tmp_path, rows, emulator.url)
    assert set(df["status"]) == {"ok"}
    assert dict(zip(df["review_id"], df["attempts"])) == {"F1": 3, "F2": 2, "F3": 2, "F4": 2, "F5": 2, "F6": 1}
    assert emulator.stats()["requests"] == 3 + 2 + 2 + 2 + 2 + 1


def test_a_row_that_keeps_failing_is_kept_as_an_error(tmp_path: Path, emulator: Emulator) -> None:
    rows = [
        ["E1", "Always broken upstream [[emulator: 500]]"],
        ["E2", "I love it."],
        ["E3", "Bad words [[emulator: sensitive_words_detected]]"],
    ]
    # run_job checks the exit code against the output: 5, finished and complete with some rows failed
    _, df = run_job(tmp_path, rows, emulator.url, run={"concurrency": 4, "max_attempts": 2, "timeout_s": 30})
    df = df.sort("review_id")
    assert df["status"].to_list() == ["error", "ok", "error"]
    assert df["error_class"].to_list() == ["server", None, "bad_request"]
    assert df["attempts"].to_list() == [2, 1, 1]
    assert "request id:" in df["error"][0]
    assert "sensitive words" in df["error"][2]

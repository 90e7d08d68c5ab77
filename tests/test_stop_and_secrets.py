"""The run stops on a bad key, and the key is never written anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    Emulator,
    assert_key_nowhere,
    run_cli,
    run_here,
    start_emulator,
    stop_emulator,
    write_csv,
    write_job,
)


@pytest.fixture
def keyed_emulator():
    emulator = start_emulator("--api-key-env", "EMULATOR_KEY", env={"EMULATOR_KEY": "the-right-key"})
    yield emulator
    stop_emulator(emulator)


def test_wrong_key_stops_the_run_after_a_few_requests(tmp_path: Path, keyed_emulator: Emulator) -> None:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], [[f"R{i}", f"review {i}"] for i in range(200)])
    job = write_job(tmp_path, keyed_emulator.url, run={"concurrency": 2, "max_attempts": 5, "timeout_s": 30})
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 3
    assert len(result.stderr.strip().splitlines()) == 1  # one clear line
    assert "API key was refused" in result.stderr and "TEST_RELAY_KEY" in result.stderr
    assert "batchrun run" in result.stderr  # says how to resume
    assert "Traceback" not in result.stderr
    assert keyed_emulator.stats()["requests"] <= 10
    assert not (tmp_path / "out" / "result.parquet").exists()
    status = run_here("status", str(job))
    assert "0 of 200 rows done: 0 ok, 0 failed; 200 pending" in status.stdout
    assert_key_nowhere(tmp_path, result, status)
    # Rows stay pending: with the right key the same command finishes every row.
    fixed = run_here("run", str(job), "--quiet", env={"TEST_RELAY_KEY": "the-right-key"})
    assert fixed.returncode == 0, fixed.stderr
    assert "200 rows: 200 ok, 0 error" in fixed.stdout


def test_quota_error_stops_at_once(tmp_path: Path, emulator: Emulator) -> None:
    rows = [[f"R{i}", f"review {i} [[emulator: 403-quota]]"] for i in range(50)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = write_job(tmp_path, emulator.url, run={"concurrency": 1, "max_attempts": 5, "timeout_s": 30})
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 3
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no balance or quota" in result.stderr and "用户额度不足" in result.stderr
    assert emulator.stats()["requests"] == 1
    status = run_here("status", str(job))
    assert "0 of 50 rows done: 0 ok, 0 failed; 50 pending" in status.stdout
    assert_key_nowhere(tmp_path, result, status)


def test_the_key_appears_in_no_file_and_no_output(tmp_path: Path, emulator: Emulator) -> None:
    rows = [["S1", "upstream busy [[emulator: 500 x 1]]"], ["S2", "fine"], ["S3", "[[emulator: 413]]"]]
    rows += [["S4", "[[emulator: reset-mid-body x 1]]"], ["S5", "[[emulator: google-503-list x 1]]"]]
    rows += [["S6", "[[emulator: 429-date x 1]]"], ["S7", "[[emulator: 429-ratelimit-headers x 1]]"]]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = write_job(tmp_path, emulator.url, run={"concurrency": 2, "max_attempts": 2, "timeout_s": 30})
    result = run_cli("run", str(job))
    assert result.returncode == 5, result.stderr  # finished with a failed row
    assert "7 rows: 6 ok, 1 error" in result.stdout
    assert_key_nowhere(tmp_path, result, run_cli("status", str(job)))


def test_the_same_error_before_any_success_stops_the_run_not_after_every_row(
    tmp_path: Path, emulator: Emulator
) -> None:
    """Rule C: a wrong path (404 for every request) stops after a few answers; the rows stay pending."""
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], [[f"R{i}", f"review {i}"] for i in range(200)])
    job = write_job(
        tmp_path, emulator.url + "/wrong-prefix", run={"concurrency": 2, "max_attempts": 3, "timeout_s": 30}
    )
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert emulator.stats()["requests"] <= 6
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url, output={"path": "reviews.csv/result.parquet"})
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "reviews.csv" in result.stderr
    assert emulator.stats()["requests"] == 0

"""Limits, back-off and faults over loopback, checked against the emulator's own counts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import (
    TEST_KEY,
    Emulator,
    assert_finished,
    assert_key_nowhere,
    cli_env,
    free_port,
    run_cli,
    run_here,
    start_emulator,
    stop_emulator,
    write_csv,
    write_job,
)


def write_reviews(folder: Path, n: int) -> None:
    write_csv(folder / "reviews.csv", ["review_id", "text"], [[f"R{i}", f"review {i}"] for i in range(n)])


def requests_per_row(emulator: Emulator, n: int) -> dict[str, int]:
    """How many requests the emulator saw for each row, found by the row's text in the prompt."""
    by_prompt = emulator.stats()["by_prompt"]
    counts = {}
    for i in range(n):
        matches = [count for prompt, count in by_prompt.items() if f"Review: review {i}\n" in prompt]
        assert len(matches) == 1
        counts[f"R{i}"] = matches[0]
    return counts


@pytest.fixture
def started():
    """Start emulators with options; each is stopped after the test."""
    emulators: list[Emulator] = []

    def start(*args: str) -> Emulator:
        emulators.append(start_emulator(*args))
        return emulators[-1]

    yield start
    for e in emulators:
        stop_emulator(e)


def test_concurrency_8_never_has_more_than_8_in_flight(tmp_path: Path, started) -> None:
    # Slow answers so the run keeps every place busy; the emulator's own gate 429s a ninth.
    emulator = started("--latency-ms", "40", "--jitter-ms", "40", "--max-concurrency", "8")
    write_reviews(tmp_path, 120)
    job = write_job(tmp_path, emulator.url, run={"concurrency": 8, "max_attempts": 5, "timeout_s": 30})
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stderr
    stats = emulator.stats()
    assert stats["peak_in_flight"] == 8
    assert stats["requests"] == 120 and stats["by_status"] == {"200": 120}

    emulator.reset()
    again = run_here("run", str(job), "--quiet", "--restart", "--concurrency", "3", "--limit", "30")
    assert again.returncode == 0, again.stderr
    assert emulator.stats()["peak_in_flight"] == 3
    assert_key_nowhere(tmp_path, result, again)


@pytest.mark.slow  # wall time: the one end-to-end rate test. The limiter's pace under an rpm limit and under
# a server's 429s is checked on the virtual clock (tests/test_limits.py, "a run against the emulator's own limit").
def test_requests_per_minute_spreads_starts_evenly(tmp_path: Path, started) -> None:
    # The emulator refuses a request that arrives within 0.4 s of the one before (its window holds 1):
    # 120 a minute, 0.5 s apart, never trips it; a burst would.
    emulator = started("--rpm-limit", "1", "--rpm-window-s", "0.4")
    write_reviews(tmp_path, 11)
    job = write_job(
        tmp_path, emulator.url, run={"concurrency": 8, "requests_per_minute": 120, "max_attempts": 5, "timeout_s": 30}
    )
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stderr
    stats = emulator.stats()
    assert stats["by_status"] == {"200": 11}
    assert stats["max_per_second"] <= 3 and stats["max_per_minute"] <= 120

    # The same job without the limit sends a burst the emulator refuses: the check above can fail.
    emulator.reset()
    unlimited = write_job(tmp_path, emulator.url, run={"concurrency": 8, "max_attempts": 1, "timeout_s": 30})
    burst = run_here("run", str(unlimited), "--quiet", "--restart", "--limit", "4")
    assert_finished(burst, tmp_path / "out" / "result.parquet")
    assert emulator.stats()["by_status"].get("429", 0) > 0
    assert_key_nowhere(tmp_path, result, burst)


@pytest.mark.slow  # back-off and 1.5 s hangs: a soak of the retry loop
def test_every_row_survives_random_faults_within_max_attempts(tmp_path: Path, started) -> None:
    emulator = started(
        *("--fault", "429=0.05", "--fault", "429-retry-after=0.05", "--fault", "500=0.05"),
        *("--fault", "reset=0.02", "--fault", "reset-mid-body=0.01", "--fault", "hang=0.01"),
        *("--seed", "11"),
    )
    n, max_attempts = 80, 8
    write_reviews(tmp_path, n)
    job = write_job(tmp_path, emulator.url, run={"concurrency": 8, "max_attempts": max_attempts, "timeout_s": 1.5})
    result = run_cli("run", str(job), "--quiet")
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert set(df["status"]) == {"ok"}
    seen = requests_per_row(emulator, n)
    assert dict(zip(df["review_id"], df["attempts"])) == seen  # each row's count is the server's count
    assert max(seen.values()) <= max_attempts
    by_status = emulator.stats()["by_status"]
    assert {"429", "500"} <= set(by_status) and sum(seen.values()) > n  # faults did happen
    assert_key_nowhere(tmp_path, result)


@pytest.mark.slow
def test_a_relay_that_is_down_stops_the_run_with_rows_pending_then_resumes(tmp_path: Path, started) -> None:
    port = free_port()  # nothing listens there yet: every connection is refused
    write_reviews(tmp_path, 30)
    run = {"concurrency": 4, "max_attempts": 2, "timeout_s": 5, "outage_timeout_s": 2}
    job = write_job(tmp_path, f"http://127.0.0.1:{port}", run=run)
    result = run_cli("run", str(job), "--quiet")
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    # What was waited for is said as it happens, then the stop, in one line.
    assert f"cannot connect to 127.0.0.1:{port}: connection refused; retrying for up to 2 s" in lines[0]
    assert f"127.0.0.1:{port} seems to be down" in lines[-1] and "run.outage_timeout_s" in lines[-1]
    assert "resume with: batchrun run" in lines[-1]
    status = run_cli("status", str(job))
    assert "0 of 30 rows done: 0 ok, 0 failed; 30 pending" in status.stdout  # not one row was marked failed

    emulator = started("--port", str(port))
    resumed = run_cli("run", str(job), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "30 rows: 30 ok, 0 error" in resumed.stdout
    assert emulator.stats()["requests"] == 30
    assert_key_nowhere(tmp_path, result, status, resumed)


@pytest.mark.slow
def test_the_run_waits_for_a_relay_that_comes_back(tmp_path: Path, started) -> None:
    # The relay is down when the run starts and back a few seconds later, within outage_timeout_s:
    # the breaker holds the rows and probes, so the run finishes with every row ok, none failed.
    port = free_port()
    write_reviews(tmp_path, 20)
    run = {"concurrency": 4, "max_attempts": 2, "timeout_s": 5, "outage_timeout_s": 60}
    job = write_job(tmp_path, f"http://127.0.0.1:{port}", run=run)
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(job), "--quiet"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)  # long enough for the breaker to open (it does after ~3 s of refused connections)
    emulator = started("--port", str(port))
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 0, stderr
    assert "20 rows: 20 ok, 0 error" in stdout
    assert emulator.stats()["requests"] == 20  # the probe was a real row's request; nothing sent twice
    assert_key_nowhere(tmp_path, subprocess.CompletedProcess([], 0, stdout, stderr))


def test_the_key_is_masked_where_the_server_echoes_it(tmp_path: Path, emulator: Emulator) -> None:
    rows = [["S1", "fine"], ["S2", "[[emulator: echo-key]]"], ["S3", "[[emulator: 413]]"], ["S4", "[[emulator: 401]]"]]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = write_job(tmp_path, emulator.url, run={"concurrency": 2, "max_attempts": 2, "timeout_s": 30})
    result = run_cli("run", str(job))  # with the progress bar
    assert result.returncode == 5, result.stderr  # finished, three rows failed
    df = pl.read_parquet(tmp_path / "out" / "result.parquet").sort("review_id")
    assert df["status"].to_list() == ["ok", "error", "error", "error"]
    assert "upstream rejected credentials 'Bearer ***'" in df["error"][1]
    status = run_cli("status", str(job))
    assert_key_nowhere(tmp_path, result, status)


def test_a_key_pasted_with_a_newline_works_and_a_broken_one_is_refused(tmp_path: Path, emulator: Emulator) -> None:
    write_reviews(tmp_path, 3)
    job = write_job(tmp_path, emulator.url)
    # The success path in-process; the refusal, which must not show the key, is a real process.
    pasted = run_here("run", str(job), "--quiet", env={"TEST_RELAY_KEY": TEST_KEY + "\n"})
    assert pasted.returncode == 0, pasted.stderr
    broken = TEST_KEY[:10] + "\x7f" + TEST_KEY[10:]
    refused = run_cli("run", str(job), "--quiet", "--restart", env={"TEST_RELAY_KEY": broken})
    assert refused.returncode == 2
    assert "TEST_RELAY_KEY" in refused.stderr and "HTTP header" in refused.stderr
    assert broken not in refused.stderr and "Traceback" not in refused.stderr
    assert_key_nowhere(tmp_path, pasted, refused)


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_emulator_limits_change_mid_run(started) -> None:
    emulator = started()
    chat = emulator.url + "/v1/chat/completions"
    ask = b'{"model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}]}'
    assert [_post(chat, ask)[0] for _ in range(3)] == [200, 200, 200]

    status, body = _post(emulator.url + "/_emulator/limits", b'{"rpm_limit": 2, "rpm_window_s": 60}')
    assert status == 200 and json.loads(body)["rpm_limit"] == 2
    assert [_post(chat, ask)[0] for _ in range(3)] == [200, 200, 429]

    assert _post(emulator.url + "/_emulator/limits", b'{"rpm_limit": null}')[0] == 200
    assert _post(chat, ask)[0] == 200
    assert _post(emulator.url + "/_emulator/limits", b'{"rpm_limit": -1}')[0] == 400
    assert _post(emulator.url + "/_emulator/limits", b'{"latency": 1}')[0] == 400

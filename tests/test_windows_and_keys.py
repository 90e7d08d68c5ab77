"""Over loopback (docs/backoff.md, docs/keys.md): a window the relay states, kept for the next run; several keys;
a relay that refuses everything alike. Short windows (2 s) so each run takes seconds; the emulator's counts are
the truth."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import orjson
import pytest
from conftest import STATE_DIR, TEST_KEY, assert_key_nowhere, run_here, write_csv, write_job
from test_faults import started, write_reviews  # noqa: F401  (the fixture, and the reviews it runs on)

from batchrun.base.stops import SAME_REFUSALS, AbortWatch, StopRule
from batchrun.flow.learned import FINGERPRINT_HEX, STORE
from batchrun.ledger.checkpoint import Checkpoint, checkpoint_folder
from batchrun.protocols import CallError
from batchrun.protocols.relay_errors import from_response, stated_limit

SECOND_KEY = "sk-second-test-key-8d1b7c4e02"


@pytest.mark.parametrize(
    ("message", "headers", "said"),
    [
        ("您已达到请求数限制：1分钟内最多请求300次 (request id: 20251206)", {}, (300, 60.0)),
        ("您已达到请求数限制：10秒内最多请求100次", {}, (100, 10.0)),
        ("Rate limit reached for gpt-4 on requests per min (RPM): Limit 3, Used 3, Requested 1.", {}, (3, 60.0)),
        ("Rate limit reached. Limit: 300 / min", {}, (300, 60.0)),
        ("You can make 20 requests per minute", {}, (20, 60.0)),
        ("Rate limit reached for requests", {"x-ratelimit-limit-requests": "500"}, (500, 60.0)),
        ("您的请求数限制已达到上限，请稍后再试", {}, None),
        # Numbers no relay means: taken as not stated, never an exception at the protocol boundary.
        ("Rate limit reached for requests", {"x-ratelimit-limit-requests": "inf"}, None),
        ("Rate limit reached for requests", {"x-ratelimit-limit-requests": "1e999"}, None),
        ("Rate limit reached for requests", {"x-ratelimit-limit-requests": "nan"}, None),
        ("1分钟内最多请求" + "9" * 5000 + "次", {}, None),
        ("Limit: " + "9" * 5000 + " / min", {}, None),
        ("1分钟内最多请求0次", {}, None),
    ],
)
def test_the_limit_a_429_states_is_read(message: str, headers: dict[str, str], said: tuple[int, float]) -> None:
    assert stated_limit(message, headers) == said
    body = orjson.dumps({"error": {"message": message, "type": "new_api_error", "code": ""}})
    err = from_response(429, body, headers)
    assert (err.limit_requests, err.limit_window_s) == (said or (None, None))


def refusal(message: str = "No connected db.", status: int = 400) -> CallError:
    return from_response(status, orjson.dumps({"error": {"message": message, "code": str(status)}}), {})


def test_rule_d_stops_on_the_same_refusal_in_a_row_never_on_refusals_among_successes() -> None:
    watch: AbortWatch[CallError] = AbortWatch()
    for row in range(2000):
        if row % 10 == 0:  # a tenth of the rows refused for their content; the others answered
            watch.on_error(refusal("the content of this request was rejected"))
        else:
            watch.on_success()
    for row in range(3 * SAME_REFUSALS):  # refusals in a row, but each in its own words
        watch.on_error(refusal(f"row {row}: field 'x' is invalid"))
    assert watch.tripped is None

    watch.on_success()  # rows succeeded before: the relay's state changed since (its database went away)
    for _ in range(SAME_REFUSALS - 1):
        watch.on_error(refusal())
    assert watch.tripped is None
    watch.on_error(refusal())
    assert watch.tripped is not None and watch.tripped.abort == StopRule.D


def learned_meta(folder: Path) -> str | None:
    checkpoint = Checkpoint(checkpoint_folder(folder / "out" / "result.parquet"))
    try:
        return checkpoint.get_meta("learned_limits")
    finally:
        checkpoint.close()


def job_here(tmp_path: Path, url: str, rows: int, **run: object) -> Path:
    write_reviews(tmp_path, rows)
    settings = {"concurrency": 8, "max_attempts": 1, "timeout_s": 30, **run}
    return write_job(tmp_path, url, run=settings)


def test_a_stated_window_fails_no_row_and_is_kept_for_the_next_run(tmp_path: Path, started) -> None:  # noqa: F811
    emulator = started("--rpm-limit", "10", "--rpm-window-s", "2", "--latency-ms", "50")
    first = tmp_path / "first"
    first.mkdir()
    # max_attempts 1: before, the rows refused by the first window's burst failed at once
    result = run_here("run", str(job_here(first, emulator.url, 30)), "--quiet")
    assert result.returncode == 0, result.stderr
    stats = emulator.stats()
    assert stats["by_status"]["200"] == 30 and stats["by_status"].get("429", 0) <= 15

    meta = learned_meta(first)
    assert json.loads(meta or "[]") == [{"key": "TEST_RELAY_KEY", "requests": 10, "window_s": 2.0, "source": "said"}]
    status = run_here("status", str(first / "job.yaml"))
    assert "the relay's limits: TEST_RELAY_KEY 10 per 2 s (said)" in status.stdout

    kept = (Path(STATE_DIR) / STORE).read_text(encoding="utf-8")
    fingerprints = [entry.split()[1] for entry in json.loads(kept)]
    assert all(len(f) == FINGERPRINT_HEX for f in fingerprints)
    assert_key_nowhere(Path(STATE_DIR), result)

    # The next run (another job on the same relay, key and model) keeps the window from its first request.
    emulator.reset()
    second = tmp_path / "second"
    second.mkdir()
    result = run_here("run", str(job_here(second, emulator.url, 30)), "--quiet")
    assert result.returncode == 0, result.stderr
    assert emulator.stats()["by_status"] == {"200": 30}
    meta = learned_meta(second)
    assert json.loads(meta or "[]")[0]["source"] == "remembered"


def two_keys(tmp_path: Path, url: str, rows: int, **run: object) -> Path:
    write_reviews(tmp_path, rows)
    settings = {"concurrency": 8, "max_attempts": 2, "timeout_s": 30, **run}
    provider = {"api": "openai-chat", "base_url": url, "api_key_env": ["TEST_RELAY_KEY", "SECOND_RELAY_KEY"]}
    return write_job(tmp_path, url, run=settings, provider=provider)


KEYS_ENV = {"SECOND_RELAY_KEY": SECOND_KEY}


def test_a_key_out_of_quota_is_retired_and_the_other_finishes_the_run(tmp_path: Path, started) -> None:  # noqa: F811
    os.environ["SECOND_RELAY_KEY"] = SECOND_KEY  # the emulator reads its keys from its environment (cli_env)
    try:
        emulator = started("--api-key-env", "TEST_RELAY_KEY,SECOND_RELAY_KEY", "--key-quota", "SECOND_RELAY_KEY=5")
    finally:
        del os.environ["SECOND_RELAY_KEY"]
    result = run_here("run", str(two_keys(tmp_path, emulator.url, 40)), "--quiet", env=KEYS_ENV)
    assert result.returncode == 0, result.stderr
    retired = [line for line in result.stderr.splitlines() if "retired" in line]
    assert len(retired) == 1 and "SECOND_RELAY_KEY" in retired[0] and "quota" in retired[0]
    assert emulator.stats()["by_status"]["200"] == 40
    assert_key_nowhere(tmp_path, result)
    assert_key_nowhere(tmp_path, result, key=SECOND_KEY)


def test_two_keys_with_the_same_window_go_about_twice_as_fast(tmp_path: Path, started) -> None:  # noqa: F811
    os.environ["SECOND_RELAY_KEY"] = SECOND_KEY
    try:
        keys = "TEST_RELAY_KEY,SECOND_RELAY_KEY"
        emulator = started("--api-key-env", keys, "--rpm-limit", "10", "--rpm-window-s", "2")
    finally:
        del os.environ["SECOND_RELAY_KEY"]
    # 40 rows: one key needs 4 windows (6 s at least), two keys 2 (2 s); no timing asserted, only the relay's
    # count of 429s, which a single key at 10 per 2 s cannot avoid for 40 rows sent at concurrency 8.
    result = run_here("run", str(two_keys(tmp_path, emulator.url, 40)), "--quiet", env=KEYS_ENV)
    assert result.returncode == 0, result.stderr
    stats = emulator.stats()
    assert stats["by_status"]["200"] == 40 and stats["by_status"].get("429", 0) <= 16


def test_a_relay_refusing_everything_alike_stops_early_with_rows_pending(tmp_path: Path, started) -> None:  # noqa: F811
    emulator = started("--refuse-all", "400:No connected db.")
    job = job_here(tmp_path, emulator.url, 200, concurrency=8)
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 3, result.stderr
    assert "No connected db." in result.stderr and "refused every request alike" in result.stderr
    assert emulator.stats()["requests"] <= 2 * 8 + 10
    status = run_here("status", str(job))
    assert " 0 failed" in status.stdout and "pending" in status.stdout, status.stdout


def test_row_specific_refusals_never_stop_a_run(tmp_path: Path, started) -> None:  # noqa: F811
    emulator = started("--refuse-share", "0.1")
    rows = [[f"R{i}", f"review {i}"] for i in range(300)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = write_job(tmp_path, emulator.url, run={"concurrency": 8, "max_attempts": 2, "timeout_s": 30})
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 5, result.stderr  # finished, some rows failed: theirs alone
    assert emulator.stats()["requests"] == 300
    assert TEST_KEY not in result.stderr


@pytest.mark.parametrize("fault", ["429=0.3", "503=0.3"])
def test_push_back_fails_no_row_even_with_one_attempt(tmp_path: Path, started, fault: str) -> None:  # noqa: F811
    emulator = started("--fault", fault, "--seed", "3")
    result = run_here("run", str(job_here(tmp_path, emulator.url, 60)), "--quiet")
    assert result.returncode == 0, result.stderr  # before: about a third of the rows failed on their one attempt
    stats = emulator.stats()
    assert stats["by_status"]["200"] == 60 and stats["requests"] > 60


def test_an_unstated_window_is_learned_and_the_429s_stop(tmp_path: Path, started) -> None:  # noqa: F811
    # 10 per 3 s, the 429 saying only "rate limit exceeded": before, the adaptive rate kept bumping into the window.
    emulator = started("--rpm-limit", "10", "--rpm-window-s", "3", "--rpm-unstated", "--latency-ms", "50")
    result = run_here("run", str(job_here(tmp_path, emulator.url, 40, max_attempts=2)), "--quiet")
    assert result.returncode == 0, result.stderr
    meta = json.loads(learned_meta(tmp_path) or "[]")
    assert [(m["requests"], m["source"]) for m in meta] == [(10, "learned")], meta
    assert 3.0 <= meta[0]["window_s"] <= 4.0  # an upper bound: a window too short would be overrun
    status = run_here("status", str(tmp_path / "job.yaml"))
    assert "(learned)" in status.stdout, status.stdout
    assert emulator.stats()["by_status"]["200"] == 40
    with urllib.request.urlopen(emulator.url + "/_emulator/timeline", timeout=10) as answer:
        timeline = json.loads(answer.read())  # per second: [second, requests, 429s]
    later = [second for second in timeline if second[0] >= timeline[0][0] + 6]  # past the first two windows
    assert sum(s[2] for s in later) <= 0.1 * sum(s[1] for s in later), timeline

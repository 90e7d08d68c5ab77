"""A run you can watch: the bar redrawn while nothing finishes, 429s and retries counted, numbers for people.

The ticker's logic is driven here on a fake clock; one real run against the emulator's own rate limit
checks what a real process prints and writes (the bar's redraws in its stderr, the summary's counts
against the emulator's).
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import cli_env, run_here, start_emulator, stop_emulator, write_csv, write_job

from batchrun.flow.pace import KeyPace, LearnedWindow
from batchrun.job.spec import PricingSpec
from batchrun.pipeline.progress import Progress, human, pace_text

LEARNED = [{"key": "TEST_RELAY_KEY", "requests": 300, "window_s": 60.0, "source": "said"}]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        (987, "987"),
        (9.87, "9.87"),
        (0.5, "0.5"),
        (0.0123, "0.0123"),
        (1500, "1.5k"),
        (2e4, "20k"),
        (23_149, "23.1k"),
        (999_950, "1M"),  # rounds up into the next unit, not to "1e+03k"
        (1_200_000, "1.2M"),
        (12_345_678, "12.3M"),
        (-2500, "-2.5k"),
    ],
)
def test_numbers_are_written_for_people(value: float, shown: str) -> None:
    assert human(value) == shown


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def bar(progress: Progress, out: io.StringIO) -> str:
    """The bar's last drawing."""
    progress.tick()
    return re.split(r"[\r\n]", out.getvalue().rstrip("\r\n "))[-1]


def watched_progress(clock: FakeClock, out: io.StringIO, monkeypatch: pytest.MonkeyPatch, **kw: object) -> Progress:
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setenv("COLUMNS", "400")
    # The ticker thread would tick on the real clock: far too slowly to interfere with the test's own ticks.
    monkeypatch.setattr("batchrun.pipeline.progress.REFRESH_S", 3600.0)
    return Progress(total=20_000, quiet=False, pricing=kw.pop("pricing", None), clock=clock, **kw)  # type: ignore[arg-type]


def test_a_pause_counts_down_and_the_rate_falls_while_nothing_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = watched_progress(clock, out, monkeypatch)
    watched = progress.watch()
    for _ in range(50):
        progress.count("ok", 10, 5)
    clock.now += 5
    assert "10 rows/s" in bar(progress, out)
    watched.answered_429, watched.retries = 7, 9
    watched.paused_until = clock.now + 12.2
    shown = bar(progress, out)
    assert "paused 13 s" in shown and "retries 9" in shown and "429s 7" in shown
    clock.now += 1
    assert "paused 12 s" in bar(progress, out)  # redrawn with no row finished
    clock.now += 11.5
    shown = bar(progress, out)
    assert "paused" not in shown
    assert "0 rows/s" in shown  # not the rate of 10 s ago, frozen
    progress.close()


def test_tokens_and_cost_count_the_whole_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a resume, the bar's tokens start from the job's, as its cost does, and it says so."""
    clock, out = FakeClock(), io.StringIO()
    pricing = PricingSpec(input_per_million=1.0, output_per_million=2.0)
    progress = watched_progress(clock, out, monkeypatch, pricing=pricing, spent=0.02, tokens=20_000)
    progress.count("ok", 1_000, 100)
    clock.now += 1
    assert "job: 21.1k tokens, 0.0212 USD" in bar(progress, out)
    progress.close()


def test_each_key_shows_its_pace_against_its_learned_limit() -> None:
    one = KeyPace("KEY_A", 4.9, LearnedWindow(300, 60.0, "said"))
    assert pace_text((one,)) == "pace 4.9/s of 5/s (300 per 60 s, said)"
    assert pace_text((KeyPace("KEY_A", None, None),)) is None  # nothing known: nothing said
    two = (one, KeyPace("KEY_B", None, None, retired="quota used up"))
    assert pace_text(two) == "KEY_A pace 4.9/s of 5/s (300 per 60 s, said); KEY_B retired (quota used up)"


def _redraws(stderr: str) -> list[tuple[int, int, str]]:
    """(rows done, elapsed seconds, the words after) of every drawing of the bar."""
    found = []
    for drawn in re.split(r"[\r\n]", stderr):
        m = re.search(r"\| (\d+)/\d+ \[(\d+):(\d+)(.*)\]", drawn)
        if m:
            found.append((int(m[1]), int(m[2]) * 60 + int(m[3]), m[4]))
    return found


@pytest.mark.slow  # a real run against a rate limit takes its time
def test_a_rate_limited_run_shows_its_push_back_live_and_in_the_summary(tmp_path: Path) -> None:
    # The emulator's own window (3 requests a second, refused ones counted) and a few 429s asking for
    # a 1 s pause; answers take 1.2 s, so the bar has seconds with nothing finishing.
    emulator = start_emulator(
        *("--rpm-limit", "3", "--rpm-window-s", "1", "--latency-ms", "1200"),
        *("--fault", "429-retry-after=0.1", "--seed", "5"),
    )
    try:
        rows = 24
        write_csv(tmp_path / "reviews.csv", ["review_id", "text"], [[f"r{i}", f"text {i}"] for i in range(rows)])
        job = write_job(tmp_path, emulator.url, run={"concurrency": 6, "max_attempts": 20, "timeout_s": 30})
        ran = subprocess.run(
            [sys.executable, "-m", "batchrun", "run", str(job)],
            env=cli_env({"COLUMNS": "400"}),
            capture_output=True,
            text=True,
            timeout=300,
        )
        stats = emulator.stats()
    finally:
        stop_emulator(emulator)
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    refused = stats["by_status"].get("429", 0)
    assert refused > 0
    assert summary["answered_429"] == refused
    assert summary["retries"] == stats["requests"] - rows > 0
    assert summary["paused_s"] > 0
    assert summary["learned_limits"] == [] or all("key" in item for item in summary["learned_limits"])
    assert f"push-back this run: {refused} answers 429, {summary['retries']} retries" in ran.stdout

    redraws = _redraws(ran.stderr)
    assert f"429s {refused}" in redraws[-1][2] and f"retries {summary['retries']}" in redraws[-1][2]
    assert any("paused" in words for _, _, words in redraws)
    # Redrawn at least once a second while no row finished: the same count, the clock moving on.
    stalls = [(a[1], b[1]) for a, b in zip(redraws, redraws[1:]) if a[0] == b[0] and b[1] > a[1] and b[1] - a[1] <= 1]
    assert len({elapsed for pair in stalls for elapsed in pair}) >= 3, redraws


def test_the_summary_names_the_learned_limits(reviews: Path, tmp_path: Path, emulator: object) -> None:
    """Limits the limiter kept in the checkpoint ("learned_limits") are in summary.json and the printed summary."""
    job = write_job(tmp_path, emulator.url)  # type: ignore[attr-defined]
    assert run_here("run", str(job), "--quiet", "--limit", "2").returncode == 0
    first = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert first["learned_limits"] == [] and first["answered_429"] == 0 and first["retries"] == 0
    db = sqlite3.connect(tmp_path / "out" / "result.parquet.batchrun" / "checkpoint.sqlite")
    kept = [*LEARNED, {"key": "OTHER", "requests": None, "window_s": 60}, "not a limit"]  # the broken are left out
    db.execute("INSERT OR REPLACE INTO meta VALUES ('learned_limits', ?)", (json.dumps(kept),))
    db.commit()
    db.close()
    again = run_here("run", str(job), "--quiet")
    assert again.returncode == 0, again.stderr
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["learned_limits"] == LEARNED
    assert "learned limits: TEST_RELAY_KEY: 300 requests per 60 s (said)" in again.stdout


def _tickers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batchrun-progress"]


def test_the_ticker_stops_when_the_run_ends_or_stops(reviews: Path, tmp_path: Path, emulator: object) -> None:
    """The bar's thread ends with the run, finished or stopped (a notebook's process lives on after it)."""
    job = write_job(tmp_path, emulator.url)  # type: ignore[attr-defined]
    ran = run_here("run", str(job))
    assert ran.returncode == 0, ran.stderr
    assert "retries 0, 429s 0" in ran.stderr and not _tickers()
    refusing = start_emulator("--api-key-env", "OTHER_KEY", env={"OTHER_KEY": "sk-not-the-test-key"})
    try:
        stopped = run_here("run", str(write_job(tmp_path, refusing.url)), "--restart")
    finally:
        stop_emulator(refusing)
    assert stopped.returncode == 3, stopped.stderr
    assert not _tickers()

"""Resume: real CLI processes, real signals, checked at the emulator.

The kill test SIGKILLs the run's process group at random moments (BATCHRUN_KILL_MOMENTS
of them, 3 by default; 20 for a local soak; BATCHRUN_TEST_SEED replays a failed draw) and
checks the rerun from the server's side: every row once in the output, and no row
re-requested whose answer the emulator sent more than a second before the kill.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import (
    REVIEWS,
    Emulator,
    cli_env,
    run_cli,
    run_here,
    start_emulator,
    stop_emulator,
    write_csv,
    write_job,
)

ROWS = 240
LATENCY_MS = "40"


@pytest.fixture(scope="module")
def slow_emulator() -> Iterator[Emulator]:
    """Answers after 40 ms, so a run of a few hundred rows lasts a couple of seconds."""
    emulator = start_emulator("--latency-ms", LATENCY_MS)
    yield emulator
    stop_emulator(emulator)


def many_reviews(folder: Path, rows: int = ROWS) -> list[str]:
    ids = [f"K{i:04d}" for i in range(rows)]
    write_csv(
        folder / "reviews.csv",
        ["review_id", "text", "stars"],
        [[rid, f"Review number {i}: it does what it says.", 1 + i % 5] for i, rid in enumerate(ids)],
    )
    return ids


def start_run(job: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(job), "--quiet", *args],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, killed as a whole like a terminal would
    )


def wait_for_requests(emulator: Emulator, at_least: int, process: subprocess.Popen[str]) -> None:
    """Until the run is sending (its signal handling is in place by then)."""
    deadline = time.monotonic() + 60
    while emulator.stats()["requests"] < at_least:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run sent nothing"
        time.sleep(0.05)


def in_flight_reported(stdout: str) -> int:
    found = re.search(r"(\d+) rows were in flight when the last run stopped", stdout)
    return int(found.group(1)) if found else 0


def assert_every_row_once_in_order(tmp_path: Path, ids: list[str]) -> pl.DataFrame:
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["review_id"].to_list() == ids
    assert set(df["status"]) == {"ok"}
    assert df["response_text"].null_count() == 0
    return df


def assert_resumed_without_paying_twice(
    tmp_path: Path, ids: list[str], first: dict, second: dict, killed_at: float, rerun_stdout: str
) -> list[str]:
    """The promise after a kill: every row once, in order; nothing answered > 1 s before the kill asked again.

    Returns the prompts the rerun asked again (only rows with an intent and no recorded answer).
    """
    assert_every_row_once_in_order(tmp_path, ids)
    assert set(second["by_prompt"].values()) <= {1}  # the rerun asks each row at most once
    assert len(set(first["by_prompt"]) | set(second["by_prompt"])) == len(ids)  # and, with the first run, all
    again = [p for p in second["by_prompt"] if p in first["by_prompt"]]
    for prompt in again:
        answered = first["answered_at"].get(prompt)  # None: never answered, or answered after the kill
        assert answered is None or answered > killed_at - 1.0, f"answered {killed_at - answered:.2f} s before the kill"
    assert len(again) <= in_flight_reported(rerun_stdout)  # the rerun counts every row it may pay twice
    return again


def kill_and_resume(tmp_path: Path, emulator: Emulator, moment: float) -> int:
    """SIGKILL a run `moment` seconds in, rerun, check; returns how many rows were requested again."""
    ids = many_reviews(tmp_path)
    job = write_job(tmp_path, emulator.url)
    emulator.reset()
    process = start_run(job)
    time.sleep(moment)
    killed_at = time.time()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = emulator.stats()
    emulator.reset()

    rerun = run_cli("run", str(job), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    second = emulator.stats()
    again = assert_resumed_without_paying_twice(tmp_path, ids, first, second, killed_at, rerun.stdout)
    print(
        f"kill at {moment:.2f} s: first run sent {first['requests']}, rerun sent {second['requests']}, "
        f"{in_flight_reported(rerun.stdout)} reported in flight, {len(again)} requested again"
    )
    return len(again)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun(tmp_path: Path, slow_emulator: Emulator, seed: int) -> None:
    moments = int(os.environ.get("BATCHRUN_KILL_MOMENTS", "3"))
    rng = random.Random(seed)
    worst = 0
    for n in range(moments):
        folder = tmp_path / f"kill-{n}"
        folder.mkdir()
        moment = rng.uniform(0.3, 2.0)  # from start-up to the end of the run
        worst = max(worst, kill_and_resume(folder, slow_emulator, moment))
    print(f"worst re-request count over {moments} kills: {worst}")


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # SIGTERM: timeout, systemd, schedulers
def test_ctrl_c_finishes_rows_in_flight_and_says_how_to_resume(
    tmp_path: Path, slow_emulator: Emulator, stop: signal.Signals
) -> None:
    ids = many_reviews(tmp_path)
    job = write_job(tmp_path, slow_emulator.url)
    slow_emulator.reset()
    process = start_run(job)
    wait_for_requests(slow_emulator, 40, process)
    process.send_signal(stop)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    done = re.search(r"interrupted: (\d+) of 240 rows done, (\d+) pending", err)
    assert done and 0 < int(done.group(1)) < ROWS, err
    assert "cancelled" not in err  # 40 ms answers all came within the grace period
    command = re.search(r"resume with: (.*)$", err.strip()).group(1)
    assert command == f"batchrun run {job}"
    first = slow_emulator.stats()
    slow_emulator.reset()

    resumed = run_cli(*command.split()[1:], "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert in_flight_reported(resumed.stdout) == 0
    assert not set(first["by_prompt"]) & set(slow_emulator.stats()["by_prompt"])  # nothing paid twice
    assert_every_row_once_in_order(tmp_path, ids)


@pytest.mark.slow
def test_ctrl_c_cancels_slow_requests_after_grace_or_at_second_ctrl_c(tmp_path: Path, emulator: Emulator) -> None:
    ids = many_reviews(tmp_path, 40)
    stalled = start_emulator("--latency-ms", "20000")
    try:
        job = write_job(tmp_path, stalled.url, run={"concurrency": 4, "max_attempts": 1, "timeout_s": 60})
        for signals, when in ((1, "after 3 s"), (2, "at the second Ctrl-C")):
            process = start_run(job)
            wait_for_requests(stalled, 4 * signals, process)
            for _ in range(signals):
                process.send_signal(signal.SIGINT)
                time.sleep(0.2)
            _, err = process.communicate(timeout=30)
            assert process.returncode == 130, err
            assert f"4 requests in flight were cancelled {when}" in err, err
            assert "Traceback" not in err
        # While a run goes on, status says so and a second run is refused.
        process = start_run(job)
        wait_for_requests(stalled, 12, process)
        status = run_cli("status", str(job))
        assert "4 rows were in flight when the last run stopped" not in status.stdout
        assert "a run is going on now: 4 rows in flight" in status.stdout, status.stdout
        second = run_cli("run", str(job), "--quiet")
        assert second.returncode == 2 and "another batchrun run is using this checkpoint" in second.stderr
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        stop_emulator(stalled)
    # base_url does not change requests: the same checkpoint resumes against another server.
    job = write_job(tmp_path, emulator.url, run={"concurrency": 4, "max_attempts": 1, "timeout_s": 60})
    status = run_cli("status", str(job))
    assert "4 rows were in flight when the last run stopped" in status.stdout, status.stdout
    resumed = run_cli("run", str(job), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert in_flight_reported(resumed.stdout) == 4
    assert_every_row_once_in_order(tmp_path, ids)


# --- a changed job file ---------------------------------------------------------------


def test_changed_template_is_refused_and_restart_sends_every_row(
    tmp_path: Path, reviews: Path, emulator: Emulator
) -> None:
    job = write_job(tmp_path, emulator.url)
    assert run_here("run", str(job), "--quiet").returncode == 0
    emulator.reset()
    write_job(tmp_path, emulator.url, prompt={"user": "Label this review: {{ text }}"})
    refused = run_here("run", str(job), "--quiet")
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert "prompt.user changed" in message and "prompt.system changed" in message
    assert "6 of 6 finished rows" in message and "--rerun-changed" in message and "--restart" in message
    assert emulator.stats()["requests"] == 0
    status = run_here("status", str(job))
    assert "job file: changed (prompt.system changed; prompt.user changed): 6 of 6" in status.stdout

    restarted = run_here("run", str(job), "--quiet", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert "discarded a checkpoint with 6 ok and 0 error rows" in restarted.stderr
    assert emulator.stats()["requests"] == 6


def test_rerun_changed_sends_only_rows_whose_request_changed(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url, prompt={"user": "Review: {{ text }}"})
    assert run_here("run", str(job), "--quiet").returncode == 0
    before = pl.read_parquet(tmp_path / "out" / "result.parquet")
    emulator.reset()
    write_job(tmp_path, emulator.url, prompt={"user": "Review: {{ text }}{% if stars > 3 %} (from a fan){% endif %}"})
    refused = run_here("run", str(job), "--quiet")
    assert refused.returncode == 2 and "2 of 6 finished rows" in refused.stderr
    assert "keep the other 4 answers" in refused.stderr

    rerun = run_here("run", str(job), "--quiet", "--rerun-changed")
    assert rerun.returncode == 0, rerun.stderr
    assert "2 rows will be sent again, 4 answers kept" in rerun.stderr
    fans = {f"Review: {text} (from a fan)" for _, text, stars in REVIEWS if stars > 3}
    assert emulator.stats()["by_prompt"] == dict.fromkeys(fans, 1)
    after = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert after["review_id"].to_list() == before["review_id"].to_list()
    assert set(after["status"]) == {"ok"}
    emulator.reset()
    assert run_here("run", str(job), "--quiet").returncode == 0  # the checkpoint now matches the job
    assert emulator.stats()["requests"] == 0


def test_changes_that_do_not_change_requests_apply_with_zero_requests(
    tmp_path: Path, reviews: Path, emulator: Emulator
) -> None:
    job = write_job(tmp_path, emulator.url)
    assert run_here("run", str(job), "--quiet").returncode == 0
    emulator.reset()
    # Output path, limits, concurrency, attempts, job name, server: answers are re-derived, nothing is sent.
    write_job(
        tmp_path,
        emulator.url,
        name="renamed",
        output={"path": "elsewhere/labels.parquet"},
        run={"concurrency": 2, "max_attempts": 2, "timeout_s": 10, "requests_per_minute": 100},
        pricing={"input_per_million": 1, "output_per_million": 2},
    )
    (tmp_path / "reviews.csv").touch()  # same content, new mtime
    old = tmp_path / "out" / "result.parquet.batchrun"
    refused = run_here("run", str(job), "--quiet")  # the checkpoint is never moved behind the user's back
    assert refused.returncode == 2 and f"--adopt-checkpoint {old}" in refused.stderr, refused.stderr
    assert f"--adopt-checkpoint {old}" in run_here("status", str(job)).stdout
    again = run_here("run", str(job), "--quiet", "--adopt-checkpoint", str(old))
    assert again.returncode == 0, again.stderr
    assert "moved the checkpoint" in again.stderr and not old.exists()
    assert emulator.stats()["requests"] == 0
    moved = pl.read_parquet(tmp_path / "elsewhere" / "labels.parquet")
    assert moved.height == 6 and set(moved["status"]) == {"ok"} and moved["cost"].null_count() == 0
    assert "job file: matches the checkpoint" in run_here("status", str(job)).stdout


def test_changed_input_rows_are_counted_and_rerun(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url)
    assert run_here("run", str(job), "--quiet").returncode == 0
    rows = [list(r) for r in REVIEWS]
    rows[2][1] = "It arrived on Wednesday in a box."
    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "stars"], rows)
    emulator.reset()
    refused = run_here("run", str(job), "--quiet")
    assert refused.returncode == 2
    assert "the input's content changed (reviews.csv)" in refused.stderr and "1 of 6" in refused.stderr
    assert run_here("run", str(job), "--quiet", "--rerun-changed").returncode == 0
    assert list(emulator.stats()["by_prompt"].values()) == [1]
    assert_every_row_once_in_order(tmp_path, [r[0] for r in rows])


def test_retry_failed_sends_only_the_failed_rows(tmp_path: Path, emulator: Emulator) -> None:
    rows = [[f"F{i}", f"Review {i}, fine.", i % 3 == 0] for i in range(9)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "flaky"], rows)
    # The fault directive is only in the prompt of flaky rows, and only while the template adds it.
    broken = "Review: {{ text }}{% if flaky %} [[emulator: 500]]{% endif %}"
    job = write_job(tmp_path, emulator.url, prompt={"user": broken}, run={"max_attempts": 1, "timeout_s": 30})
    first = run_here("run", str(job), "--quiet")
    assert first.returncode == 5 and "9 rows: 6 ok, 3 error" in first.stdout
    status = run_here("status", str(job)).stdout
    assert "9 of 9 rows done: 6 ok, 3 failed (server 3); 0 pending" in status
    assert re.search(r"tokens: \d+ in / \d+ out\nlast row finished: .* \(\d+ s ago\)\n", status), status
    assert "job file: matches the checkpoint" in status
    emulator.reset()
    write_job(tmp_path, emulator.url, prompt={"user": "Review: {{ text }}"}, run={"max_attempts": 1, "timeout_s": 30})
    again = run_here("run", str(job), "--quiet", "--retry-failed")
    assert again.returncode == 0, again.stderr
    assert sorted(emulator.stats()["by_prompt"]) == [f"Review: Review {i}, fine." for i in (0, 3, 6)]
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["review_id"].to_list() == [r[0] for r in rows] and set(df["status"]) == {"ok"}


# --- a damaged checkpoint ---------------------------------------------------------------


def test_truncated_checkpoint_is_refused_with_one_line(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url)
    assert run_here("run", str(job), "--quiet").returncode == 0
    db = tmp_path / "out" / "result.parquet.batchrun" / "checkpoint.sqlite"
    os.truncate(db, db.stat().st_size - 1000)  # cut mid-page, as a crash of the disk or a bad copy would
    emulator.reset()
    for command in ("run", "status"):
        refused = run_here(command, str(job))
        assert refused.returncode == 2
        message = refused.stderr.strip()
        assert "\n" not in message and "Traceback" not in message
        assert "the checkpoint is damaged" in message and "--restart" in message
    assert emulator.stats()["requests"] == 0
    restarted = run_here("run", str(job), "--quiet", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert "discarded a checkpoint it could not read" in restarted.stderr
    assert emulator.stats()["requests"] == 6
    os.truncate(db, 2 * 4096)  # cut at a page boundary: tables lose their pages
    refused = run_here("run", str(job))
    assert refused.returncode == 2 and "the checkpoint is damaged (database disk image is malformed)" in refused.stderr


TORN_WAL_WRITER = """
import os, sys, time
from pathlib import Path
from batchrun.ledger.checkpoint import Checkpoint, RowRecord
cp = Checkpoint(Path(sys.argv[1]))
row = lambda i: RowRecord(i, f"R{i}", "ok", "positive", None, "stop", "m", 3, 1, 0.1, 1, None, None, time.time())
cp._write([], [row(i) for i in range(10)], [])
cp._write([], [row(i) for i in range(10, 20)], [])
os._exit(0)  # killed: the WAL is never checkpointed into the database file
"""


def test_torn_wal_tail_is_recovered_to_the_last_whole_commit(tmp_path: Path) -> None:
    from batchrun.ledger.checkpoint import Checkpoint

    folder = tmp_path / "cp"
    subprocess.run([sys.executable, "-c", TORN_WAL_WRITER, str(folder)], env=cli_env(), check=True)
    wal = folder / "checkpoint.sqlite-wal"
    os.truncate(wal, wal.stat().st_size - 100)  # the last commit's frame is cut short
    checkpoint = Checkpoint(folder)  # opens without complaint: SQLite drops the torn frames
    try:
        assert checkpoint.count_finished(0, 100) == 10
        assert checkpoint.finished_in_range(0, 100) == set(range(10))
    finally:
        checkpoint.close()


def test_request_settings_hold_only_what_shapes_the_request_body() -> None:
    from batchrun.job.spec import JobSpec
    from batchrun.pipeline.fingerprint import request_settings

    def settings(**changes: object) -> dict[str, object]:
        job: dict[str, object] = {
            "name": "j",
            "input": {"path": "in.csv"},
            "model": "m",
            "prompt": {"user": "{{ text }}"},
            "output": {"path": "out.parquet"},
        }
        job.update(changes)
        return request_settings(JobSpec.model_validate(job))

    schema = {"type": "object", "properties": {"label": {"type": "string"}}}
    plain = settings()
    assert set(plain) == {"model", "provider.api", "params", "stream"}
    native = settings(output={"path": "o.parquet", "parse": "json", "schema": schema})
    assert native["output.schema"] == schema
    # A schema only checked after the answer leaves requests alone.
    assert settings(output={"path": "o.parquet", "parse": "json", "schema": schema, "native_schema": False}) == plain
    with_images = settings(prompt={"user": "{{ text }}", "images": ["{{ path }}"]})
    assert with_images["provider.image_part_style"] == "standard"


def test_every_request_setting_changes_the_fingerprint() -> None:
    """RequestSettings is hashed whole: a changed field, nested ones included, is a different request."""
    import dataclasses

    from batchrun.job.settings import ImageSettings, RequestSettings
    from batchrun.pipeline.fingerprint import settings_digest

    base = RequestSettings(
        model="m",
        api="openai-chat",
        params={"temperature": 0},
        stream=False,
        images=ImageSettings(part_style="standard", max_side=None),
        native_schema={"type": "object"},
    )
    changed = {
        "model": "m2",
        "api": "gemini",
        "params": {"temperature": 1},
        "stream": True,
        "images": None,
        "native_schema": None,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(RequestSettings)}, "a new field needs a case here"
    digests = {settings_digest(base)}
    for name, value in changed.items():
        digests.add(settings_digest(dataclasses.replace(base, **{name: value})))
    image_changes = {"part_style": "responses", "max_side": 512}
    assert set(image_changes) == {f.name for f in dataclasses.fields(ImageSettings)}
    for name, value in image_changes.items():
        assert base.images is not None
        digests.add(
            settings_digest(dataclasses.replace(base, images=dataclasses.replace(base.images, **{name: value})))
        )
    assert len(digests) == 1 + len(changed) + len(image_changes)

"""A newcomer's mistakes cost nothing: the input is never written over, a
copied job folder never takes another's answers, exit codes a script can trust, a relay that cannot be
reached is said at once, result columns never take input columns' names, and real relays' ways work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from aiohttp import web
from conftest import REVIEWS, TEST_KEY, Emulator, cli_env, free_port, run_here, write_csv, write_job

from batchrun.emulator.server import EmulatorConfig, running_in_thread

# --- never write over user data ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "parquet", "glob"])
def test_output_on_the_input_is_refused_and_the_input_is_unchanged(
    kind: str, tmp_path: Path, emulator: Emulator
) -> None:
    frame = pl.DataFrame({"review_id": [r[0] for r in REVIEWS], "text": [r[1] for r in REVIEWS]})
    if kind == "csv":
        source = output = "reviews.csv"
        frame.write_csv(tmp_path / source)
    else:
        frame.write_parquet(tmp_path / "part-0.parquet")
        source = "part-0.parquet" if kind == "parquet" else "part-*.parquet"
        output = "part-0.parquet" if kind == "parquet" else "part-9.parquet"  # would be read as input next time
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    job = write_job(tmp_path, emulator.url, input={"path": source, "id_column": "review_id"}, output={"path": output})
    for command in ("validate", "run"):
        refused = run_here(command, str(job))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        message = refused.stderr.strip()
        assert "\n" not in message and "output.path" in message and "is the input" in message
        assert str(tmp_path / output) in message and source in message
    assert emulator.stats()["requests"] == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "job.yaml"} == before


def test_a_file_batchrun_did_not_write_is_never_replaced(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    theirs = tmp_path / "out" / "result.parquet"
    theirs.parent.mkdir()
    pl.DataFrame({"precious": [1, 2, 3]}).write_parquet(theirs)
    data = theirs.read_bytes()
    job = write_job(tmp_path, emulator.url)
    refused = run_here("run", str(job), "--quiet")
    assert refused.returncode == 2 and "not an output batchrun wrote" in refused.stderr, refused.stderr
    assert str(theirs) in refused.stderr and "reviews.csv" in refused.stderr
    assert theirs.read_bytes() == data and emulator.stats()["requests"] == 0
    theirs.unlink()
    assert run_here("run", str(job), "--quiet").returncode == 0
    assert run_here("run", str(job), "--quiet").returncode == 0  # its own output is replaced freely


# --- answers stay with their job --------------------------------------------------------


def test_a_copied_job_folder_runs_on_its_own(tmp_path: Path, emulator: Emulator) -> None:
    original = tmp_path / "original"
    original.mkdir()
    write_csv(original / "reviews.csv", ["review_id", "text", "stars"], REVIEWS)
    job = write_job(original, emulator.url, output={"path": "../results/original.parquet"})
    assert run_here("run", str(job), "--quiet").returncode == 0
    assert sorted(p.name for p in original.iterdir()) == ["job.yaml", "reviews.csv"]  # no state beside the job

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)  # hidden files included, were there any
    write_job(copy, emulator.url, output={"path": "../results/copy.parquet"})
    emulator.reset()
    copied = run_here("run", str(copy / "job.yaml"), "--quiet")
    assert copied.returncode == 0, copied.stderr
    assert emulator.stats()["requests"] == 6  # its own output, its own checkpoint: every row asked

    emulator.reset()
    again = run_here("run", str(job), "--quiet")
    assert again.returncode == 0, again.stderr
    assert emulator.stats()["requests"] == 0  # the original's answers are where they were
    assert "6 of 6 rows done" in run_here("status", str(job)).stdout


def test_the_committed_jobs_folder_holds_no_state() -> None:
    jobs = Path(__file__).resolve().parent.parent / "jobs"
    assert not [p.name for p in jobs.iterdir() if p.name.startswith(".")]


# --- exit codes -------------------------------------------------------------------------


def test_exit_codes_all_ok_some_failed_all_failed(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url, run={"max_attempts": 1, "timeout_s": 30})
    ok = run_here("run", str(job), "--quiet")
    assert ok.returncode == 0 and "failed" not in ok.stdout, ok.stdout + ok.stderr

    broken = "Review: {{ text }}{% if stars == 1 %} [[emulator: sensitive_words_detected]]{% endif %}"
    some = write_job(tmp_path, emulator.url, prompt={"user": broken}, run={"max_attempts": 1, "timeout_s": 30})
    result = run_here("run", str(some), "--quiet", "--restart", "--limit", "5")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "5 rows: 3 ok, 2 error" in result.stdout
    assert f"2 rows failed; retry them with: batchrun run {some} --retry-failed --limit 5" in result.stdout
    assert pl.read_parquet(tmp_path / "out" / "result.parquet").height == 5  # the output is complete

    refused = "{{ text }} [[emulator: sensitive_words_detected]]"  # a 400: an error row, not retried
    every = write_job(tmp_path, emulator.url, prompt={"user": refused}, run={"max_attempts": 1})
    failed = run_here("run", str(every), "--quiet", "--restart")
    assert failed.returncode == 5 and "6 rows: 0 ok, 6 error" in failed.stdout, failed.stdout + failed.stderr
    assert "discarded a checkpoint with 3 ok and 2 error rows" in failed.stderr


def test_schema_failures_count_as_failed_rows_everywhere(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    schema = {"type": "object", "properties": {"label": {"type": "integer"}}, "required": ["label"]}
    job = write_job(
        tmp_path,
        emulator.url,
        output={"path": "out/result.parquet", "parse": "json", "schema": schema, "native_schema": False},
    )
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 5 and "6 rows: 0 ok, 6 error" in result.stdout, result.stdout + result.stderr
    assert "0 ok, 6 failed" in run_here("status", str(job)).stdout
    restarted = run_here("run", str(job), "--quiet", "--restart")
    assert "discarded a checkpoint with 0 ok and 6 error rows" in restarted.stderr


# --- saying what the run waits for ------------------------------------------------------


def test_a_refused_connection_is_said_within_seconds(tmp_path: Path, reviews: Path) -> None:
    port = free_port()  # nothing listens there: every connection is refused
    job = write_job(tmp_path, f"http://127.0.0.1:{port}", run={"timeout_s": 30, "outage_timeout_s": 600})
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(job), "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    guard = threading.Timer(20, process.kill)  # never silent for long: the line would come after 600 s
    guard.start()
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        said_after = time.monotonic() - started
    finally:
        guard.cancel()
        process.kill()
        process.wait()
    assert f"cannot connect to 127.0.0.1:{port}: connection refused" in line, line
    assert "600 s (run.outage_timeout_s)" in line
    assert said_after < 8, said_after


# --- result columns and ids -------------------------------------------------------------


def test_ids_are_compared_as_written(tmp_path: Path, emulator: Emulator) -> None:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], [["007", "a"], ["7", "b"], ["2.0", "c"], ["2", "d"]])
    job = write_job(tmp_path, emulator.url)
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["review_id"].to_list() == ["007", "7", "2.0", "2"]
    assert df.columns[:2] == ["review_id", "text"] and not [c for c in df.columns if c.endswith("_right")]


# --- real relays ------------------------------------------------------------------------


@pytest.fixture
def google_only_relay() -> Iterator[str]:
    """A Gemini-native relay that reads the key only from Google's own header, as LiteLLM's pass-through does."""
    seen: list[str] = []

    async def generate(request: web.Request) -> web.Response:
        seen.append(request.headers.get("x-goog-api-key", ""))
        if request.headers.get("x-goog-api-key") != TEST_KEY:
            return web.json_response({"error": {"code": 401, "message": "no key", "status": "UNAUTHENTICATED"}}, 401)
        answer = {"candidates": [{"content": {"parts": [{"text": "positive"}]}, "finishReason": "STOP"}]}
        return web.json_response({**answer, "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1}})

    app = web.Application()
    app.router.add_post("/v1beta/models/{target}", generate)
    port = free_port()
    runner = web.AppRunner(app)
    import asyncio

    loop = asyncio.new_event_loop()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_gemini_key_goes_in_googles_header_too(tmp_path: Path, reviews: Path, google_only_relay: str) -> None:
    job = write_job(
        tmp_path,
        google_only_relay + "/v1beta/",  # a base URL copied with its version: trimmed, not glued
        provider={"api": "gemini", "base_url": google_only_relay + "/v1beta/", "api_key_env": "TEST_RELAY_KEY"},
        model="gemini-2.5-flash",
        params={},
    )
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(pl.read_parquet(tmp_path / "out" / "result.parquet")["response_text"]) == {"positive"}


def test_gemini_json_schema_is_honoured_by_the_emulator(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
        "required": ["label"],
    }
    job = write_job(
        tmp_path,
        emulator.url,
        provider={"api": "gemini", "base_url": emulator.url, "api_key_env": "TEST_RELAY_KEY"},
        model="gemini-2.5-flash",
        params={},
        output={"path": "out/result.parquet", "parse": "json", "schema": schema},
    )
    assert '"responseJsonSchema"' in run_here("validate", str(job)).stdout
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(pl.read_parquet(tmp_path / "out" / "result.parquet")["label"]) <= {"positive", "negative", "neutral"}


def test_validate_counts_image_input(tmp_path: Path) -> None:
    for folder in ("jobs", "sample_data"):
        shutil.copytree(Path(__file__).resolve().parent.parent / folder, tmp_path / folder)
    job = tmp_path / "jobs" / "caption.yaml"
    estimate = run_here("validate", str(job)).stdout
    estimated = int(estimate.split("input tokens:  ~", 1)[1].split(" ", 1)[0].replace(",", ""))
    assert run_here("run", str(job), "--quiet").returncode == 0
    actual = json.loads((tmp_path / "out" / "caption.summary.json").read_text())["prompt_tokens"]
    assert abs(estimated - actual) / actual < 0.15, (estimated, actual)


# --- the small things -------------------------------------------------------------------


def test_version_models_and_help_for_every_argument(tmp_path: Path) -> None:
    version = run_here("--version")
    assert version.returncode == 0 and version.stdout.startswith("batchrun 0.")
    with running_in_thread(EmulatorConfig()) as url:
        models = run_here("models", "--base-url", url + "/v1", "--api-key-env", "TEST_RELAY_KEY")
    assert models.returncode == 0, models.stderr
    assert "gpt-5.4" in models.stdout.split() and "gemini-2.5-flash" in models.stdout.split()
    from batchrun.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in [("batchrun", parser), *commands.items()]:
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help text"


def test_validate_needs_no_key_and_status_names_the_output(tmp_path: Path, reviews: Path) -> None:
    job = write_job(tmp_path, "https://relay.invalid/v1")
    checked = run_here("validate", str(job), env={"TEST_RELAY_KEY": None})
    assert checked.returncode == 0, checked.stderr
    assert "POST https://relay.invalid/v1/chat/completions" in checked.stdout  # no /v1/v1
    assert "TEST_RELAY_KEY is not set" in checked.stderr
    status = run_here("status", str(job))
    assert f"output: {tmp_path / 'out' / 'result.parquet'}" in status.stdout
    refused = run_here("validate", str(write_job(tmp_path, "https://relay.example?key=1")))
    assert refused.returncode == 2 and "query string" in refused.stderr

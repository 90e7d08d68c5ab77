"""Input and money: empty cells, duplicate job keys, clashing columns, oversized Batch lines,
a budget without usage. Each is one line for the person and costs nothing, or is counted safely."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO, Emulator, cli_env, run_here, start_emulator, stop_emulator, write_csv, write_job


def test_a_key_given_twice_names_both_lines(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url)
    text = job.read_text() + "run:\n  concurrency: 2\n"
    job.write_text(text)
    lines = [i for i, t in enumerate(text.splitlines(), 1) if t.startswith("run:")]
    for command in ("validate", "run"):
        result = run_here(command, str(job))
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip() == (
            f"batchrun: error: {job}:{lines[1]}: the key 'run' is given twice (lines {lines[0]} and {lines[1]}); "
            "YAML keeps only the last, so merge them into one"
        )
    assert emulator.stats()["requests"] == 0


def test_a_nested_key_given_twice_is_refused(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url)
    job.write_text(job.read_text().replace("  concurrency: 8", "  concurrency: 8\n  concurrency: 1"))
    result = run_here("validate", str(job))
    assert result.returncode == 2
    assert "the key 'run.concurrency' is given twice" in result.stderr


def test_every_clashing_input_column_is_named(tmp_path: Path, emulator: Emulator) -> None:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "status", "model", "attempts"], [["A", "x", 1, 2, 3]])
    job = write_job(tmp_path, emulator.url)
    result = run_here("validate", str(job))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    for column in ("status", "model", "attempts"):
        assert f"'{column}'" in result.stderr and f"'input_{column}'" in result.stderr
    assert emulator.stats()["requests"] == 0


def _rows_with_empty_cells(folder: Path, suffix: str) -> Path:
    rows = {
        "id": ["A", "B", "C"],
        "title": ["kettle", None, "lamp"],
        "note": ["old", None, None],
        "image": ["rose.png", None, None],
    }
    shutil.copy(REPO / "sample_data" / "images" / "rose.png", folder)
    path = folder / f"rows{suffix}"
    if suffix == ".csv":  # empty cells, as a spreadsheet writes them
        write_csv(path, list(rows), [[value or "" for value in row] for row in zip(*rows.values())])
    else:
        pl.DataFrame(rows).write_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_empty_cells_and_nulls_render_as_empty_text_and_no_image(
    tmp_path: Path, emulator: Emulator, suffix: str
) -> None:
    path = _rows_with_empty_cells(tmp_path, suffix)
    job = write_job(
        tmp_path,
        emulator.url,
        input={"path": path.name, "id_column": "id"},
        prompt={
            "system": "{% if true %}Notes: {{ note }}.{% endif %}",  # a template Jinja renders
            "user": "Describe {{ title }} now",  # a plain substitution (rendered without Jinja)
            "images": ["{{ image }}"],
        },
    )
    checked = run_here("validate", str(job), "--show=3")
    assert checked.returncode == 0, checked.stderr
    assert "None" not in checked.stdout
    assert '"Describe  now"' in checked.stdout and '"Notes: ."' in checked.stdout
    assert (
        "empty values: 2 rows have an empty value in a column the prompt uses (image: 2, note: 2, title: 1)"
    ) in checked.stdout
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet").sort("id")
    assert out["status"].to_list() == ["ok", "ok", "ok"]
    assert out["response_text"].to_list()[1:] == [
        "Emulated answer about: Notes Describe now",
        "Emulated answer about: Notes Describe lamp now",
    ]
    assert out["response_text"][0].startswith("A ")  # the one image, described


def _request_line(custom_id: str, text: str) -> bytes:
    body = {"model": "gpt-5.4", "messages": [{"role": "user", "content": text}], "max_completion_tokens": 20}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()


def _batch_file_with_a_long_line(folder: Path, long_line: int, megabytes: int) -> Path:
    path = folder / "requests.jsonl"
    with path.open("wb") as f:
        for n in range(1, 4):
            text = "x" * (megabytes << 20) if n == long_line else "I love this kettle."
            f.write(_request_line(f"r-{n}", text) + b"\n")
    return path


@pytest.mark.parametrize("long_line,command", [(1, "validate"), (2, "run")])
def test_a_request_line_over_the_cap_is_one_line_naming_it(
    tmp_path: Path, emulator: Emulator, long_line: int, command: str
) -> None:
    path = _batch_file_with_a_long_line(tmp_path, long_line, 65)  # just over the 64 MB cap
    job = write_job(tmp_path, emulator.url, input={"path": path.name}, model=None, prompt={})
    result = run_here(command, str(job))
    assert result.returncode == 2, result.stdout + result.stderr
    (message,) = result.stderr.strip().splitlines()
    assert f"requests.jsonl: line {long_line} is longer than 64 MB, the cap on one request line" in message
    assert emulator.stats()["requests"] == 0


@pytest.mark.slow
def test_validate_reads_a_300_mb_line_in_bounded_memory(tmp_path: Path, emulator: Emulator) -> None:
    """A 300 MB line took 2.8 GB and 31 s in validate; refused at the cap, it costs about the cap."""
    path = _batch_file_with_a_long_line(tmp_path, 2, 300)
    job = write_job(tmp_path, emulator.url, input={"path": path.name}, model=None, prompt={})
    # The peak of this process's own memory (VmHWM: ru_maxrss would count the parent's, from before exec).
    code = "import sys; from batchrun.cli import main; main(sys.argv[1:]); " + (
        "print(next(int(l.split()[1]) >> 10 for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "validate", str(job)], env=cli_env(), capture_output=True, text=True
    )
    assert "line 2 is longer than 64 MB" in result.stderr
    assert int(result.stdout.split()[-1]) < 600, result.stdout  # MB: the cap held a few times, and Python


@pytest.mark.parametrize("fault", ["no-usage", "usage-float"])
def test_a_budget_holds_when_the_relay_sends_no_usable_usage(tmp_path: Path, fault: str) -> None:
    """Answers without token counts (or with negative, fractional ones) are counted at their worst case: the
    budget stops the run as early as it would if usage came, and the summary says how many were counted so."""
    from test_spend import PRICING

    write_csv(
        tmp_path / "reviews.csv",
        ["review_id", "text"],
        [[f"M{i:03d}", f"Review number {i}: the kettle is fine."] for i in range(40)],
    )
    relay = start_emulator("--fault", f"{fault}=1")
    try:
        run = {"concurrency": 2, "max_attempts": 2, "timeout_s": 30, "max_cost": 0.5}
        job = write_job(tmp_path, relay.url, pricing=PRICING, run=run)
        stopped = run_here("run", str(job), "--quiet")
        assert stopped.returncode == 4, stopped.stdout + stopped.stderr
        sent = relay.stats()["requests"]
        assert 0 < sent < 40
        finished = run_here("run", str(job), "--max-cost", "100")
    finally:
        stop_emulator(relay)
    assert finished.returncode == 0, finished.stderr
    assert (
        f"{40 - sent} answers came without usable token counts: the budget counted each at its worst case"
        in finished.stdout
    )
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["answers_without_usage"] == 40 - sent

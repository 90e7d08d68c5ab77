"""Issue 25, input and money: empty cells, duplicate job keys, clashing columns, oversized Batch lines,
a budget without usage. Each is one line for the person and costs nothing, or is counted safely."""

from __future__ import annotations

from pathlib import Path

from conftest import Emulator, run_here, write_csv, write_job


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

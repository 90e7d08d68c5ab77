"""Bad input: one clear line naming the file and the key, no traceback, nothing sent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Emulator, run_cli, run_here, write_csv, write_job


def _yaml_syntax(folder: Path, url: str) -> Path:
    job = write_job(folder, url)
    job.write_text(job.read_text() + "run: {concurrency: 4\n")
    return job


def _duplicate_ids(folder: Path, url: str) -> Path:
    write_csv(folder / "reviews.csv", ["review_id", "text"], [["A", "x"], ["B", "y"], ["A", "z"]])
    return write_job(folder, url)


CASES: dict[str, tuple[Callable[[Path, str], Path], list[str], dict[str, Any]]] = {
    "yaml syntax": (_yaml_syntax, ["job.yaml:", "YAML syntax error"], {}),
    "unknown key": (
        lambda f, u: write_job(f, u, run={"concurency": 4}),
        ["job.yaml:", "unknown key 'run.concurency'", "concurrency"],
        {},
    ),
    "wrong type": (
        lambda f, u: write_job(f, u, run={"concurrency": "many"}),
        ["job.yaml:", "run.concurrency", "'many'"],
        {},
    ),
    "missing input": (
        lambda f, u: write_job(f, u, input={"path": "nope.csv"}),
        ["input.path nope.csv", "not found"],
        {},
    ),
    "bad extension": (lambda f, u: write_job(f, u, input={"path": "job.yaml"}), ["unsupported extension '.yaml'"], {}),
    "id column missing": (
        lambda f, u: write_job(f, u, input={"path": "reviews.csv", "id_column": "sku"}),
        ["input.id_column", "'sku'", "review_id, text, stars"],
        {},
    ),
    "duplicate ids": (_duplicate_ids, ["'review_id' is not unique", "A"], {}),
    "template variable": (
        lambda f, u: write_job(f, u, prompt={"user": "Rate {{ body }}"}),
        ["prompt.user", "'body'", "review_id, text, stars"],
        {},
    ),
    "missing key variable": (
        lambda f, u: write_job(f, u),
        ["provider.api_key_env", "TEST_RELAY_KEY is not set"],
        {"TEST_RELAY_KEY": None},
    ),
    "owned param": (
        lambda f, u: write_job(f, u, params={"messages": []}),
        ["params.messages", "batchrun sets this"],
        {},
    ),
    "output is the input": (
        lambda f, u: write_job(f, u, output={"path": "reviews.csv"}),
        ["output.path", "reviews.csv is the input", "another path"],
        {},
    ),
    "result column in the input": (
        lambda f, u: (
            write_csv(f / "reviews.csv", ["review_id", "text", "status"], [["A", "x", "new"]]) and write_job(f, u)
        ),
        ["input.path reviews.csv", "column 'status'", "rename", "input_status"],
        {},
    ),
    "not supported yet": (
        lambda f, u: write_job(f, u, output={"path": "o.parquet", "sharded": True}),
        ["output.sharded", "not supported yet"],
        {},
    ),
}


RUN_ONLY = {"missing key variable"}  # validate sends nothing, so it needs no key


@pytest.mark.parametrize(
    "case,command", [(c, m) for c in sorted(CASES) for m in ("run", "validate") if m == "run" or c not in RUN_ONLY]
)
def test_bad_input_is_one_line_and_sends_nothing(
    case: str, command: str, tmp_path: Path, reviews: Path, emulator: Emulator
) -> None:
    make, expected, env = CASES[case]
    job = make(tmp_path, emulator.url)
    args = (command, str(job), "--quiet" if command == "run" else "--show=1")
    result = run_here(*args, env=env)
    if case == "unknown key":  # a real process says the same and nothing more (no warning, no traceback)
        assert run_cli(*args, env=env).stderr == result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(job.parent) in lines[0] or "job.yaml" in lines[0]
    for fragment in expected:
        assert fragment in lines[0]
    assert emulator.stats()["requests"] == 0
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_unknown_key_names_its_line(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url)
    text = job.read_text().replace("  concurrency: 8", "  concurrency: 8\n  colour: blue")
    job.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "colour" in t)
    result = run_here("validate", str(job))
    assert f"job.yaml:{line}: unknown key 'run.colour'" in result.stderr


def test_validate_shows_requests_and_sends_nothing(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url)
    result = run_here("validate", str(job))
    assert result.returncode == 0, result.stderr
    assert "6 rows" in result.stdout
    assert '"max_completion_tokens": 20' in result.stdout
    assert "I love this kettle" in result.stdout
    assert emulator.stats()["requests"] == 0

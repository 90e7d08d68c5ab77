"""Shared fixtures: the emulator as a real server process, the CLI as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-batchrun-test-key-5f0c2e9a71"  # distinctive, so a leak is easy to find
# Where runs note their checkpoint's place (resume.py): the tests' own, not the user's home.
STATE_DIR = tempfile.mkdtemp(prefix="batchrun-test-state-")


def cli_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KUAIMA_API_KEY"}
    env["TEST_RELAY_KEY"] = TEST_KEY
    env["BATCHRUN_STATE_DIR"] = STATE_DIR
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)  # None removes a variable
        else:
            env[key] = value
    return env


@dataclass
class Emulator:
    url: str
    process: subprocess.Popen[str]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_emulator/stats", timeout=10) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/_emulator/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).close()


def start_emulator(*args: str, env: dict[str, str | None] | None = None) -> Emulator:
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "emulator", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(env),
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"emulator did not start: {line!r} {process.stderr.read() if process.stderr else ''}")
    return Emulator(line.split("listening on ", 1)[1].strip(), process)


def stop_emulator(emulator: Emulator) -> None:
    emulator.process.terminate()
    try:
        emulator.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        emulator.process.kill()


@pytest.fixture(scope="session")
def shared_emulator() -> Iterator[Emulator]:
    emulator = start_emulator()
    yield emulator
    stop_emulator(emulator)


@pytest.fixture
def emulator(shared_emulator: Emulator) -> Emulator:
    """The session's emulator, with its counters reset for this test."""
    shared_emulator.reset()
    return shared_emulator


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str | None] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchrun", *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_finished(result: subprocess.CompletedProcess[str], output: Path) -> None:
    """A finished run's exit code matches its output: 0 when every row is ok, 5 when some ended in error."""
    import polars as pl

    assert result.returncode in (0, 5), result.stdout + result.stderr
    failed = (pl.read_parquet(output)["status"] == "error").any()
    assert result.returncode == (5 if failed else 0), result.stdout + result.stderr


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_job(folder: Path, base_url: str, **overrides: Any) -> Path:
    """A small labelling job over `reviews.csv` in `folder`; `overrides` replace top-level sections."""
    job: dict[str, Any] = {
        "name": "test-job",
        "input": {"path": "reviews.csv", "id_column": "review_id"},
        "provider": {"api": "openai-chat", "base_url": base_url, "api_key_env": "TEST_RELAY_KEY"},
        "model": "gpt-5.4",
        "prompt": {
            "system": "You label product reviews.",
            "user": "Review: {{ text }}\nAnswer positive, negative or neutral.",
        },
        "params": {"max_completion_tokens": 20},
        "output": {"path": "out/result.parquet"},
        "run": {"concurrency": 8, "max_attempts": 5, "timeout_s": 30},
    }
    job.update(overrides)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


REVIEWS = [
    ["R1", "I love this kettle, it works perfectly.", 5],
    ["R2", "The lid broke after a week, terrible.", 1],
    ["R3", "It arrived on Tuesday in a box.", 3],
    ["R4", "Excellent grinder, great value.", 5],
    ["R5", "Leaks everywhere, waste of money.", 1],
    ["R6", "The colour is as pictured.", 3],
]
EXPECTED_LABELS = {
    "R1": "positive",
    "R2": "negative",
    "R3": "neutral",
    "R4": "positive",
    "R5": "negative",
    "R6": "neutral",
}


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "reviews.csv", ["review_id", "text", "stars"], REVIEWS)


def assert_key_nowhere(folder: Path, *results: subprocess.CompletedProcess[str], key: str = TEST_KEY) -> None:
    """The key is in no output stream and no file under the job's folder (Parquet read back, not just scanned)."""
    import polars as pl

    forms = {key, key.removeprefix("sk-")}
    for result in results:
        for form in forms:
            assert form not in result.stdout + result.stderr
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for form in forms:
            assert form.encode() not in data, path
        if path.suffix == ".parquet":  # compressed pages would hide it from a byte scan
            text = pl.read_parquet(path).select(pl.all().cast(pl.String)).write_csv()
            for form in forms:
                assert form not in text, path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timeline(emulator: Emulator) -> list[list[int]]:
    """[second, requests, 429s] for each second the emulator saw requests."""
    with urllib.request.urlopen(emulator.url + "/_emulator/timeline", timeout=10) as r:
        return json.loads(r.read())

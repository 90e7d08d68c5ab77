"""Shared fixtures: the emulator as a real server process; the CLI as a real process, or in this one.

Two tiers: `pytest -n 2 -m "not slow and not ray"` is the fast one, run before each commit;
`pytest` (CI) runs everything. Tests that only need a run use `run_here` / `run_job`
(the CLI's own `main` in this process: no Python start-up per run); tests about exit
codes on signals, kill -9 and what a real process prints keep `run_cli`.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import random
import signal
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
# Where runs note their checkpoint's place (engines/resume.py): the tests' own, not the user's home.
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


_LIBC = ctypes.CDLL(None, use_errno=True)  # looked up before any fork: die_with_parent only calls it
PR_SET_PDEATHSIG = 1
_TEST_PROCESS = os.getpid()


def die_with_parent() -> None:
    """A test server's `preexec_fn`: the kernel kills it when the test process dies, even by kill -9
    (else a crashed xdist worker leaves its servers running). Linux only; elsewhere servers outlive it.

    The signal comes when the thread that started it ends: start servers from the main thread (fixtures do).
    """
    if sys.platform == "linux":
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != _TEST_PROCESS:  # it died before the line above: nothing would signal us
            os._exit(1)


def start_emulator(*args: str, env: dict[str, str | None] | None = None) -> Emulator:
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "emulator", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(env),
        preexec_fn=die_with_parent,
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


SEED_VARIABLE = "BATCHRUN_TEST_SEED"


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Every test's randomness (the `random` module, and `random.Random(seed)` where a test wants its own) from
    one seed: BATCHRUN_TEST_SEED if set, else a fresh one, shown when the test fails."""
    value = int(os.environ.get(SEED_VARIABLE) or random.randrange(2**32))
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"{SEED_VARIABLE}={value} reproduces this test's random choices"))


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


def run_here(
    *args: str, cwd: Path | None = None, env: dict[str, str | None] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`run_cli` in this process: the CLI's exit code, stdout and stderr, without starting Python again.

    This process already has `run_cli`'s environment (set on import, below). One that differs (`env`)
    is given to a real process instead: setting variables here would race the threads of this process
    that read them (C's setenv is not thread-safe; polars, SQLite and server threads call getenv), which
    crashed one fast-tier worker in three. (`timeout` is accepted for a like-for-like call; a run here is
    bounded by its job's own timeouts.)
    """
    if env:
        return run_cli(*args, cwd=cwd, env=env, timeout=timeout)
    from batchrun.cli import main

    saved_cwd = os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["batchrun", *args], code, out.getvalue(), err.getvalue())


# The environment of `run_cli`'s processes is this one's, for in-process runs; set now, before threads start.
os.environ.update({k: v for k, v in cli_env().items() if os.environ.get(k) != v and k != "PYTHONPATH"})
os.environ.pop("KUAIMA_API_KEY", None)


def run_job(folder: Path, rows: list[list[Any]], url: str, *args: str, **job: Any) -> tuple[dict[str, Any], Any]:
    """A labelling job over `rows` (review_id, text[, stars]) run in this process: (summary, output frame).

    `job` replaces top-level sections of `write_job`'s job; the exit code must match the output
    (`assert_finished`: 0 when every row is ok, 5 when some ended in error).
    """
    import polars as pl

    write_csv(folder / "reviews.csv", ["review_id", "text", "stars"][: len(rows[0])], rows)
    path = write_job(folder, url, **job)
    result = run_here("run", str(path), "--quiet", *args)
    from batchrun.results.output import summary_path

    output = folder / yaml.safe_load(path.read_text())["output"]["path"]
    assert_finished(result, output)
    return json.loads(summary_path(output).read_text()), pl.read_parquet(output)


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

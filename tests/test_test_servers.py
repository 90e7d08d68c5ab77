"""The test harness itself: in-process runs never touch the C environment (setenv racing another
thread's getenv crashed a worker), and test servers end with the test process even when it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Emulator, cli_env, run_here, write_job

from batchrun.cli import POLARS_ALLOCATOR_CONF


def test_in_process_runs_leave_the_c_environment_alone(
    tmp_path: Path, reviews: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = write_job(tmp_path, emulator.url)
    # First, a run that imports what runs use: numpy and polars set variables of their own on import, once.
    assert run_here("run", str(job), "--quiet", "--restart").returncode == 0
    changed: list[str] = []
    monkeypatch.setattr(os, "putenv", lambda key, value: changed.append(key))
    monkeypatch.setattr(os, "unsetenv", lambda key: changed.append(key))
    assert run_here("run", str(job), "--quiet", "--restart", env={"BATCHRUN_TEST_EXTRA": "1"}).returncode == 0
    assert run_here("validate", str(job), env={"TEST_RELAY_KEY": None}).returncode == 0
    assert changed == []
    assert "BATCHRUN_TEST_EXTRA" not in os.environ


def test_main_called_in_a_running_process_sets_no_variable(tmp_path: Path) -> None:
    """Only the command's own entry point sets the allocator's variable; `main` called from Python does not."""
    code = (
        "import os, sys; from batchrun.cli import main; assert 'polars' not in sys.modules; "
        "main(['validate', 'nowhere.yaml']); print(os.environ.get('_RJEM_MALLOC_CONF'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env({"_RJEM_MALLOC_CONF": None}), capture_output=True
    )
    assert POLARS_ALLOCATOR_CONF not in result.stdout.decode(), result.stderr  # polars' own setting at most


PARENT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from conftest import start_emulator
print(start_emulator().process.pid, flush=True)
time.sleep(120)
"""


def test_an_emulator_ends_with_a_test_process_killed_by_sigkill() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(REPO / "tests")], stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes, as in some containers, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")

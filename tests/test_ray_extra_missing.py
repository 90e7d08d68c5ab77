"""Without the `ray` extra (a core install): `--engine ray` says what to install, the local engine never needs it.

Run in every install, Ray's or not: `ray` is blocked in the processes these tests start.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Emulator, cli_env, run_cli, write_job

BLOCK_RAY = "import sys; sys.modules['ray'] = None; from batchrun.cli import main; sys.exit(main(sys.argv[1:]))"


def test_engine_ray_without_the_extra_says_what_to_install(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    """With `ray` not importable (as in a core install), --engine ray is one line; the local engine never needs it."""
    job = write_job(tmp_path, emulator.url)
    refused = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, "run", str(job), "--engine", "ray"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert (
        refused.stderr
        == "batchrun: error: --engine ray needs Ray, which is not installed: pip install 'batchrun[ray]'\n"
    )
    assert emulator.stats()["requests"] == 0

    local = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, "run", str(job), "--quiet"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert local.returncode == 0, local.stderr
    assert emulator.stats()["requests"] == 6


def test_bench_engine_ray_says_what_it_cannot_do(tmp_path: Path) -> None:
    """`bench --engine ray` measures Ray alone: with another bench's option, or without Ray, one line and exit 2."""
    mixed = run_cli("bench", "--engine", "ray", "--push-back")
    assert mixed.returncode == 2
    assert "bench --engine ray measures the Ray engine alone" in mixed.stderr, mixed.stderr
    without_ray = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, "bench", "--engine", "ray", "--quick"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert without_ray.returncode == 2
    assert without_ray.stderr == (
        "batchrun: error: --engine ray needs Ray, which is not installed: pip install 'batchrun[ray]'\n"
    )

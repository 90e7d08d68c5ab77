"""mypy (config in pyproject.toml) and ruff over the package, so CI fails on a type or lint error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a cold mypy run takes about 15 s of CPU
def test_mypy_is_clean() -> None:
    result = run("mypy", "--no-incremental")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    lint = run("ruff", "check", "batchrun", "tests")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    formatted = run("ruff", "format", "--check", "batchrun", "tests")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr

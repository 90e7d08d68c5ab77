"""Stops told apart: a full disk and a read-only checkpoint are one line each, never "damaged",
never a traceback, and the answers stored before are kept. A real small file system (tmpfs) is mounted,
so these tests need root (they skip elsewhere)."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Emulator, run_here, write_csv, write_job

ROWS = 6000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _remount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)


def _stored(disk: Path, read_only: bool = False) -> int:
    """Rows the checkpoint holds (with its WAL; on a read-only mount SQLite can only read the main file)."""
    db = disk / "out" / "result.parquet.batchrun" / "checkpoint.sqlite"
    with sqlite3.connect(f"file:{db}?{'immutable=1' if read_only else 'mode=ro'}", uri=True) as conn:
        return conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0]


def test_disk_full_stops_with_one_line_and_keeps_stored_answers(
    tmp_path: Path, small_disk: Path, emulator: Emulator
) -> None:
    rows = [[f"R{i}", f"review number {i} " + "x" * 60] for i in range(ROWS)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = write_job(small_disk, emulator.url, input={"path": str(tmp_path / "reviews.csv"), "id_column": "review_id"})
    full = run_here("run", str(job), "--quiet", timeout=300)
    assert full.returncode == 3, full.stderr
    assert "Traceback" not in full.stderr and "disk is full" in full.stderr and "--restart" not in full.stderr
    stored = _stored(small_disk)
    assert 0 < stored < ROWS
    sent_first = emulator.stats()["requests"]

    _remount(small_disk, "size=64m")  # space freed
    done = run_here("run", str(job), "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr
    assert _stored(small_disk) == ROWS
    assert emulator.stats()["requests"] - sent_first == ROWS - stored  # what was stored is not asked again


def test_read_only_checkpoint_is_not_called_damaged(tmp_path: Path, small_disk: Path, emulator: Emulator) -> None:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], [["R1", "a"], ["R2", "b"]])
    job = write_job(small_disk, emulator.url, input={"path": str(tmp_path / "reviews.csv"), "id_column": "review_id"})
    first = run_here("run", str(job), "--quiet", "--limit", "1")
    assert first.returncode == 0, first.stderr
    _remount(small_disk, "ro")
    result = run_here("run", str(job), "--quiet")
    assert result.returncode in (2, 3) and "Traceback" not in result.stderr, result.stderr
    assert "damaged" not in result.stderr and "--restart" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _stored(small_disk, read_only=True) == 1

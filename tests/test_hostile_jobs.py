"""Hostile job files and inputs are cheap to refuse: one line, no traceback, nothing sent."""

from __future__ import annotations

import os
import time
from pathlib import Path

import polars as pl
import yaml
from conftest import TEST_KEY, Emulator, assert_finished, run_here, write_csv, write_job


def test_a_yaml_alias_bomb_is_refused_in_bounded_time(tmp_path: Path, reviews: Path) -> None:
    job = yaml.safe_load(write_job(tmp_path, "emulator").read_text())
    bomb = ['lol: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    bomb += [f"l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = yaml.safe_dump({k: v for k, v in job.items() if k != "params"}, sort_keys=False)
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\n" + text + "params: {x: *a9}\n")
    assert path.stat().st_size < 2048
    started = time.monotonic()
    result = run_here("validate", str(path), timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "expands to more than" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_templates_cannot_reach_the_environment(tmp_path: Path, reviews: Path) -> None:
    prompt = {"user": "{{ cycler.__init__.__globals__.os.environ['TEST_RELAY_KEY'] }} {{ text }}"}
    job = write_job(tmp_path, "emulator", prompt=prompt)
    shown = run_here("validate", str(job))
    assert "Traceback" not in shown.stderr and TEST_KEY not in shown.stdout + shown.stderr
    assert "unsafe" in shown.stdout
    ran = run_here("run", str(job), "--quiet")
    assert_finished(ran, tmp_path / "out" / "result.parquet")
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["error_class"].to_list() == ["input"] * 6


def test_a_key_too_short_to_mask_is_refused(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url)
    result = run_here("run", str(job), "--quiet", env={"TEST_RELAY_KEY": "0000"})
    assert result.returncode == 2 and "too short" in result.stderr
    assert emulator.stats()["requests"] == 0


def test_a_fifo_as_an_image_is_an_input_error_not_a_hang(tmp_path: Path, emulator: Emulator) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "img"], [["R1", "a", "pipe.png"]])
    prompt = {"user": "{{ text }}", "images": ["{{ img }}"]}
    job = write_job(tmp_path, emulator.url, prompt=prompt)
    result = run_here("run", str(job), "--quiet", timeout=60)
    assert_finished(result, tmp_path / "out" / "result.parquet")
    row = pl.read_parquet(tmp_path / "out" / "result.parquet").row(0, named=True)
    assert row["error_class"] == "input" and "not a regular file" in row["error"]

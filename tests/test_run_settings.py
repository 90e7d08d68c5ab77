"""One way to set a run: a setting given as a flag, as a keyword argument or in the job file is validated
by the job model alone, so all three give it the same bound and the same one-line message; `--base-url`
(`base_url=`) points a job at another relay without editing it; Python's messages name keyword arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from conftest import REVIEWS, Emulator, run_here, write_csv, write_job

import batchrun
from batchrun.base.errors import JobError

NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing answers there

# flag, keyword, value beyond the job file's bound, that bound's key in the job file
OUT_OF_BOUNDS = [
    ("--concurrency", "concurrency", 200_000, ("run", "concurrency")),
    ("--concurrency", "concurrency", 0, ("run", "concurrency")),
    ("--max-cost", "max_cost", -1.0, ("run", "max_cost")),
    ("--base-url", "base_url", "ftp://relay.example", ("provider", "base_url")),
]
PRICING = {"input_per_million": 1.0, "output_per_million": 2.0}


@pytest.fixture
def job_file(tmp_path: Path, emulator: Emulator) -> Path:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "stars"], REVIEWS)
    return write_job(tmp_path, emulator.url, pricing=PRICING)


def _problem(message: str) -> str:
    """The message without where the setting was given (file:line, the flag, the keyword)."""
    return message.split(": ", 1)[1]


@pytest.mark.parametrize(("flag", "keyword", "value", "key"), OUT_OF_BOUNDS)
def test_a_setting_has_one_bound_and_one_message_however_it_is_given(
    tmp_path: Path, job_file: Path, emulator: Emulator, flag: str, keyword: str, value: Any, key: tuple[str, str]
) -> None:
    section, name = key
    job = yaml.safe_load(job_file.read_text(encoding="utf-8"))
    job[section][name] = value
    in_file = tmp_path / "in_file.yaml"
    in_file.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    from_file = run_here("validate", str(in_file))
    from_flag = run_here("run", str(job_file), flag, str(value))
    with pytest.raises(JobError) as from_keyword:
        batchrun.run(str(job_file), **{keyword: value}, quiet=True)

    file_line = from_file.stderr.strip().removeprefix("batchrun: error: ")
    flag_line = from_flag.stderr.strip().removeprefix("batchrun: error: ")
    keyword_line = str(from_keyword.value)
    assert file_line.startswith(f"{in_file}:") and f"{section}.{name}: " in file_line
    assert flag_line.startswith(f"{flag}: {section}.{name}: ")
    assert keyword_line.startswith(f"{keyword}=: {section}.{name}: ")
    assert _problem(file_line) == _problem(flag_line) == _problem(keyword_line)
    assert "\n" not in flag_line and from_flag.returncode == 2
    assert emulator.stats()["requests"] == 0


def test_base_url_points_a_job_at_the_emulator_without_editing_it(job_file: Path, emulator: Emulator) -> None:
    text = job_file.read_text(encoding="utf-8").replace(emulator.url, NOWHERE)
    job_file.write_text(text, encoding="utf-8")

    checked = run_here("validate", str(job_file), "--base-url", emulator.url)
    assert checked.returncode == 0 and f"POST {emulator.url}/v1/chat/completions" in checked.stdout
    ran = run_here("run", str(job_file), "--quiet", "--base-url", emulator.url)
    assert ran.returncode == 0, ran.stderr
    assert emulator.stats()["requests"] == len(REVIEWS)
    assert "--base-url" not in job_file.read_text(encoding="utf-8") and NOWHERE in job_file.read_text(encoding="utf-8")
    status = run_here("status", str(job_file), "--base-url", emulator.url)
    assert status.returncode == 0 and f"{len(REVIEWS)} ok" in status.stdout.replace("ok:", "ok")

    again = batchrun.run(str(job_file), base_url=emulator.url, restart=True, quiet=True)
    assert set(again["status"]) == {"ok"}
    assert batchrun.status(str(job_file), base_url=emulator.url).ok == len(REVIEWS)
    plan = batchrun.validate(str(job_file), base_url=emulator.url)
    assert plan.endpoint.endswith(f"POST {emulator.url}/v1/chat/completions")


def test_python_errors_name_keyword_arguments(job_file: Path, emulator: Emulator) -> None:
    batchrun.run(str(job_file), quiet=True)
    text = job_file.read_text(encoding="utf-8").replace("You label product reviews.", "You label reviews.")
    job_file.write_text(text, encoding="utf-8")

    with pytest.raises(JobError) as changed:
        batchrun.run(str(job_file), quiet=True)
    assert "rerun_changed=True" in str(changed.value) and "restart=True" in str(changed.value)
    assert "--" not in str(changed.value)
    status = batchrun.status(str(job_file))
    assert any("rerun_changed=True or restart=True" in line for line in status.lines)
    with pytest.raises(JobError, match=r"^limit=: must be at least 1 \(got 0\)$"):
        batchrun.run(str(job_file), limit=0, quiet=True)

    from_cli = run_here("run", str(job_file))
    assert "--rerun-changed" in from_cli.stderr and "rerun_changed=True" not in from_cli.stderr
    rerun = batchrun.run(str(job_file), rerun_changed=True, quiet=True)
    assert rerun.height == len(REVIEWS) and isinstance(rerun, pl.DataFrame)

"""Money: validate's estimate, the budget stop, and identical requests paid once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import REPO, Emulator, run_here, write_csv, write_job

PRICING = {"input_per_million": 1000, "output_per_million": 2000, "currency": "USD"}


def _demo_copy(folder: Path) -> Path:
    """jobs/demo.yaml with its input and output moved to `folder` (it still starts its own emulator)."""
    job = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    job["input"]["path"] = str(REPO / "sample_data" / "reviews.csv")
    job["output"]["path"] = "out/demo.parquet"
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _amounts(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(\d+\.\d+) USD", line)]


def test_validate_estimates_the_demo_cost_within_30_percent(tmp_path: Path) -> None:
    job = _demo_copy(tmp_path)
    validate = run_here("validate", str(job), "--show", "0")
    assert validate.returncode == 0, validate.stderr
    cost_line = next(line for line in validate.stdout.splitlines() if line.strip().startswith("cost:"))
    low, high, likely = _amounts(cost_line)
    assert "estimate for 300 rows" in validate.stdout and "20 a row, the cap in params" in validate.stdout

    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stderr
    actual = json.loads((tmp_path / "out" / "demo.summary.json").read_text())["cost"]
    assert abs(likely - actual) / actual <= 0.30, (likely, actual)
    assert low <= actual <= high
    df = pl.read_parquet(tmp_path / "out" / "demo.parquet")
    assert df.schema["label"] == pl.String and set(df["label"]) == {"positive", "negative", "neutral"}
    assert abs(df["cost"].sum() - actual) < 1e-9


def _many_rows(folder: Path, n: int) -> None:
    write_csv(
        folder / "reviews.csv",
        ["review_id", "text"],
        [[f"M{i:03d}", f"Review number {i}: the kettle is fine."] for i in range(n)],
    )


def test_a_budget_stops_the_run_midway_and_raising_it_finishes(tmp_path: Path, emulator: Emulator) -> None:
    _many_rows(tmp_path, 40)
    job = write_job(
        tmp_path,
        emulator.url,
        pricing=PRICING,
        run={"concurrency": 2, "max_attempts": 2, "timeout_s": 30, "max_cost": 0.5},
    )
    stopped = run_here("run", str(job), "--quiet", "--limit", "39")
    assert stopped.returncode == 4, stopped.stderr
    assert "budget reached: spent" in stopped.stderr and "of max_cost 0.5000 USD" in stopped.stderr
    assert "rows are pending" in stopped.stderr
    # The hint repeats the options the run was given: following it never sends rows past --limit.
    assert f"batchrun run {job} --limit 39 --max-cost HIGHER" in stopped.stderr
    assert not (tmp_path / "out" / "result.parquet").exists()
    first = emulator.stats()["requests"]
    assert 0 < first < 40

    status = run_here("status", str(job))
    spent = float(re.search(r"cost so far: (\d+\.\d+) USD", status.stdout).group(1))  # type: ignore[union-attr]
    assert spent <= 0.5, "the budget was crossed"
    assert f"{first} of 40 rows done: {first} ok, 0 failed; {40 - first} pending" in status.stdout

    again = run_here("run", str(job), "--quiet", "--max-cost", "100")
    assert again.returncode == 0, again.stderr
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df.height == 40 and set(df["status"]) == {"ok"}
    assert emulator.stats()["requests"] == 40  # every row asked exactly once over both runs
    assert set(emulator.stats()["by_prompt"].values()) == {1}


def test_a_spent_budget_sends_nothing(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(tmp_path, emulator.url, pricing=PRICING)
    result = run_here("run", str(job), "--quiet", "--max-cost", "0")
    assert result.returncode == 4 and "6 rows are pending" in result.stderr
    assert emulator.stats()["requests"] == 0


@pytest.mark.parametrize("how", ["job", "option"])
def test_a_budget_needs_pricing(tmp_path: Path, reviews: Path, emulator: Emulator, how: str) -> None:
    if how == "job":
        job = write_job(tmp_path, emulator.url, run={"max_cost": 1})
        result = run_here("run", str(job))
        assert "run.max_cost: a budget needs pricing" in result.stderr
    else:
        job = write_job(tmp_path, emulator.url)
        result = run_here("run", str(job), "--max-cost", "1")
        assert "--max-cost: run.max_cost: a budget needs pricing" in result.stderr  # the job file's own check
    assert result.returncode == 2 and emulator.stats()["requests"] == 0


def test_identical_requests_are_sent_once_and_shared(tmp_path: Path, emulator: Emulator) -> None:
    texts = ["I love this kettle.", "The lid broke.", "It is a box."]
    rows = [[f"D{i:02d}", texts[i % 3]] for i in range(12)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = write_job(tmp_path, emulator.url, pricing=PRICING, run={"concurrency": 8, "max_attempts": 2, "timeout_s": 30})
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "9 rows repeated another row's request" in result.stdout
    assert emulator.stats()["requests"] == 3

    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert set(df["status"]) == {"ok"}
    shared = df.filter(pl.col("shared_from").is_not_null())
    assert shared.height == 9 and set(shared["cost"]) == {0.0} and set(shared["attempts"]) == {0}
    sources = df.filter(pl.col("shared_from").is_null())
    assert sources.height == 3 and (sources["cost"] > 0).all()
    by_text = {t: set(df.filter(pl.col("text") == t)["response_text"]) for t in texts}
    assert all(len(answers) == 1 for answers in by_text.values())
    for row in shared.iter_rows(named=True):  # shared from a row with the same request
        source = df.filter(pl.col("review_id") == row["shared_from"]).row(0, named=True)
        assert source["text"] == row["text"]
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["shared"] == 9 and abs(summary["cost"] - sources["cost"].sum()) < 1e-12

"""`batchrun bench --quick`: the table and the JSON have every scenario; no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli


def test_quick_bench_prints_the_table_and_writes_the_figures(tmp_path: Path) -> None:
    figures = tmp_path / "bench.json"
    result = run_cli("bench", "--quick", "--json", str(figures), timeout=180)
    assert result.returncode == 0, result.stderr

    for line in ("zero latency", "200 ms latency", "checkpoint on vs off", "streaming (21 events)", "httpx", "aiohttp"):
        assert line in result.stdout
    data = json.loads(figures.read_text())
    assert data["quick"] is True and data["machine"]["cpus"] >= 1
    by_name = {s["name"]: s for s in data["scenarios"]}
    for name in ("zero latency", "200 ms latency", "checkpoint on vs off", "streaming (21 events)"):
        s = by_name[name]
        assert s["reference"]["rps"] > 0 and s["pipeline"]["rps"] > 0 and s["pipeline"]["cpu_us"] > 0
        assert s["ratio"] == round(s["pipeline"]["rps"] / s["reference"]["rps"], 3)
    assert {s["stack"] for s in data["stacks"]} >= {"httpx", "aiohttp"}
    assert data["emulator_rps_at_least"] > 0


@pytest.mark.slow
def test_push_back_bench_reports_every_scenario_against_its_target(tmp_path: Path) -> None:
    figures = tmp_path / "push-back.json"
    result = run_cli("bench", "--push-back", "--quick", "--json", str(figures), timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(figures.read_text())
    names = {f["scenario"] for f in data["push_back"]}
    assert {"random 429 at 0.1", "random 503 at 0.05", "random 429 at 0.3", "rate limit halved"} <= names
    assert all(f["target"] and isinstance(f["met"], bool) for f in data["push_back"])
    assert "push-back" in result.stdout

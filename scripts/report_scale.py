"""How long `batchrun report` takes, how much memory, and how large the page is, as the run grows.

Builds synthetic finished runs (a CSV input, a checkpoint as a run writes it: 1 % errors,
a 429 retried on 3 % of rows, ten hours of limiter seconds), then builds each one's report
in a fresh process and reads that process's peak RSS. The smallest size is the baseline
the others are compared with, measured in the same invocation.

    python scripts/report_scale.py --rows 10000 --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchrun.ledger.checkpoint import Checkpoint, RowRecord, checkpoint_folder  # noqa: E402

HOURS = 10.0
WRITE_ROWS = 50_000
MEASURE = """
import resource, sys, time
from batchrun.results.report_page import write_report
from batchrun.app.checks import load_job
started = time.perf_counter()
page = write_report(load_job(sys.argv[1]))
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, page.stat().st_size)
"""


def make_job(folder: Path, rows: int) -> Path:
    with (folder / "reviews.csv").open("w", encoding="utf-8") as f:
        f.write("review_id,text\n")
        for i in range(rows):
            f.write(f"R{i},Review number {i}: the kettle is fine but the lid is loose.\n")
    job = {
        "name": f"scale-{rows}",
        "input": {"path": "reviews.csv", "id_column": "review_id"},
        "provider": {"api": "openai-chat", "base_url": "emulator", "api_key_env": "KUAIMA_API_KEY"},
        "model": "gpt-5.4",
        "prompt": {"user": "Label: {{ text }}"},
        "params": {"max_completion_tokens": 20},
        "pricing": {"input_per_million": 1.25, "output_per_million": 10.0},
        "output": {"path": "out/result.parquet"},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    checkpoint = Checkpoint(checkpoint_folder(folder / "out" / "result.parquet"))
    start = time.time() - HOURS * 3600
    rng = random.Random(rows)
    batch: list[RowRecord] = []
    for i in range(rows):
        t = start + HOURS * 3600 * i / rows
        batch.append(_record(i, t, rng))
        if len(batch) == WRITE_ROWS:
            checkpoint._write([], batch, [])
            batch = []
    checkpoint._write([], batch, [])
    seconds = [
        (int(start) + s, 64 if s % 900 > 60 else 8, 64, 64, 1.0 if s % 900 < 20 else 0.0)
        for s in range(int(HOURS * 3600))
    ]
    checkpoint._write([], [], [], seconds)
    checkpoint.close()
    return path


def _record(i: int, t: float, rng: random.Random) -> RowRecord:
    latency = round(rng.lognormvariate(-0.5, 0.6), 4)
    row = RowRecord(
        i,
        f"R{i}",
        "ok",
        "positive",
        None,
        "stop",
        "gpt-5.4",
        40 + i % 17,
        1 + i % 5,
        latency,
        1,
        None,
        None,
        t + latency,
        started_at=t,
        attempt_log="0.000:ok",
    )
    if i % 33 == 0:  # a 429, then the answer
        row.attempts, row.attempt_log = 2, f"0.000:rate_limited:429 {latency / 2:.3f}:ok"
    if i % 100 == 0:
        row.status, row.error_class, row.error, row.attempt_log = "error", "server", "HTTP 502", "0.000:server:502"
        row.response_text = row.prompt_tokens = row.completion_tokens = None
    return row


def measure(job: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(job)], capture_output=True, text=True, cwd=REPO, check=True
    )
    seconds, rss, size = done.stdout.split()
    return {
        "seconds": round(float(seconds), 2),
        "peak_rss_mb": round(int(rss) / 2**20, 1),
        "page_kb": round(int(size) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", default=[])
    sizes = sorted(parser.parse_args().rows or [10_000, 1_000_000])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            folder = Path(tmp) / str(rows)
            folder.mkdir()
            results[rows] = measure(make_job(folder, rows))
    base = results[sizes[0]]
    for rows, r in results.items():
        ratio = {k: round(r[k] / base[k], 2) for k in r if base[k]}
        print(json.dumps({"rows": rows, **r, f"x_{sizes[0]}_rows": ratio}))


if __name__ == "__main__":
    main()

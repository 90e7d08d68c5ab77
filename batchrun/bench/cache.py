"""`batchrun bench --cache`: rows that find their prefix in the provider's prompt cache, and what that saves.

120 documents of about 1,500 tokens, 5 questions each, the 600 rows shuffled; the
emulator models a provider cache holding 16 prefixes (emulator/cache.py) and answers
after 50-100 ms. The same job runs twice in this invocation: `run.order: cache` (the
default, pipeline/cache_order.py) and `run.order: input`. A document's first question
always misses, so 80 % of rows is the most that can hit; the target is 70 %.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from batchrun.app.checks import load_job
from batchrun.base import eventloop
from batchrun.emulator.server import EmulatorConfig, running_in_thread
from batchrun.engines.runner import RunOptions, run_job

DOCUMENTS = 120
QUESTIONS = 5
CACHE_PREFIXES = 16
CONCURRENCY = 8
TARGET_HIT_SHARE = 0.70
PRICING = {"input_per_million": 1.25, "cached_input_per_million": 0.125, "output_per_million": 10.0}
KEY_ENV = "BATCHRUN_BENCH_KEY"
_WORDS = "ledger invoice harbour copper basalt meridian orchard lantern quarry tundra cobalt saffron".split()


def write_input(path: Path, seed: int = 7) -> None:
    """DOCUMENTS × QUESTIONS rows, shuffled: each document's questions spread over the whole input."""
    chance = random.Random(seed)
    documents = [f"Document {d}. " + " ".join(chance.choice(_WORDS) for _ in range(1_100)) for d in range(DOCUMENTS)]
    rows = [
        {"id": f"d{d}-q{q}", "document": documents[d], "question": f"Question {q}: what does it say about item {q}?"}
        for d in range(DOCUMENTS)
        for q in range(QUESTIONS)
    ]
    chance.shuffle(rows)
    pl.DataFrame(rows).write_parquet(path)


def write_job(folder: Path, input_path: Path, base_url: str, order: str) -> Path:
    job = {
        "name": f"bench-cache-{order}",
        "input": {"path": str(input_path), "id_column": "id"},
        "provider": {"api": "openai-chat", "base_url": base_url, "api_key_env": KEY_ENV},
        "model": "gpt-5.4",
        "prompt": {
            "system": "Answer the question about the document in one sentence.",
            "user": "{{ document }}\n\n{{ question }}",
        },
        "params": {"max_completion_tokens": 40},
        "output": {"path": f"out/{order}.parquet"},
        "run": {"concurrency": CONCURRENCY, "order": order},
        "pricing": PRICING,
    }
    path = folder / f"{order}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def run_order(folder: Path, input_path: Path, order: str) -> dict[str, Any]:
    """One run against a fresh emulator cache: the share of rows that hit it, cached tokens, cost."""
    config = EmulatorConfig(latency_s=0.05, jitter_s=0.05, cache_prefixes=CACHE_PREFIXES)
    with running_in_thread(config) as url:
        job = load_job(write_job(folder, input_path, url, order))
        summary = eventloop.run(run_job, job, RunOptions(quiet=True))
    output = pl.read_parquet(job.output_path)
    uncached_cost = (
        summary["prompt_tokens"] * PRICING["input_per_million"]
        + summary["completion_tokens"] * PRICING["output_per_million"]
    ) / 1e6
    return {
        "order": order,
        "rows": output.height,
        "ok": summary["ok"],
        "hit_share": round(output.filter(pl.col("cached_tokens") > 0).height / max(output.height, 1), 4),
        "cached_share_of_input": round(summary["cached_tokens"] / max(summary["prompt_tokens"], 1), 4),
        "cost": round(summary["cost"], 6),
        "cost_without_cache": round(uncached_cost, 6),
        "wall_s": summary["wall_s"],
    }


def measure(folder: Path) -> list[dict[str, Any]]:
    os.environ.setdefault(KEY_ENV, "sk-bench-cache")
    input_path = folder / "input.parquet"
    write_input(input_path)
    return [run_order(folder, input_path, order) for order in ("cache", "input")]


def format_figures(figures: list[dict[str, Any]]) -> str:
    most = (QUESTIONS - 1) / QUESTIONS
    lines = [
        f"prompt cache: {DOCUMENTS} documents x {QUESTIONS} questions, shuffled; a {CACHE_PREFIXES}-prefix cache, "
        f"concurrency {CONCURRENCY} (docs/caching.md)",
    ]
    for f in figures:
        lines.append(
            f"  run.order {f['order']:<5}: {f['hit_share']:.0%} of rows hit the cache (at most {most:.0%}), "
            f"{f['cached_share_of_input']:.0%} of input tokens cached; cost {f['cost']:.4f} USD "
            f"(without the cache {f['cost_without_cache']:.4f}); {f['wall_s']:.1f} s"
        )
    hit = figures[0]["hit_share"]
    verdict = "met" if hit >= TARGET_HIT_SHARE else "MISSED"
    lines.append(f"  target: >= {TARGET_HIT_SHARE:.0%} of rows hit in the cache's order: {verdict}")
    return "\n".join(lines)


def main(json_path: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-cache-") as tmp:
        figures = measure(Path(tmp))
    print(format_figures(figures))
    if json_path:
        Path(json_path).write_text(json.dumps({"cache": figures}, indent=2) + "\n", encoding="utf-8")
    return 0 if figures[0]["hit_share"] >= TARGET_HIT_SHARE else 1

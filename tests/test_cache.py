"""The provider's prompt cache: cached tokens counted and priced, the order that finds prefixes cached,
and what `validate` says; against the emulator's cache model (emulator/cache.py) over loopback."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from conftest import Emulator, run_cli, run_here, start_emulator, stop_emulator, write_csv, write_job

from batchrun.emulator.cache import PromptCache
from batchrun.flow import spend
from batchrun.job.render import Request
from batchrun.job.spec import PricingSpec
from batchrun.pipeline.cache_order import KNOWN_PREFIXES, WINDOW_ROWS, CacheOrder, prefix_share
from batchrun.pipeline.rows import WorkItem
from batchrun.protocols import gemini, openai_chat
from batchrun.results.output import summary_path

PRICING = {"input_per_million": 2.0, "cached_input_per_million": 0.5, "output_per_million": 8.0}
_WORDS = "ledger invoice harbour copper basalt meridian orchard lantern quarry tundra cobalt saffron".split()


@pytest.fixture(scope="module")
def cache_emulator() -> Iterator[Emulator]:
    emulator = start_emulator("--cache-prefixes", "16", "--latency-ms", "30")
    yield emulator
    stop_emulator(emulator)


def document(n: int, words: int = 1_000) -> str:
    chance = random.Random(n)
    return f"Document {n}. " + " ".join(chance.choice(_WORDS) for _ in range(words))


def write_questions(folder: Path, documents: int, questions: int, seed: int = 3) -> list[str]:
    """documents × questions rows, shuffled; returns the row ids in input order."""
    rows = [
        [f"d{d}-q{q}", document(d), f"Question {q}: what is said of item {q}?"]
        for d in range(documents)
        for q in range(questions)
    ]
    random.Random(seed).shuffle(rows)
    write_csv(folder / "reviews.csv", ["review_id", "document", "question"], rows)
    return [r[0] for r in rows]


def questions_job(folder: Path, url: str, *, concurrency: int = 4, order: str = "cache", **overrides: Any) -> Path:
    job: dict[str, Any] = {
        "prompt": {"system": "Answer in one sentence.", "user": "{{ document }}\n\n{{ question }}"},
        "run": {"concurrency": concurrency, "max_attempts": 3, "timeout_s": 30, "order": order},
        "pricing": PRICING,
    }
    job.update(overrides)
    return write_job(folder, url, **job)


def run_questions(folder: Path, job: Path, *args: str) -> tuple[dict[str, Any], pl.DataFrame]:
    result = run_here("run", str(job), "--quiet", *args)
    assert result.returncode == 0, result.stderr
    output = folder / "out" / "result.parquet"
    return json.loads(summary_path(output).read_text()), pl.read_parquet(output)


def hits(df: pl.DataFrame) -> int:
    return df.filter(pl.col("cached_tokens") > 0).height


# --- counted and priced ------------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "model", "stream"),
    [
        ("openai-chat", "gpt-5.4", False),
        ("openai-chat", "gpt-5.4", True),
        ("gemini", "gemini-2.5-flash", False),
        ("gemini", "gemini-2.5-flash", True),
    ],
)
def test_cached_tokens_are_a_column_and_priced_lower(
    tmp_path: Path, cache_emulator: Emulator, api: str, model: str, stream: bool
) -> None:
    cache_emulator.reset()
    ids = write_questions(tmp_path, documents=3, questions=3)
    provider = {"api": api, "base_url": cache_emulator.url, "api_key_env": "TEST_RELAY_KEY"}
    job = questions_job(tmp_path, cache_emulator.url, provider=provider, model=model, stream=stream, params={})
    summary, df = run_questions(tmp_path, job)
    assert df["review_id"].to_list() == ids
    assert df.columns.index("cached_tokens") == df.columns.index("prompt_tokens") + 1
    assert hits(df) == 6  # every question but each document's first finds the document cached
    cached = df["cached_tokens"].to_list()
    assert all(c == 0 or c >= 1024 and c % 128 == 0 for c in cached)
    assert (df["cached_tokens"] <= df["prompt_tokens"]).all()
    expected = (
        (df["prompt_tokens"] - df["cached_tokens"]) * 2.0 + df["cached_tokens"] * 0.5 + df["completion_tokens"] * 8.0
    ) / 1e6
    assert df["cost"].to_list() == pytest.approx(expected.to_list())
    assert summary["cached_tokens"] == df["cached_tokens"].sum()
    assert summary["cost"] == pytest.approx(df["cost"].sum(), abs=1e-6)
    status = run_here("status", str(job))
    assert f"({summary['cached_tokens']} of them from the provider's cache)" in status.stdout
    assert f"cost so far: {summary['cost']:.4f}" in status.stdout


def test_the_usage_fields_are_read_and_odd_ones_kept_as_null() -> None:
    answer = {
        "usage": {"prompt_tokens": 2000, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1920}}
    }
    assert openai_chat.reply_from("hi", None, [], "stop", answer).cached_tokens == 1920
    assert openai_chat.reply_from("hi", None, [], "stop", {"usage": {"prompt_tokens": 3}}).cached_tokens is None
    odd = openai_chat.reply_from("hi", None, [], "stop", {"usage": {"prompt_tokens_details": {"cached_tokens": -1}}})
    assert odd.cached_tokens is None and "cached_tokens" in odd.notes[0]
    stream = gemini.Answer(image_job=False)
    stream.add(
        {
            "candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 2000, "cachedContentTokenCount": 1024},
        }
    )
    assert stream.reply().cached_tokens == 1024


def test_cost_and_budget_count_cached_input_at_its_price() -> None:
    pricing = PricingSpec(**PRICING)
    assert spend.cost(pricing, 2_000_000, 0, cached_tokens=1_000_000) == pytest.approx(2.0 + 0.5)
    assert spend.cost(pricing, 100, 0, cached_tokens=500) == pytest.approx(100 * 0.5 / 1e6)  # never above prompt
    plain = PricingSpec(input_per_million=2.0, output_per_million=8.0)  # no cached price: input's
    assert spend.cost(plain, 2_000_000, 0, cached_tokens=1_000_000) == pytest.approx(4.0)
    budget = spend.Budget(3.0, pricing, spent=0.0)

    async def spend_twice() -> float | None:
        for _ in range(2):
            held = await budget.reserve(1_000_000, 0)  # 2.0 held: the worst case, nothing cached
            assert held is not None  # the second time: without the cached price, 2.0 spent + 2.0 > 3.0
            budget.settle(held, 1_000_000, 1_000_000, 0, 0, 1_000_000)  # all of it from the cache: 0.5
        return await budget.reserve(1_000_000, 0)

    assert anyio.run(spend_twice) is not None
    assert budget.spent == pytest.approx(1.0)


# --- the order ---------------------------------------------------------------------


def test_siblings_follow_their_first_and_the_output_keeps_input_order(tmp_path: Path, cache_emulator: Emulator) -> None:
    cache_emulator.reset()
    ids = write_questions(tmp_path, documents=8, questions=4)
    summary, df = run_questions(tmp_path, questions_job(tmp_path, cache_emulator.url, concurrency=4))
    assert df["review_id"].to_list() == ids
    assert set(df["status"]) == {"ok"}
    assert hits(df) == 24  # 3 of each document's 4 questions: the most there can be
    assert set(cache_emulator.stats()["by_prompt"].values()) == {1}


def test_order_input_sends_strictly_in_input_order(tmp_path: Path, cache_emulator: Emulator) -> None:
    cache_emulator.reset()
    ids = write_questions(tmp_path, documents=4, questions=3)
    _, df = run_questions(tmp_path, questions_job(tmp_path, cache_emulator.url, concurrency=1, order="input"))
    answered = cache_emulator.stats()["answered_at"]
    by_id = {rid: answered[f"Answer in one sentence.\n{doc}\n\n{q}"] for rid, doc, q in _rows(tmp_path)}
    assert [by_id[rid] for rid in ids] == sorted(by_id.values())
    assert df["review_id"].to_list() == ids


def test_limit_sends_exactly_the_first_rows(tmp_path: Path, cache_emulator: Emulator) -> None:
    cache_emulator.reset()
    ids = write_questions(tmp_path, documents=6, questions=3)
    _, df = run_questions(tmp_path, questions_job(tmp_path, cache_emulator.url), "--limit", "7")
    assert df["review_id"].to_list() == ids[:7]
    assert cache_emulator.stats()["requests"] == 7


def _rows(folder: Path) -> list[tuple[str, str, str]]:
    df = pl.read_csv(folder / "reviews.csv")
    return list(zip(df["review_id"], df["document"], df["question"], strict=True))


def item(idx: int, text: str) -> WorkItem:
    return WorkItem(idx, f"r{idx}", Request(system=None, user=text), 1, 1, b"", 0, None)


def test_cache_order_groups_by_the_deepest_shared_prefix() -> None:
    shared = "i" * 4096  # instructions every row shares: 1,024 tokens
    doc_a, doc_b = "a" * 8192, "b" * 8192
    order = CacheOrder(leaders_at_once=8)
    rows = [shared + doc_a + "q0", shared + doc_b + "q0", shared + doc_a + "q1", "short", shared + doc_b + "q1"]
    for idx, text in enumerate(rows):
        order.add(item(idx, text))
    taken = [order.take() for _ in range(2)]
    assert [t.idx for t in taken if t] == [0, 3]  # row 1 waits for row 0 (the instructions), 2 and 4 too
    assert order.take() is None
    order.answered(0)
    assert [order.take().idx for _ in range(2)] == [1, 2]  # type: ignore[union-attr]
    assert order.take() is None  # row 4 waits for row 1, which leads document b
    order.answered(1)
    assert order.take().idx == 4  # type: ignore[union-attr]
    assert order.held == 0 and order.held_chars == 0


def test_cache_order_bounds_its_window_and_leaders() -> None:
    order = CacheOrder(leaders_at_once=2)
    for idx in range(WINDOW_ROWS):
        order.add(item(idx, f"{idx:05d}" + "x" * 4096))  # every row its own prefix: each leads
    assert order.full
    assert [order.take().idx for _ in range(2)] == [0, 1]  # type: ignore[union-attr]
    assert order.take() is None  # two leaders awaited: the third waits for an answer
    order.answered(0)
    assert order.take().idx == 2  # type: ignore[union-attr]
    order.give_up_oldest()  # no answer for WAIT_S: one more leader may be awaited
    assert order.take().idx == 3  # type: ignore[union-attr]


@pytest.mark.slow
def test_kill_9_with_the_cache_order_then_rerun(tmp_path: Path, cache_emulator: Emulator, seed: int) -> None:
    from test_resume import assert_resumed_without_paying_twice, start_run, wait_for_requests

    cache_emulator.reset()
    ids = write_questions(tmp_path, documents=30, questions=5, seed=seed)
    job = questions_job(tmp_path, cache_emulator.url, concurrency=4)
    process = start_run(job)
    wait_for_requests(cache_emulator, 10, process)
    time.sleep(random.Random(seed).uniform(0.1, 0.8))
    killed_at = time.time()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = cache_emulator.stats()
    cache_emulator.reset()
    rerun = run_cli("run", str(job), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    second = cache_emulator.stats()
    assert first["requests"] < len(ids)  # killed mid-run
    assert_resumed_without_paying_twice(tmp_path, ids, first, second, killed_at, rerun.stdout)


# --- the emulator's cache ------------------------------------------------------------


def test_the_emulator_caches_long_prompts_in_blocks_once_answered() -> None:
    cache = PromptCache(capacity=2)
    a = "a" * 600 * 4 + "b" * 1000 * 4  # 1,600 tokens
    assert cache.cached_tokens(a) == 0  # nothing answered yet
    cache.answered(a)
    assert cache.cached_tokens(a + "more") == 1600 // 128 * 128
    assert cache.cached_tokens("a" * 600 * 4 + "c" * 4000) == 0  # 600 tokens shared: under 1,024
    cache.answered("short")
    assert cache.cached_tokens("short and more") == 0
    cache.answered("x" * 5000)
    cache.answered("y" * 5000)  # two more prefixes: the first is forgotten
    assert cache.cached_tokens(a) == 0
    assert cache.cached_tokens("y" * 5000) == 5000 // 512 * 128


# --- validate ----------------------------------------------------------------------


def test_validate_says_how_much_is_shared_and_what_the_cache_saves(tmp_path: Path, cache_emulator: Emulator) -> None:
    cache_emulator.reset()
    write_questions(tmp_path, documents=4, questions=5)
    result = run_here("validate", str(questions_job(tmp_path, cache_emulator.url)))
    assert result.returncode == 0, result.stderr
    assert "prompt cache (the first 20 rows" in result.stdout
    assert "20 rows share a prefix of at least 1,024 tokens with other rows" in result.stdout
    assert "input cost with the expected cache hits" in result.stdout
    assert "warning" not in result.stdout
    assert cache_emulator.stats()["requests"] == 0


def test_validate_warns_when_row_text_comes_before_the_shared_part(tmp_path: Path, cache_emulator: Emulator) -> None:
    write_questions(tmp_path, documents=4, questions=5)
    prompt = {"system": "Answer in one sentence.", "user": "{{ question }}\n\n{{ document }}"}
    result = run_here("validate", str(questions_job(tmp_path, cache_emulator.url, prompt=prompt)))
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stdout.splitlines() if "warning" in line)
    assert "job.yaml: prompt: 20 rows share more text at the end" in warning
    assert "put shared instructions and documents first" in warning


def test_prefix_share_counts_what_an_earlier_row_already_sent() -> None:
    doc = "d" * 8192
    share = prefix_share([doc + "q1", doc + "q2", doc + "q3", "e" * 8192 + "q"])
    assert (share.rows, share.long_enough, share.sharing) == (4, 4, 3)
    assert share.shared_tokens == 3 * 2048
    assert share.expected_cached == 2 * 2048  # the first of the three pays in full
    assert share.shared_late == 0


# --- the report --------------------------------------------------------------------


def test_the_report_shows_the_cached_share_over_time_and_what_it_saved(
    tmp_path: Path, cache_emulator: Emulator
) -> None:
    cache_emulator.reset()
    write_questions(tmp_path, documents=4, questions=3)
    job = questions_job(tmp_path, cache_emulator.url)
    _, df = run_questions(tmp_path, job)
    made = run_here("report", str(job))
    assert made.returncode == 0, made.stderr
    page = Path(made.stdout.strip()).read_text()
    cached, sent = df["cached_tokens"].sum(), df["prompt_tokens"].sum()
    saved = cached * (2.0 - 0.5) / 1e6
    assert f"{cached} of {sent} input tokens ({cached / sent:.0%}) were read from it" in page
    assert f"which cost {saved:.4f} USD less than input" in page
    chart = page[page.index("data-chart=cache") :]
    assert "class=datum" in chart[: chart.index("</svg>")]


def test_cache_order_memory_is_bounded_however_many_rows_pass() -> None:
    order = CacheOrder(leaders_at_once=4)
    for idx in range(3 * KNOWN_PREFIXES):
        order.add(item(idx, f"{idx:06d}" + "x" * 8192))  # two prefix levels each, none shared
        taken = order.take()
        assert taken is not None
        order.answered(taken.idx)
    assert len(order._index) <= KNOWN_PREFIXES
    assert not order._unanswered and not order._waiting and order.held == 0


# --- the bench ---------------------------------------------------------------------


@pytest.mark.slow
def test_bench_cache_meets_its_target(tmp_path: Path) -> None:
    from batchrun.bench.cache import TARGET_HIT_SHARE, format_figures, measure

    cache, in_order = measure(tmp_path)
    print(format_figures([cache, in_order]))
    assert cache["ok"] == in_order["ok"] == 600
    assert cache["hit_share"] >= TARGET_HIT_SHARE
    assert in_order["hit_share"] < 0.3
    assert cache["cost"] < in_order["cost"] < in_order["cost_without_cache"] + 1e-9

"""The limiter's exactness, on a virtual clock (trio's MockClock jumps to the next deadline).

Many concurrent tasks go through `Limits.slot` over several virtual minutes; the
tests record every start and check the promises on the record itself.
"""

from __future__ import annotations

import random
from bisect import bisect_left

import anyio
import pytest
from trio.testing import MockClock

from batchrun.limits import Limits, MinuteBudget, estimate_tokens
from batchrun.protocols import CallError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "trio", {"clock": MockClock(autojump_threshold=0)}


def most_in_any_window(starts: list[tuple[float, float]], window: float = 60.0) -> float:
    """The largest sum of amounts started within any half-open window [t, t + window)."""
    starts = sorted(starts)
    times = [t for t, _ in starts]
    best = 0.0
    for i, (t, _) in enumerate(starts):
        j = bisect_left(times, t + window)
        best = max(best, sum(a for _, a in starts[i:j]))
    return best


async def drive(limits: Limits, jobs: list[tuple[int, float, int | None]], concurrency: int) -> list:
    """Run jobs (estimate, hold_s, actual tokens) through the limiter; return (start, estimate, actual) records."""
    record: list[tuple[float, int, int | None]] = []
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            estimate, hold, actual = queue.pop()
            async with limits.slot(estimate) as ticket:
                record.append((anyio.current_time(), estimate, actual))
                await anyio.sleep(hold)
                limits.succeeded(ticket, actual)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return record


async def test_requests_per_minute_is_never_exceeded_and_starts_are_evenly_spaced() -> None:
    rng = random.Random(1)
    limits = Limits(concurrency=50, requests_per_minute=120)
    jobs = [(10, rng.uniform(0, 3), None) for _ in range(400)]
    record = await drive(limits, jobs, concurrency=50)
    starts = [t for t, _, _ in record]
    assert most_in_any_window([(t, 1) for t in starts]) == 120
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.5 - 1e-9  # smooth: never two starts closer than 60 / rpm
    assert starts[-1] - starts[0] <= 400 * 0.5 + 1  # and no slower than that


async def test_a_fractional_limit_rounds_down_within_the_window() -> None:
    limits = Limits(concurrency=4, requests_per_minute=2.5)
    record = await drive(limits, [(1, 0.1, None)] * 12, concurrency=4)
    assert most_in_any_window([(t, 1) for t, _, _ in record]) <= 2.5


async def test_pauses_and_shrinking_never_let_a_burst_through() -> None:
    """After a long global pause the queue of waiting rows must not rush out at once."""
    limits = Limits(concurrency=30, requests_per_minute=60)
    starts: list[float] = []

    async def row(i: int) -> None:
        async with limits.slot(10) as ticket:
            starts.append(anyio.current_time())
            await anyio.sleep(0.2)
        if i % 25 == 0:
            limits.failed(ticket, CallError("rate_limited", "slow down", status=429, retry_hint=40.0))
        else:
            limits.succeeded(ticket, None)

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(row, i)
    assert len(starts) == 200
    assert most_in_any_window([(t, 1) for t in starts]) <= 60
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 1.0 - 1e-9


async def test_tokens_per_minute_counts_the_estimate_then_the_real_usage() -> None:
    rng = random.Random(2)
    tpm = 20_000
    limits = Limits(concurrency=20, tokens_per_minute=tpm)
    jobs = []
    for _ in range(300):
        estimate = rng.randint(200, 2_000)
        jobs.append((estimate, rng.uniform(0.5, 4), rng.randint(estimate // 8, estimate)))
    record = await drive(limits, jobs, concurrency=20)
    # What the relay counts, the real usage, never passes the limit in any window.
    assert most_in_any_window([(t, actual) for t, _, actual in record]) <= tpm
    # Corrections give the overestimate back: the run goes at close to the limit in real tokens.
    span = record[-1][0] - record[0][0]
    used = sum(actual for _, _, actual in record)
    assert used / span * 60 >= 0.8 * tpm


async def test_a_request_larger_than_the_token_budget_still_goes_alone() -> None:
    limits = Limits(concurrency=4, tokens_per_minute=1_000)
    record = await drive(limits, [(300, 1, 300), (5_000, 1, 5_000), (300, 1, 300)], concurrency=1)
    t = [r[0] for r in record]
    assert t[1] - t[0] >= 18 - 1e-9  # paced after the first
    assert t[2] - t[1] >= 60  # the big one had its window to itself


def test_budget_pacing_gives_back_an_overestimate_but_saves_no_credit() -> None:
    budget = MinuteBudget(600)  # 10 per second: 0.1 s per unit
    c = budget.charge(0.0, 5)
    assert budget.wait_s(0.0, 1) == pytest.approx(0.5)
    budget.correct(c, 1, now=0.0)
    assert budget.wait_s(0.0, 1) == pytest.approx(0.1)
    budget.correct(c, 0, now=0.05)  # more back than is owed: next start is now, not earlier
    assert budget.wait_s(0.05, 1) == 0


async def test_in_flight_never_passes_concurrency_while_the_limit_shrinks_and_grows() -> None:
    limits = Limits(concurrency=8)
    now_in_flight = peak = 0
    peak_after_shrink_to_one = 0
    rng = random.Random(3)

    async def row(i: int) -> None:
        nonlocal now_in_flight, peak, peak_after_shrink_to_one
        async with limits.slot(1) as ticket:
            now_in_flight += 1
            peak = max(peak, now_in_flight)
            if limits.limit == 1 and 100 <= i < 110:
                peak_after_shrink_to_one = max(peak_after_shrink_to_one, now_in_flight)
            await anyio.sleep(rng.uniform(0.05, 0.3))
            now_in_flight -= 1
        if 60 <= i < 100:
            limits.failed(ticket, CallError("server", "busy", status=503))
        else:
            limits.succeeded(ticket, None)

    async with anyio.create_task_group() as tg:
        for i in range(400):
            tg.start_soon(row, i)
            if i in (60, 100):
                await anyio.sleep(5)  # let the wave before settle
    assert peak == 8
    assert peak_after_shrink_to_one <= 1  # 503s halved it to 1: one at a time
    assert limits.limit == 8  # and successes brought it back, not above


async def test_a_hint_pauses_every_start_and_hintless_push_back_pauses_too() -> None:
    limits = Limits(concurrency=4)
    async with limits.slot(1) as ticket:
        pass
    t0 = anyio.current_time()
    limits.failed(ticket, CallError("rate_limited", "wait", status=429, retry_hint=7.0))
    async with limits.slot(1) as ticket:
        assert anyio.current_time() - t0 == pytest.approx(7.0)
    assert limits.limit == 2
    await anyio.sleep(2)
    t1 = anyio.current_time()
    limits.failed(ticket, CallError("rate_limited", "请求数限制", status=429))
    async with limits.slot(1) as ticket:
        assert 0.5 <= anyio.current_time() - t1 <= 1.0  # the §6.1 backoff for a first push-back
    assert limits.limit == 1


async def test_hintless_push_backs_without_successes_back_off_further() -> None:
    limits = Limits(concurrency=4)
    waits = []
    for _ in range(5):
        t = anyio.current_time()
        async with limits.slot(1) as ticket:
            waits.append(anyio.current_time() - t)
        limits.failed(ticket, CallError("rate_limited", "请求数限制", status=429))
    assert waits[0] == 0
    assert 0.5 <= waits[1] <= 1 and 1 <= waits[2] <= 2 and 4 <= waits[4] <= 8  # exponential while nothing succeeds


async def test_the_breaker_holds_starts_while_the_relay_is_down_then_lets_them_go() -> None:
    limits = Limits(concurrency=4, outage_timeout_s=300)
    down = CallError("connection", "connection: [Errno 111] Connection refused")
    for _ in range(18):
        async with limits.slot(1) as ticket:
            pass
        limits.failed(ticket, down)
    assert limits.breaker.is_open and limits.excuses(down)
    probes = []
    for _ in range(4):  # each start now is a probe, 1, 2, 4, 8 s apart
        async with limits.slot(1) as ticket:
            assert ticket.probe
            probes.append(anyio.current_time())
        limits.failed(ticket, down)
    assert [round(b - a) for a, b in zip(probes, probes[1:])] == [2, 4, 8]
    async with limits.slot(1) as ticket:
        pass
    limits.succeeded(ticket, None)
    assert not limits.breaker.is_open
    async with limits.slot(1) as ticket:
        assert not ticket.probe


async def test_the_breaker_gives_up_after_the_outage_timeout() -> None:
    limits = Limits(concurrency=2, outage_timeout_s=60)
    down = CallError("server", "HTTP 502: bad gateway", status=502)
    for _ in range(18):
        async with limits.slot(1) as ticket:
            pass
        limits.failed(ticket, down)
    assert limits.breaker.is_open
    t0 = anyio.current_time()
    with pytest.raises(CallError) as caught:
        while True:
            async with limits.slot(1) as ticket:
                pass
            limits.failed(ticket, down)
    assert caught.value.abort == "A" and caught.value.error_class == "outage"
    assert "60 s" in str(caught.value) and "bad gateway" in str(caught.value)
    assert anyio.current_time() - t0 == pytest.approx(60, abs=1)


async def test_scattered_failures_do_not_open_the_breaker() -> None:
    limits = Limits(concurrency=2)
    rng = random.Random(4)
    for _ in range(2_000):
        async with limits.slot(1) as ticket:
            pass
        if rng.random() < 0.5:
            limits.failed(ticket, CallError("server", "HTTP 500", status=500))
        else:
            limits.succeeded(ticket, None)
        assert not limits.breaker.is_open


def test_estimate_is_characters_over_four_plus_the_output_cap() -> None:
    assert estimate_tokens(400, {"max_completion_tokens": 50}) == 150
    assert estimate_tokens(401, {"max_tokens": 10}) == 111
    assert estimate_tokens(8, {"generationConfig": {"maxOutputTokens": 30}}) == 32
    assert estimate_tokens(8, {}) == 2 + 256


async def test_after_a_hintless_pause_one_request_probes_before_the_rest_go() -> None:
    limits = Limits(concurrency=8)
    async with limits.slot(1) as ticket:
        pass
    limits.failed(ticket, CallError("rate_limited", "请求数限制", status=429))
    starts: list[tuple[float, bool]] = []

    async def row() -> None:
        async with limits.slot(1) as t:
            starts.append((anyio.current_time(), t.rate_probe))
            await anyio.sleep(0.5)
        limits.succeeded(t, None)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(row)
    (first, probe), *others = starts
    assert probe and not any(p for _, p in others)
    assert all(t >= first + 0.5 for t, _ in others)  # the others waited for the probe's answer


async def test_failures_stop_using_up_attempts_once_the_relay_looks_down() -> None:
    limits = Limits(concurrency=2)
    down = CallError("connection", "connection: All connection attempts failed")
    for expected in (False, False, False, False, True):
        async with limits.slot(1) as ticket:
            pass
        limits.failed(ticket, down)
        assert limits.excuses(down) is expected
    assert not limits.excuses(CallError("bad_request", "HTTP 400", status=400, retryable=False))
    async with limits.slot(1) as ticket:
        pass
    limits.succeeded(ticket, None)
    assert not limits.excuses(down)

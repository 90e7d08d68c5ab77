"""The limiter's exactness, on a virtual clock (trio's MockClock jumps to the next deadline).

Many concurrent tasks go through `Limits.slot` over several virtual minutes; the
tests record every start and check the promises on the record itself.
"""

from __future__ import annotations

import contextvars
import math
import random
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import trio
from trio.testing import MockClock

from batchrun.emulator.faults import RequestWindow, rate_limited
from batchrun.emulator.server import Stats
from batchrun.flow.keys import KeyPool
from batchrun.flow.limits import (
    LimiterChange,
    Limits,
    MinuteBudget,
    Ticket,
    estimate_tokens,
    output_cap,
    prompt_tokens_estimate,
)
from batchrun.flow.pace import LearnedWindow
from batchrun.flow.window_guess import WindowGuess
from batchrun.pipeline.transport import PUSHBACKS_EXCUSED, Outcome, backoff_delay, call_with_retries
from batchrun.protocols import CallError, Reply
from batchrun.protocols.relay_errors import QuotaGroup, QuotaLeft, from_response

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    # trio runs ready tasks in a random order on purpose; seeded, every run of a test is the same run.
    trio._core._run._r.seed(0)
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
    def estimate(chars: int, params: dict) -> int:
        return estimate_tokens(prompt_tokens_estimate(chars), output_cap(params))

    assert estimate(400, {"max_completion_tokens": 50}) == 150
    assert estimate(401, {"max_tokens": 10}) == 111
    assert estimate(8, {"generationConfig": {"maxOutputTokens": 30}}) == 32
    assert estimate(8, {}) == 2 + 256


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


# --- push-back: a relay on the virtual clock ---------------------------------------------------------

LIMITED = CallError("rate_limited", "您的请求数限制已达到上限，请稍后再试", status=429)
BUSY = CallError("server", "Service temporarily unavailable", status=503)
Answer = Callable[[float, Ticket], "CallError | QuotaLeft | None"]
# Which row and attempt is asking: trio runs ready tasks in a random order on purpose, so a relay
# that drew its verdicts in arrival order would fail different rows each run (a flaky tail).
ASKING: contextvars.ContextVar[tuple[int, int]] = contextvars.ContextVar("ASKING")


@dataclass
class RelayRun:
    wall: float
    attempts: list[tuple[float, bool]]  # (start, answered ok)
    failed_rows: int
    changes: list[LimiterChange]
    peak_in_flight: int

    @property
    def refused_share(self) -> float:
        return sum(not ok for _, ok in self.attempts) / len(self.attempts)

    def ok_per_s(self, start: float, end: float) -> float:
        return sum(ok and start <= t < end for t, ok in self.attempts) / (end - start)

    def refused_between(self, start: float, end: float) -> int:
        return sum(not ok and start <= t < end for t, ok in self.attempts)


async def relay_run(rows: int, places: int, latency: float, answer: Answer, max_attempts: int = 10) -> RelayRun:
    """Rows through the limiter and the per-row retry policy, as the runner sends them.

    `answer(now, ticket)` decides each request when it arrives (an error, a success's quota, or None: ok);
    the answer comes `latency` later. A row waiting for its retry holds no place and no worker.
    """
    changes: list[LimiterChange] = []
    limits = Limits(places, on_change=changes.append)
    workers = anyio.Semaphore(places)
    attempts: list[tuple[float, bool]] = []
    failed_rows = in_flight = peak = 0

    async def row(index: int) -> None:
        nonlocal failed_rows, in_flight, peak
        await workers.acquire()
        working = True
        for attempt in range(max_attempts):
            ASKING.set((index, attempt))
            async with limits.slot(1, retry=attempt > 0) as ticket:
                in_flight += 1
                peak = max(peak, in_flight)
                verdict = answer(anyio.current_time(), ticket)
                await anyio.sleep(latency)
                in_flight -= 1
            attempts.append((ticket.started_at, not isinstance(verdict, CallError)))
            if not isinstance(verdict, CallError):
                limits.succeeded(ticket, None, verdict)
                break
            limits.failed(ticket, verdict)
            if working:
                workers.release()  # a stand-in takes the next row meanwhile
                working = False
            random.seed(f"{index}/{attempt}")  # the back-off's jitter, the same for this row in every run
            await anyio.sleep(backoff_delay(attempt, verdict))
        else:
            failed_rows += 1
        if working:
            workers.release()

    t0 = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for index in range(rows):
            tg.start_soon(row, index)
    return RelayRun(anyio.current_time() - t0, attempts, failed_rows, changes, peak)


def at_random(share: float, error: CallError = LIMITED, seed: int = 5) -> Answer:
    """Refuses `share` of the attempts at random, the same attempts of the same rows in every run."""
    return lambda now, ticket: error if random.Random(f"{seed}/{ASKING.get()}").random() < share else None


def window_limit(per_s: Callable[[float], int]) -> Answer:
    """The relay's own limit, as the emulator keeps it: `per_s(now)` requests in any second, refused ones counted."""
    window = RequestWindow(per_s(0.0), 1.0)

    def answer(now: float, ticket: Ticket) -> CallError | None:
        window.set_limit(per_s(now))
        return None if window.admit("key", now) else LIMITED

    return answer


# The targets (1.3x, 1.3x, 2x) are held by `batchrun bench --push-back` on real runs (1.19, 1.20, 1.61).
# Here one 600-row run's tail varies with task order (10 %: 1.21-1.30x, 30 %: 1.6-1.8x), so the bounds leave
# room for it; the old limiter took 16x.
@pytest.mark.parametrize(("share", "error", "most"), [(0.1, LIMITED, 1.45), (0.05, BUSY, 1.3), (0.3, LIMITED, 2.2)])
async def test_random_push_back_only_delays_its_own_row(share: float, error: CallError, most: float) -> None:
    clean = await relay_run(600, 32, 0.5, lambda now, ticket: None)
    noisy = await relay_run(600, 32, 0.5, at_random(share, error))
    assert noisy.failed_rows == 0
    # Nobody paused, no place taken away; at most one false alarm (30 %: rare, not never) slowed the rate.
    assert [c.what for c in noisy.changes] in ([], ["slower"])
    assert noisy.peak_in_flight == 32
    print(f"wall {noisy.wall / clean.wall:.3f}x the fault-free run")
    assert noisy.wall <= most * clean.wall, (noisy.wall, clean.wall)


async def test_an_isolated_429_or_503_pauses_nobody() -> None:
    limits = Limits(concurrency=4)
    for error in (LIMITED, BUSY):
        async with limits.slot(1) as ticket:
            pass
        t0 = anyio.current_time()
        limits.failed(ticket, error)
        async with limits.slot(1) as other:
            assert anyio.current_time() == t0  # the next row goes at once
        limits.succeeded(other, None)
        assert limits.limit == 4 and not limits.pace.pacing


async def test_a_sustained_rate_limit_is_found_and_kept_close_to() -> None:
    n = 40
    run = await relay_run(n * 30, 32, 0.1, window_limit(lambda now: n))
    assert run.failed_rows == 0
    sustained = run.ok_per_s(5, run.wall - 2)  # past the first discovery
    assert sustained >= 0.85 * n, sustained
    assert run.refused_share <= 0.12, run.refused_share
    assert any(c.what == "slower" for c in run.changes)


async def test_a_rate_limit_halved_then_restored_is_followed_within_seconds() -> None:
    n = 40
    run = await relay_run(n * 45, 32, 0.1, window_limit(lambda now: n // 2 if 20 <= now < 40 else n))
    assert run.failed_rows == 0
    assert run.ok_per_s(12, 20) >= 0.8 * n
    assert run.ok_per_s(24, 40) >= 0.8 * n / 2  # settled within 4 s of the halving
    assert run.refused_between(24, 40) <= 0.12 * n / 2 * 16
    assert run.ok_per_s(50, 58) >= 0.8 * n  # and back up within 10 s of the restore


async def test_a_pattern_of_503s_slows_down_too() -> None:
    overloaded = {"until": 3.0}

    def answer(now: float, ticket: Ticket) -> CallError | None:
        return BUSY if now < overloaded["until"] else None

    run = await relay_run(300, 16, 0.1, answer)
    assert run.failed_rows == 0
    assert [c.what for c in run.changes][:1] == ["slower"]


async def test_a_hinted_429_pauses_every_start_and_slows_the_rate() -> None:
    limits = Limits(concurrency=4)
    for _ in range(20):
        async with limits.slot(1) as ticket:
            pass
        limits.succeeded(ticket, None)
    t0 = anyio.current_time()
    limits.failed(ticket, CallError("rate_limited", "wait", status=429, retry_hint=7.0))
    async with limits.slot(1) as ticket:
        assert anyio.current_time() - t0 == pytest.approx(7.0)
    assert limits.pace.pacing
    assert limits.limit == 4  # the rate is what slowed, not the places


async def test_x_ratelimit_remaining_paces_before_the_first_429() -> None:
    """A relay that counts 100 requests per 10-second window and says what is left on every answer."""
    limit, window_s = 100, 10.0

    def answer(now: float, ticket: Ticket) -> CallError | QuotaLeft | None:
        window = int(now // window_s)
        used[window] = used.get(window, 0) + 1
        if used[window] > limit:
            return LIMITED
        reset = (window + 1) * window_s - now
        return QuotaLeft(QuotaGroup(limit, limit - used[window], reset), None)

    used: dict[int, int] = {}
    run = await relay_run(350, 16, 0.05, answer)
    assert run.failed_rows == 0
    assert run.refused_share == 0, run.refused_share
    assert any("x-ratelimit-remaining" in c.reason for c in run.changes)


async def test_a_concurrency_limit_settles_at_what_the_relay_allows() -> None:
    allowed = 8

    def answer(now: float, ticket: Ticket) -> CallError | None:
        if ticket.in_flight > allowed:
            return CallError("rate_limited", "并发", status=429, code="token_concurrency_limit_reached")
        return None

    run = await relay_run(1_000, 32, 0.2, answer)
    assert run.failed_rows == 0
    assert run.peak_in_flight <= 32
    assert run.refused_share <= 0.05, run.refused_share
    assert run.ok_per_s(5, run.wall - 1) >= 0.9 * allowed / 0.2


async def test_retries_hold_at_most_half_of_the_places() -> None:
    limits = Limits(concurrency=8)
    retries_in_flight = peak = 0

    async def retry() -> None:
        nonlocal retries_in_flight, peak
        async with limits.slot(1, retry=True) as ticket:
            retries_in_flight += 1
            peak = max(peak, retries_in_flight)
            await anyio.sleep(1)
            retries_in_flight -= 1
        limits.succeeded(ticket, None)

    firsts: list[float] = []

    async def first() -> None:
        async with limits.slot(1) as ticket:
            firsts.append(anyio.current_time())
            await anyio.sleep(1)
        limits.succeeded(ticket, None)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(retry)
        await anyio.sleep(0.01)
        for _ in range(4):
            tg.start_soon(first)
    assert peak == 4
    assert max(firsts) < 1.1  # first attempts got the other half at once


# --- a run against the emulator's own limit, on the virtual clock ------------------------------------
# These were wall-clock runs against the emulator process (tests/test_faults.py), with bounds loosened
# for a loaded machine. Here the same rows go through the runner's retry loop (`call_with_retries`),
# the limiter and the emulator's own window, counted by the emulator's own `Stats`, and its 429 read
# back by the relay-error code the transport uses: the whole chain but the sockets, in virtual seconds.


class WindowRelay:
    """The emulator started with `--rpm-limit L --rpm-window-s S --latency-ms …`, as a Transport:
    a request is counted and checked against the window when it arrives, answered after the latency."""

    def __init__(self, window: RequestWindow | None, latency: float) -> None:
        self.window = window
        self.latency = latency
        self.stats = Stats()

    async def attempt(self, path: str, body: bytes, decoder: Any, content_type: str | None = None) -> Reply:
        arrived = anyio.current_time()
        self.stats.started(int(arrived))
        admitted = self.window is None or self.window.admit("key", arrived)
        await anyio.sleep(self.latency)
        self.stats.in_flight -= 1
        status = 200 if admitted else 429
        self.stats.by_status[status] += 1
        if not admitted:
            self.stats.limited_per_second[int(arrived)] += 1
            refused = rate_limited("req-1")
            raise from_response(429, refused.body, refused.headers)
        return Reply("positive", prompt_tokens=10, completion_tokens=1)


async def _begun() -> None:
    """The checkpoint's intent record, kept by the runner before a row's first request: nothing to keep here."""


async def run_rows(relay: WindowRelay, places: int, rows: int, max_attempts: int, rpm: float | None) -> list[Outcome]:
    """Every row through `call_with_retries`, as `LocalEngine` sends them: as many workers as places,
    and a row resting before its retry lends its worker to the next row."""
    limits = Limits(places, requests_per_minute=rpm)
    workers = anyio.Semaphore(places)
    outcomes: list[Outcome] = []

    async def row(index: int) -> None:
        await workers.acquire()
        working, attempts = True, 0

        def seen(error: CallError) -> None:  # runs before the back-off is drawn
            nonlocal attempts
            random.seed(f"{index}/{attempts}")  # the jitter, the same for this row and attempt in every run
            attempts += 1

        async def rest(delay: float) -> None:
            nonlocal working
            if working:
                workers.release()
                working = False
            await anyio.sleep(delay)

        outcome = await call_with_retries(relay, limits, "/", {}, None, 1, max_attempts, seen, _begun, rest)
        outcomes.append(outcome)
        if working:
            workers.release()

    async with anyio.create_task_group() as tg:
        for index in range(rows):
            tg.start_soon(row, index)
    return outcomes


async def test_requests_per_minute_spreads_starts_evenly_against_a_window_of_one() -> None:
    # The emulator refuses a request that arrives within 0.4 s of the one before (its window holds 1):
    # 120 a minute, 0.5 s apart, never trips it; a burst would.
    relay = WindowRelay(RequestWindow(1, 0.4), latency=0.0)
    outcomes = await run_rows(relay, 8, rows=11, max_attempts=5, rpm=120)
    assert [o.error for o in outcomes] == [None] * 11 and [o.attempts for o in outcomes] == [1] * 11
    stats = relay.stats.as_json()
    assert stats["by_status"] == {"200": 11}
    assert stats["max_per_second"] == 2 and stats["max_per_minute"] == 11
    span = max(t for t, _, _ in relay.stats.timeline()) - min(t for t, _, _ in relay.stats.timeline())
    assert span == 5  # 11 starts 0.5 s apart: no slower than the limit either

    # The same rows without the limit go out as a burst the emulator refuses: the check above can fail.
    burst = WindowRelay(RequestWindow(1, 0.4), latency=0.0)
    outcomes = await run_rows(burst, 8, rows=4, max_attempts=1, rpm=None)
    # (push-back uses up no attempt: the refused rows went again, later, and got through)
    assert burst.stats.by_status[429] >= 3 and all(o.error is None for o in outcomes)


async def test_back_off_brings_the_429_rate_down_under_a_server_limit() -> None:
    # The server allows 60 requests per 3 s per key (1200 a minute), refused ones counted, and answers
    # 429 without hints; the job allows 30000 a minute. Without back-off nearly every request would be
    # refused (the window never empties); with it the run settles into waves that fit the window.
    relay = WindowRelay(RequestWindow(60, 3.0), latency=0.02)
    n = 150
    outcomes = await run_rows(relay, 16, rows=n, max_attempts=10, rpm=30000)
    assert [o.error for o in outcomes] == [None] * n

    seconds = relay.stats.timeline()
    requests, refused = sum(s[1] for s in seconds), sum(s[2] for s in seconds)
    first, rest = seconds[0], seconds[1:]
    span = seconds[-1][0] - seconds[0][0] + 1
    after = sum(s[2] for s in rest) / sum(s[1] for s in rest)
    print(
        f"\nfirst second: {first[1]} requests, {first[2]} 429s; after: {sum(s[1] for s in rest)} requests, "
        f"{sum(s[2] for s in rest)} 429s ({after:.0%}); whole run: {refused / requests:.0%} 429s, "
        f"{n / span:.1f} ok/s over {span} s (server allows 20/s)"
    )
    # Once the first burst has shown the limit, the window is learned (flow/window_guess.py): the few starts
    # that watch for it to reopen are refused (5 % of what follows the first second, measured), then none is.
    # The burst itself costs more (docs/backoff.md, "Limits of this design"): 13 % of the whole run (20 % when
    # only the adaptive rate paced). The wall-clock run allowed 25 % and 40 % for a loaded machine.
    assert after <= 0.06
    assert refused / requests < 0.25
    assert n / span >= 16  # 18.8 measured (13.6 before the window was learned)


# --- windows the relay states (docs/backoff.md), push-back that uses up no attempt, several keys ----------------


def stated_window(n: int, window_s: float, counts_refused: bool, key: str = "key") -> Answer:
    """new-api's per-key limit, its 429 stating it, as the emulator keeps it (refused ones counted or not)."""
    window = RequestWindow(n, window_s, counts_refused)
    said = CallError("rate_limited", f"您已达到请求数限制：{window_s:g}秒内最多请求{n}次", status=429)
    said.limit_requests, said.limit_window_s = n, window_s
    return lambda now, ticket: None if window.admit(f"{key}{ticket.key}", now) else said


@pytest.mark.parametrize(("n", "window_s"), [(8, 1.0), (60, 10.0), (300, 60.0)])
@pytest.mark.parametrize("counts_refused", [True, False])
async def test_a_stated_window_of_any_length_is_used_to_the_full(n: int, window_s: float, counts_refused: bool) -> None:
    # The first window's burst, until the first 429 comes back, is up to 32 refusals: a run of 300 rows or more.
    windows = max(6, math.ceil(300 / n))
    # A little less than whole windows: a probe above the window (one every 4 windows) takes one place of one,
    # and at an exact multiple of N that would carry the last row into a window of its own.
    rows = n * windows - max(2, n // 10)
    run = await relay_run(rows, 32, 0.5, stated_window(n, window_s, counts_refused), max_attempts=10)
    assert run.failed_rows == 0
    # After the first window every window is used: the least time is the whole windows and the last answers.
    least = (windows - 1) * window_s + 0.5
    assert least / run.wall >= 0.9, (run.wall, least)
    assert run.refused_share <= 0.10, run.refused_share


async def test_push_back_uses_up_no_attempt_while_the_run_gets_answers() -> None:
    # One attempt per row, and a window of 5 per 2 s: before, every row the window refused failed.
    relay = WindowRelay(RequestWindow(5, 2.0), latency=0.1)
    outcomes = await run_rows(relay, 8, rows=30, max_attempts=1, rpm=None)
    assert all(o.error is None for o in outcomes)
    assert relay.stats.by_status[429] > 0


async def test_push_back_and_nothing_else_stops_the_run_after_the_outage_timeout() -> None:
    limits = Limits(4, outage_timeout_s=30.0)

    class Refusing:
        async def attempt(self, path: str, body: bytes, decoder: Any, content_type: str | None) -> Reply:
            raise CallError("rate_limited", "您的请求数限制已达到上限，请稍后再试", status=429)

    t0 = anyio.current_time()
    outcome = await call_with_retries(Refusing(), limits, "/", {}, None, 1, 3, lambda e: None, _begun)  # type: ignore[arg-type]
    assert outcome.error is not None and outcome.error.error_class == "outage" and outcome.error.abort == "A"
    assert 30.0 <= anyio.current_time() - t0 <= 30.0 + 60.0  # at the first start after it (back-off: 60 s at most)


async def pool_run(rows: int, names: list[str], answer: Answer, said: list[str] | None = None) -> RelayRun:
    """`relay_run` with several keys: rows through a KeyPool and `call_with_retries`' rule for push-back."""
    pool = KeyPool(names, 32, say=(said if said is not None else []).append)
    attempts: list[tuple[float, bool]] = []
    failed_rows = 0

    async def row(index: int) -> None:
        nonlocal failed_rows
        for attempt in range(10):
            ASKING.set((index, attempt))
            async with pool.slot(1, retry=attempt > 0) as ticket:
                verdict = answer(anyio.current_time(), ticket)
                await anyio.sleep(0.5)
            attempts.append((ticket.started_at, not isinstance(verdict, CallError)))
            if not isinstance(verdict, CallError):
                pool.succeeded(ticket, None)
                return
            pool.failed(ticket, verdict)
            if not verdict.retryable:
                break
            await anyio.sleep(backoff_delay(0, verdict))
        failed_rows += 1

    t0 = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for index in range(rows):
            tg.start_soon(row, index)
    return RelayRun(anyio.current_time() - t0, attempts, failed_rows, [], 0)


async def test_two_keys_with_equal_windows_go_nearly_twice_as_fast() -> None:
    n, window_s = 60, 10.0
    one = await pool_run(6 * n, ["A"], stated_window(n, window_s, True))
    two = await pool_run(12 * n, ["A", "B"], stated_window(n, window_s, True))
    assert one.failed_rows == two.failed_rows == 0
    ratio = (12 * n / two.wall) / (6 * n / one.wall)
    assert ratio >= 1.8, ratio


async def test_a_key_out_of_quota_is_retired_and_the_rows_go_on_with_the_other() -> None:
    used = {0: 0, 1: 0}
    quota = CallError("quota", "用户额度不足, 剩余额度: $0.000000", status=403, retryable=False, abort="A")

    def answer(now: float, ticket: Ticket) -> CallError | None:
        used[ticket.key] += 1
        return quota if ticket.key == 1 and used[1] > 20 else None

    said: list[str] = []
    run = await pool_run(300, ["KEY_A", "KEY_B"], answer, said)
    assert run.failed_rows == 0
    assert len(said) == 1 and "KEY_B" in said[0] and "retired" in said[0]
    assert used[1] <= 21 + 32  # after the first refusal, only what was already in flight


async def test_every_key_retired_leaves_the_answer_to_the_stop_rules() -> None:
    pool = KeyPool(["KEY_A", "KEY_B"], 4, say=lambda line: None)
    for expected_switch in (True, False):
        async with pool.slot(1) as ticket:
            pass
        error = CallError("auth", "无效的令牌", status=401, retryable=False, abort="B")
        pool.failed(ticket, error)
        assert error.switch_key is expected_switch and (error.abort is None) is expected_switch
    assert [p.retired is not None for p in pool.paces()] == [True, True]


async def test_a_stated_limit_raised_mid_run_is_found_within_seconds() -> None:
    window = RequestWindow(10, 1.0)
    said = {"n": 10}

    def answer(now: float, ticket: Ticket) -> CallError | None:
        window.set_limit(said["n"] if now < 10 else 20)
        if window.admit("key", now):
            return None
        refused = CallError("rate_limited", f"您已达到请求数限制：1秒内最多请求{window.limit}次", status=429)
        refused.limit_requests, refused.limit_window_s = window.limit, 1.0
        return refused

    run = await relay_run(600, 32, 0.1, answer)
    assert run.failed_rows == 0
    assert run.ok_per_s(3, 10) >= 0.9 * 10
    assert run.ok_per_s(16, 24) >= 0.9 * 20  # found within 6 s of the raise (a probe every 3 s doubles it)
    assert run.refused_between(3, 10) <= 3  # a probe every 3 s, refused while the limit holds


async def test_a_row_pushed_back_again_and_again_fails_in_the_end() -> None:
    class Refusing:
        async def attempt(self, path: str, body: bytes, decoder: Any, content_type: str | None) -> Reply:
            raise CallError("rate_limited", "您的请求数限制已达到上限，请稍后再试", status=429)

    outcome = await call_with_retries(Refusing(), Limits(4), "/", {}, None, 1, 2, lambda e: None, _begun)  # type: ignore[arg-type]
    assert outcome.error is not None and outcome.attempts == PUSHBACKS_EXCUSED + 2


# --- windows the relay does not state (flow/window_guess.py) ------------------------------------------


def unstated_window(n: int, window_s: float, counts_refused: bool) -> Answer:
    """The same per-key limit, its 429 saying nothing of it (the relay's plain "rate limit" words)."""
    window = RequestWindow(n, window_s, counts_refused)
    return lambda now, ticket: None if window.admit("key", now) else LIMITED


@pytest.mark.parametrize(("n", "window_s"), [(60, 10.0), (300, 60.0)])
@pytest.mark.parametrize("counts_refused", [True, False])
async def test_an_unstated_window_is_learned_and_used_nearly_to_the_full(
    n: int, window_s: float, counts_refused: bool
) -> None:
    # Before, only the adaptive rate paced: it cannot hold a window's burst and pause (0.6 of N/W and a 429 share
    # of a fifth on a 10 s window).
    run = await relay_run(10 * n, 32, 0.5, unstated_window(n, window_s, counts_refused), max_attempts=10)
    assert run.failed_rows == 0
    learned = [c.reason for c in run.changes if "(learned)" in c.reason]
    assert learned and f"{n} requests per" in learned[0], [c.reason for c in run.changes]
    # After the window that teaches it, and before the last one (which may be cut short by the rows left):
    sustained = run.ok_per_s(2 * window_s, 6 * window_s) / (n / window_s)
    assert sustained >= 0.9, (sustained, learned)
    assert run.refused_share <= 0.10, run.refused_share


async def test_an_unstated_window_with_retry_after_is_learned_from_the_reset() -> None:
    window = RequestWindow(60, 10.0)

    def answer(now: float, ticket: Ticket) -> CallError | None:
        if window.admit("key", now):
            return None
        oldest = window._arrivals["key"][0]  # the reset the relay names: when its oldest arrival leaves the window
        return CallError("rate_limited", "rate limit exceeded", status=429, retry_hint=oldest + 10.0 - now)

    run = await relay_run(600, 32, 0.5, answer)
    assert run.failed_rows == 0
    learned = [c.reason for c in run.changes if "(learned)" in c.reason]
    assert learned and "60 requests per" in learned[0], [c.reason for c in run.changes][:10]
    assert run.ok_per_s(20, 60) >= 0.9 * 6
    assert run.refused_share <= 0.10, run.refused_share


def test_refusals_that_outlast_any_window_teach_no_window() -> None:
    """A burst answered, then 429s for twenty minutes (an outage behind the relay): learning N per 20 min would
    crawl this run and, kept in the state folder, the next ones. Nothing is learned; answered within a
    minute, the same refusals are a window."""
    for reopened_at, learned in ((1200.0, None), (40.0, LearnedWindow(10, 40.0, "learned"))):
        guess = WindowGuess()
        for second in range(10):
            guess.started(float(second))
            guess.answered(float(second))
        for second in range(10, 16):
            guess.started(float(second))
            guess.refused(float(second))
            guess.pattern()
        guess.started(reopened_at)
        assert guess.answered(reopened_at) == learned

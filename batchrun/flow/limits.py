"""How fast requests may start: in-flight limit, requests and tokens per minute, pauses.

* In flight: `InFlight` places, at most `run.concurrency`. A 429 that names the
  relay's concurrency limit (`token_concurrency_limit_reached`) lowers the limit
  to one below what was in flight when it was sent; successes add one back, slowly
  near the limit that was refused. A shrink never interrupts requests in flight.
  Retries may hold at most half of the places (a retry budget: they cannot crowd
  out first attempts, nor snowball when many rows fail at once).
* Per minute (`MinuteBudget`, one for requests, one for tokens): starts are
  paced `60 / limit` apart per unit, so a minute's worth is spread over the
  minute, and a log of the last 60 s of charges makes sure no 60-second window
  ever holds more than the limit.
* Tokens are charged up front with `estimate_tokens` and corrected with the
  real usage when the answer arrives.
* Push-back (docs/backoff.md): an isolated hint-less 429 or 503 is random upstream
  saturation: only that row waits, on its own back-off. A pattern of them (flow/adaptive.py's
  `RateSignal`) or a 429 with a hint means a real rate limit: starts are paced by an
  `AdaptiveRate`, cut to what the relay let through and grown back on a cubic curve.
  A server hint (Retry-After & co.) also pauses every new start, not just one row's.
  `x-ratelimit-remaining-*` on successful answers caps the rate before the first 429.
* A stated window (docs/backoff.md): a 429 that says the key's limit ("1分钟内最多请求300次",
  "Limit: 300 / min", x-ratelimit-limit-requests) sets a `MinuteBudget` over that window whose log
  holds every start of the last window, refused ones too (the relay counts them): starts then wait
  exactly until the relay's window has room, never pacing slower than the limit. A window kept from an
  earlier run (flow/keys.py) is set before the first request.
* Push-back (a 429 or a 503) never uses up a row's attempts while the run gets answers: it is the
  relay's pace, not the row's fault. Push-back and nothing else for `outage_timeout_s` stops the run
  (rule A, like an outage).
* The outage breaker (flow/breaker.py) holds every start while the relay is down.
* `on_change` (if set) hears of every change of pace (`LimiterChange`): a report may
  plot them over time.

Why not aiolimiter: its leaky bucket lets a full `max_rate` through at once and
then refills, so a 60-second window can hold nearly twice the limit; it has no
way to correct a charge after the fact (token usage); and pauses and the
breaker would still be ours. Pacing plus an exact window log is a few lines.
"""

from __future__ import annotations

import asyncio
import math
import random
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from itertools import islice
from typing import Any

import anyio

from batchrun.base.stops import StopRule
from batchrun.flow.adaptive import AdaptiveRate, RateSignal, RecentCount
from batchrun.flow.breaker import OutageBreaker
from batchrun.flow.pace import KeyPace, LearnedWindow
from batchrun.flow.window_guess import WindowGuess
from batchrun.protocols import CallError
from batchrun.protocols.relay_errors import QuotaLeft

WINDOW_S = 60.0
OUTPUT_CAP_KEYS = ("max_completion_tokens", "max_tokens", "maxOutputTokens")
DEFAULT_OUTPUT_ESTIMATE = 256
CHARS_PER_TOKEN = 4
BACKOFF_CAP_S = 60.0
QUOTA_LOW = 0.2  # x-ratelimit-remaining below this share of the limit: pace what is left over the reset
# Token charges are estimates, corrected seconds later: up to 3 s of pacing given back by
# corrections may be used at once, or the overestimate would slow the run (3 s of a
# minute's budget is still no burst).
TOKEN_CREDIT_S = 3.0
# A stated window is kept with this much room at its edge: the relay counts arrivals, we count starts, and a
# request may arrive a little sooner after its start than the one it replaces in the window.
EDGE_SHARE, EDGE_S = 0.02, 0.05
# While a stated window holds starts back, one start above it every so often (4 windows, 3 s at least)
# finds out whether the relay raised its limit: if it is answered, the window doubles until a 429 says the
# new limit. Refused, it costs one 429.
WINDOW_PROBE_WINDOWS, WINDOW_PROBE_MIN_S = 4.0, 3.0
STARTS_KEPT_S = 60.0  # starts remembered, for a window learned mid-run (longer windows start from this much)


def estimate_tokens(prompt_estimate: int, cap: int | None) -> int:
    """A request's tokens: its prompt's estimate, plus the output cap params set (or 256 when none is set)."""
    return prompt_estimate + (cap if cap is not None else DEFAULT_OUTPUT_ESTIMATE)


def prompt_tokens_estimate(prompt_chars: int) -> int:
    return math.ceil(prompt_chars / CHARS_PER_TOKEN)


def output_cap(params: dict[str, Any]) -> int | None:
    """The output-token cap params set, in any protocol's name; None when there is none."""
    nested = params.get("generationConfig")
    config: dict[str, Any] = nested if isinstance(nested, dict) else {}
    return next((v for k in OUTPUT_CAP_KEYS for v in (params.get(k), config.get(k)) if isinstance(v, int)), None)


def backoff_s(retries_made: int) -> float:
    """docs/protocol.md §6.1 with no server hint: 1, 2, 4 … 60 s, equal jitter (never 0, never above d).

    A negative count gives the shorter waits below 1 s (0.5 s for -1).
    """
    d = min(BACKOFF_CAP_S, 2.0 ** max(retries_made, -1))
    return d / 2 + random.uniform(0, d / 2)


class Charge:
    """An amount charged to a budget at one moment; the amount may be corrected later."""

    __slots__ = ("at", "amount")

    def __init__(self, at: float, amount: float) -> None:
        self.at = at
        self.amount = amount


class StartTimes:
    """The last `keep_s` of start times, oldest first, 8 bytes each. At a fast relay that is hundreds of
    thousands of starts: as float objects in a deque they took 32 bytes each, the peak memory of a large run."""

    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s
        self._at = array("d")
        self._first = 0  # the oldest kept; those before it are dropped in one go when they are half the array

    def add(self, now: float) -> None:
        at, first = self._at, self._first
        at.append(now)
        while at[first] <= now - self._keep_s:
            first += 1
        if first > len(at) // 2:
            del at[:first]
            first = 0
        self._first = first

    def __iter__(self) -> Iterator[float]:
        return islice(self._at, self._first, None)

    def newest_first(self) -> Iterator[float]:
        at = self._at
        return (at[i] for i in range(len(at) - 1, self._first - 1, -1))


class MinuteBudget:
    """At most `per_minute` units (requests or tokens) started in any 60-second window, evenly paced.

    Pacing: after a start of `n` units the next may start `n * 60 / per_minute` s
    later; at most `credit_s` of unused pacing (idle time, or corrections that
    gave an overestimate back) may be used at once. The window log is the hard
    bound; a single charge larger than the whole budget still goes, alone in its window.
    """

    def __init__(
        self, per_minute: float, credit_s: float = 0.0, window_s: float = WINDOW_S, paced: bool = True
    ) -> None:
        """`per_minute` units per `window_s` seconds (a minute unless said otherwise); not `paced`: the window
        log alone, starts going as soon as the window has room."""
        self.per_minute = per_minute
        self.window_s = window_s
        self._credit_s = credit_s
        self._s_per_unit = window_s / per_minute if paced else 0.0
        self._next_start = -math.inf
        self._log: deque[Charge] = deque()
        self._in_window = 0.0
        self._cutoff = -math.inf  # charges at or before this have left the window

    def wait_s(self, now: float, amount: float) -> float:
        """Seconds until `amount` may start (0: now)."""
        self._expire(now)
        pace = self._next_start - now
        if not self._log or self._in_window + amount <= self.per_minute:
            return max(pace, 0.0)
        # Full: wait until enough of the oldest charges have left the window.
        room = self.per_minute - amount
        left = self._in_window
        for c in self._log:
            left -= c.amount
            if left <= room:
                return max(pace, c.at + self.window_s - now)
        return max(pace, self._log[-1].at + self.window_s - now)

    def charge(self, now: float, amount: float) -> Charge:
        c = Charge(now, amount)
        self._log.append(c)
        self._in_window += amount
        self._next_start = max(self._next_start, now - self._credit_s) + amount * self._s_per_unit
        return c

    def correct(self, c: Charge, actual: float, now: float) -> None:
        """Replace a charge's amount with the real one; the pacing gets the difference back, up to now."""
        if c.at > self._cutoff:
            self._in_window += actual - c.amount
        self._next_start = max(now - self._credit_s, self._next_start + (actual - c.amount) * self._s_per_unit)
        c.amount = actual

    def _expire(self, now: float) -> None:
        self._cutoff = now - self.window_s
        while self._log and self._log[0].at <= self._cutoff:
            self._in_window -= self._log.popleft().amount


@dataclass
class Ticket:
    """One admitted attempt: when it started, its token charge, whether it probes a relay that seemed down."""

    started_at: float
    tokens: Charge | None
    probe: bool
    in_flight: int = 1  # requests in flight when it started, itself included
    retry: bool = False
    rate_probe: bool = False  # sent alone after a pause: its answer says whether the relay has room again
    key: int = 0  # which key it is sent with (flow/keys.py), by its place in provider.api_key_env
    window_probe: bool = False  # sent above a stated window: has the relay raised its limit?


@dataclass(frozen=True)
class LimiterChange:
    """A change of pace, for whoever wants to show or plot it."""

    at: float  # the event loop's clock
    what: str  # "slower", "paused", "in_flight"
    reason: str
    rate: float  # requests per second now allowed (math.inf: not paced)
    in_flight_limit: int
    paused_until: float | None = None


PUSHBACK_CLASSES = {"rate_limited"}
CONCURRENCY_CODES = {"token_concurrency_limit_reached"}
SLOW_PAST_REFUSED = 40  # at or above a concurrency limit once refused, successes needed for +1: this many times it


def pushed_back(error: CallError) -> bool:
    """A 429 that is not about quota, or a 503: the relay asks us to come back later."""
    return error.error_class in PUSHBACK_CLASSES or error.status == 503


class RateProbe(Enum):
    """After a slow-down that let nothing through, one request alone finds out whether the window has room again."""

    OFF = "off"  # no probe: starts go as the limits allow
    WANTED = "wanted"  # the next start is the probe
    IN_FLIGHT = "in_flight"  # the probe is out: every other start waits for its answer


class InFlight:
    """Places for requests in flight, resizable.

    anyio's CapacityLimiter does this too, but yields to the event loop twice on every
    acquire and release: about 3 % of the pipeline's CPU per row on `batchrun bench`.
    A released place goes straight to the longest waiter.
    """

    def __init__(self, total: int) -> None:
        self._total = total
        self.used = 0
        self._waiters: deque[anyio.Event] = deque()

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = value
        self._hand_over()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def take_free(self) -> bool:
        """A place at once if one is free and nobody waits (no coroutine to pass: `acquire` is one)."""
        if self.used < self._total and not self._waiters:
            self.used += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.take_free():
            return
        granted = anyio.Event()
        self._waiters.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():  # handed a place while being cancelled: give it back
                self.release()
            else:
                self._waiters.remove(granted)
            raise

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        self.used -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self.used < self._total:
            self.used += 1
            self._waiters.popleft().set()


class Limits:
    def __init__(
        self,
        concurrency: int,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        outage_timeout_s: float = math.inf,
        on_change: Callable[[LimiterChange], None] | None = None,
        key: str = "",
    ) -> None:
        """`key`: the name of the variable holding this limiter's key (for what people are shown)."""
        self.key = key
        self.max_concurrency = concurrency
        self.in_flight = InFlight(concurrency)
        self.retries = InFlight(max(1, concurrency // 2))  # the retry budget: half the places at most
        self.requests = MinuteBudget(requests_per_minute) if requests_per_minute else None
        self.tokens = MinuteBudget(tokens_per_minute, TOKEN_CREDIT_S) if tokens_per_minute else None
        self.breaker = OutageBreaker(outage_timeout_s)
        self.pace = AdaptiveRate()
        self.on_change = on_change
        self._signal = RateSignal()
        self._sent = RecentCount()
        self._ok = RecentCount()
        self._ok_before = 0.0  # successes per second just before the latest run of push-backs began
        self._paused_until = -math.inf
        self._cuts_in_a_row = 0  # slow-downs with no success in between
        self._rate_probe = RateProbe.OFF
        self._successes = 0  # in a row, towards the next +1 of the in-flight limit
        self._refused_at: int | None = None  # the in-flight limit a concurrency 429 last set
        self._gate = anyio.Lock()  # one request at a time passes the rate checks, in order
        self._changed = anyio.Event()  # set when a probe ends (the breaker's or the rate's)
        self._clock: Callable[[], float] | None = None  # see `now`
        self.window: MinuteBudget | None = None  # the key's own window, once stated or remembered
        self.learned: LearnedWindow | None = None
        self._learned_at = -math.inf
        self._window_probe_at = math.inf  # when one start may go above the stated window
        self.guess = WindowGuess()  # a window the relay's 429s do not state, learned from its answers
        self._starts = StartTimes(STARTS_KEPT_S)  # a window learned mid-run has them
        self._last_answer: float | None = None  # the last success (or the first start): push-back alone since
        self._pushed_back_since_answer: CallError | None = None
        self.retired: str | None = None  # why this key left the run (flow/keys.py), else None
        self.index = 0  # the key's place in provider.api_key_env
        self.peers: list[Limits] = []  # the other keys' limiters: a probe's end wakes their waiters too

    @property
    def limit(self) -> int:
        return self.in_flight.total

    @property
    def paused_until(self) -> float:
        """When the current pause of every start ends (anyio's clock; in the past when none)."""
        return self._paused_until

    def paces(self, key: str | None = None) -> list[KeyPace]:
        """Each key's pace and learned window, for the bar, the summary and the report.

        `key`: the name to show for this limiter's key (its variable), if it was built without one."""
        rate = self.pace.rate(self.now()) if self.pace.pacing else None
        if self.window is not None:  # the window's own rate, or slower if push-back came anyway
            rate = min(rate or math.inf, self.window.per_minute / self.window.window_s)
        return [KeyPace(key=key or self.key, rate_per_s=rate, window=self.learned, retired=self.retired)]

    def learn(self, window: LearnedWindow, now: float | None = None, edge: bool = True) -> None:
        """The key's limit: from now on, no window of `window_s` holds more starts than `requests`.

        Starts of the last window already made count, refused ones too: the relay counted them. Not `edge`: no
        room at the window's edge (a guessed window's length is already an upper bound, flow/window_guess.py)."""
        now = self.now() if now is None else now
        # Not paced: starts go as soon as the window has room, a burst where the relay's window emptied
        # (spread instead, a window half empty at the end of a run is time lost).
        span = window.window_s * (1 + EDGE_SHARE) + EDGE_S if edge else window.window_s
        budget = MinuteBudget(window.requests, window_s=span, paced=False)
        for at in self._starts:
            if at > now - budget.window_s:
                budget.charge(at, 1)
        self.window, self.learned, self._learned_at = budget, window, now
        self.guess.done, self.guess.watching = True, False  # known: nothing left to guess
        self._window_probe_at = now + max(WINDOW_PROBE_WINDOWS * window.window_s, WINDOW_PROBE_MIN_S)
        said = f"the relay's limit: {window.requests} requests per {window.window_s:g} s ({window.source})"
        self._tell("slower", said, now, window.requests / window.window_s)

    def slot(self, tokens: int, retry: bool = False) -> Slot:
        """Hold one in-flight place for a request estimated at `tokens` (a retry also holds a retry place).

        Raises the breaker's CallError (abort rule A) if the relay stayed down too long.
        """
        return Slot(self, tokens, retry)

    def now(self) -> float:
        """anyio.current_time(): on asyncio, its loop's clock, looked up once (anyio finds the backend on every
        call, which cost about 1 µs, three times a request)."""
        if self._clock is None:
            try:
                self._clock = asyncio.get_running_loop().time
            except RuntimeError:  # not on asyncio (trio, in the tests on a virtual clock)
                return anyio.current_time()
        return self._clock()

    def start_now(self, tokens: int, retry: bool) -> Ticket | None:
        """With the gate free, a start that need not wait goes at once (taking the lock costs a yield);
        None when it must wait (`_admit`)."""
        if not self._gate.locked() and self._wait_s(now := self.now(), tokens) <= 0:
            return self._start(now, tokens, retry)
        return None

    async def _admit(self, tokens: int, retry: bool) -> Ticket:
        async with self._gate:
            while (wait := self._wait_s(now := self.now(), tokens)) > 0:
                # A long pause must not outlast the outage timeout: wake when it is due, and give up then.
                with anyio.move_on_after(min(wait, self.breaker.give_up_in(now))):
                    await self._changed.wait()
            return self._start(now, tokens, retry)

    def wait_s(self, tokens: int) -> float:
        """Seconds until a start of `tokens` could go, places aside (flow/keys.py picks the key that can soonest)."""
        return self._wait_s(self.now(), tokens)

    def _wait_s(self, now: float, tokens: int) -> float:
        # Asked before every start: the checks of limits not in force are skipped, not called.
        wait = max(self._paused_until - now, self._paced_wait_s(now))
        if self.window is not None:
            wait = max(wait, self._window_wait_s(now))
        if self._pushed_back_since_answer is not None:
            self._pushed_back_too_long(now)  # raises once push-back alone lasted too long
        if self.requests:
            wait = max(wait, self.requests.wait_s(now, 1))
        if self.tokens:
            wait = max(wait, self.tokens.wait_s(now, tokens))
        return max(wait, self.breaker.wait_s(now))  # raises once the outage outlasts its timeout

    def _paced_wait_s(self, now: float) -> float:
        """The adaptive rate and its probe; while a window is being guessed, the guess spaces the starts instead."""
        if self.guess.watching:
            return self.guess.wait_s(now)
        return max(self.pace.wait_s(now), math.inf if self._rate_probe is RateProbe.IN_FLIGHT else 0.0)

    def _window_wait_s(self, now: float) -> float:
        assert self.window is not None
        wait = self.window.wait_s(now, 1)
        if wait > 0 and now >= self._window_probe_at and self._above_stated(now):
            return 0.0  # a window probe goes
        return wait

    def _above_stated(self, now: float) -> bool:
        """Whether one more start now is above the limit the relay stated, edge room aside: only such a start
        answered tells that the relay raised its limit."""
        if self.learned is None:
            return False
        since, count = now - self.learned.window_s, 0
        for at in self._starts.newest_first():
            if at <= since or count >= self.learned.requests:
                break
            count += 1
        return count >= self.learned.requests

    def _start(self, now: float, tokens: int, retry: bool) -> Ticket:
        """Charge a start that passed `_wait_s` (no await in between: nothing can change meanwhile)."""
        if self.requests:
            self.requests.charge(now, 1)
        window_probe = False
        if self.window:
            window_probe = self.window.wait_s(now, 1) > 0 and self._above_stated(now)
            if window_probe:
                self._window_probe_at = math.inf  # one at a time: until its answer
            self.window.charge(now, 1)
        self._keep_start(now)
        self.guess.started(now)
        charge = self.tokens.charge(now, tokens) if self.tokens else None
        self.pace.started(now)
        self._sent.add(now)
        rate_probe = self._rate_probe is RateProbe.WANTED
        if rate_probe:
            self._rate_probe = RateProbe.IN_FLIGHT
        probe = self.breaker.started(now)
        return Ticket(now, charge, probe, self.in_flight.used, retry, rate_probe, self.index, window_probe)

    def succeeded(self, ticket: Ticket, actual_tokens: int | None, quota: QuotaLeft | None = None) -> None:
        now = self.now()
        if self.tokens and ticket.tokens and actual_tokens is not None:
            self.tokens.correct(ticket.tokens, actual_tokens, now)
        self._ok.add(now)
        self._last_answer, self._pushed_back_since_answer = now, None
        self._cuts_in_a_row = 0
        self._probe_answered(ticket)
        if ticket.window_probe and self.learned is not None:  # the relay let more through than it said
            raised = self.guess.raised(self.learned)
            self.learn(raised, now, edge=raised is not self.guess.learned)
        elif (guessed := self.guess.answered(ticket.started_at)) is not None:
            self.pace, self._cuts_in_a_row = AdaptiveRate(), 0  # the window paces from now on, not the cut rate
            self.learn(guessed, now, edge=False)
        self._signal.answer(ticket.started_at, False, now)
        self._grow_in_flight()
        if quota is not None:
            self._heed_quota(quota, ticket, now)
        self._breaker_outcome(ticket, now, failed=False)

    def failed(self, ticket: Ticket, error: CallError) -> None:
        now = self.now()
        self._probe_answered(ticket)
        if pushed_back(error):
            self._pushed_back_since_answer = error
            if error.error_class in PUSHBACK_CLASSES and not error.limit_requests:  # (a 503 is no window)
                self.guess.refused(ticket.started_at)
        if ticket.window_probe and self.learned is not None:  # the limit holds: ask again later
            self._window_probe_at = now + max(WINDOW_PROBE_WINDOWS * self.learned.window_s, WINDOW_PROBE_MIN_S)
        if error.limit_requests and error.limit_window_s:
            self._stated(error.limit_requests, error.limit_window_s, error.limit_source or "said", now)
        if pushed_back(error) and ticket.started_at <= self._learned_at:  # (the same tick: before it too)
            pass  # sent before the window was known: the window's log already holds it back
        elif error.error_class in PUSHBACK_CLASSES and error.code in CONCURRENCY_CODES:
            self._refused_in_flight(ticket, now)
        elif error.error_class in PUSHBACK_CLASSES and error.retry_hint:
            self._pause(now + error.retry_hint, f"the server asked for {error.retry_hint:g} s")
            if ticket.started_at >= self._signal.since:
                self.guess.pattern()  # the pause ends at the reset: the next answer shows the window reopened
                self._slow_down(now, "a 429 with a hint")
        elif pushed_back(error):
            # One of these alone is random saturation: only its row waits (pipeline/transport.py). A pattern is a rate.
            if ticket.rate_probe:
                self._slow_down(now, "the request sent alone after a pause was refused too")
            elif self._signal.answer(ticket.started_at, True, now, self.pace.probing(ticket.started_at)):
                self._slow_down_or_watch(now, "push-backs came as a pattern, not at random")
            elif self._signal.run == 1:  # what got through until now: the relay's allowance, if a pattern starts
                self._ok_before = self._ok.per_s(now)
        else:
            self._signal.answer(ticket.started_at, False, now)
        self._breaker_outcome(ticket, now, failed=self.breaker.counts_as_down(error), error=error)

    def excuses(self, error: CallError) -> bool:
        """Failures that do not use up the row's attempts: a key retired with others left (flow/keys.py), and
        anything while the relay looks down (it waits for the relay). Push-back: pipeline/transport.py."""
        return error.switch_key or (self.breaker.looks_down and self.breaker.counts_as_down(error))

    def _stated(self, requests: int, window_s: float, source: str, now: float) -> None:
        known = self.learned
        if known is None or (known.requests, known.window_s) != (requests, window_s):
            self.learn(LearnedWindow(requests, window_s, source), now)

    def _keep_start(self, now: float) -> None:
        self._starts.add(now)
        if self._last_answer is None:
            self._last_answer = now

    def _pushed_back_too_long(self, now: float) -> None:
        """Raises if push-back and no answer for outage_timeout_s: that ends the run like an outage (rule A)."""
        last, error = self._last_answer, self._pushed_back_since_answer
        if error is None or last is None or now - last < self.breaker.timeout_s or self.breaker.looks_down:
            return  # (503s are the breaker's: it says the same in its own words)
        raise CallError(
            "outage",
            f"only push-back, no answer, for {self.breaker.timeout_s:g} s (run.outage_timeout_s); last: {error}",
            retryable=False,
            abort=StopRule.A,
        )

    def _slow_down_or_watch(self, now: float, reason: str) -> None:
        """A pattern of push-back: the first one of a run may be a window filled (flow/window_guess.py)."""
        if self.guess.watching:
            return
        if self.guess.pattern():
            self._tell("slower", f"{reason}: watching for the window to reopen", now, 0.0)
            return
        self._slow_down(now, reason)

    def _slow_down(self, now: float, reason: str) -> None:
        """Pace slower; if the last slow-down let nothing through, also pause, longer each time.

        A relay whose window counts refused requests and is longer than a second stays full
        while anything is sent: only a pause lets it empty, and one request sent alone after
        it tells whether it did, the others waiting for its answer.
        """
        if self._cuts_in_a_row:
            self._pause(now + backoff_s(self._cuts_in_a_row - 1), "slowing down let nothing through")
            self._rate_probe = RateProbe.WANTED  # then one request alone finds out whether the window emptied
        self._cuts_in_a_row += 1
        let_through = max(self._ok.per_s(now), self._ok_before)
        self._ok_before = 0.0  # used once: a later slow-down measures afresh
        rate = self.pace.cut(now, self._sent.per_s(now), let_through)
        self._signal.restart(now, rate)
        self._tell("slower", reason, now, rate)

    def _probe_answered(self, ticket: Ticket) -> None:
        if ticket.rate_probe:
            self._rate_probe = RateProbe.OFF
            self._wake()

    def _refused_in_flight(self, ticket: Ticket, now: float) -> None:
        """The relay's concurrency limit: below what was in flight when this one was sent."""
        self._successes = 0
        limit = max(1, min(self.limit, ticket.in_flight - 1))
        if limit < self.limit:
            self.in_flight.total = limit
            self.retries.total = max(1, limit // 2)
            self._refused_at = limit
            self._tell("in_flight", f"the relay refused {ticket.in_flight} in flight", now)

    def _grow_in_flight(self) -> None:
        """+1 after a limit's worth of successes in a row; many more at a limit once refused."""
        if self.limit >= self.max_concurrency:
            return
        self._successes += 1
        needed = self.limit * (SLOW_PAST_REFUSED if self._refused_at and self.limit >= self._refused_at else 1)
        if self._successes >= needed:
            self._successes = 0
            self.in_flight.total = self.limit + 1
            self.retries.total = max(1, self.limit // 2)

    def _heed_quota(self, quota: QuotaLeft, ticket: Ticket, now: float) -> None:
        """x-ratelimit-remaining-* on an answer: pause at the end of the quota, pace when little is left."""
        token_cost = float(ticket.tokens.amount) if ticket.tokens else 1.0
        for group, cost in ((quota.requests, 1.0), (quota.tokens, max(token_cost, 1.0))):
            if group is None:
                continue
            starts_left = group.remaining / cost - (self.in_flight.used - 1)  # the others in flight count too
            if starts_left < 1:
                self._pause(now + group.reset_s, "x-ratelimit-remaining says the quota is used up")
                continue
            rate = starts_left / group.reset_s  # what is left, spread evenly until the reset
            if group.remaining < QUOTA_LOW * group.limit and rate < self.pace.rate(now):
                self.pace.cap(rate, now)
                self._tell("slower", "x-ratelimit-remaining is low", now, rate)

    def _pause(self, until: float, reason: str) -> None:
        if until > self._paused_until:
            self._paused_until = until
            self._tell("paused", reason, self.now(), paused_until=until)

    def _tell(self, what: str, reason: str, now: float, rate: float | None = None, **extra: Any) -> None:
        if self.on_change is not None:
            rate = self.pace.rate(now) if rate is None else rate
            self.on_change(LimiterChange(now, what, reason, rate, self.limit, **extra))

    def _breaker_outcome(self, ticket: Ticket, now: float, failed: bool, error: CallError | None = None) -> None:
        if self.breaker.record(now, failed, ticket.probe, error):
            self._wake()

    def _wake(self) -> None:
        for limits in (self, *self.peers):
            limits._changed.set()
            limits._changed = anyio.Event()


class Slot:
    """One attempt's places (`Limits.slot`): an in-flight place, and for a retry a retry place too.

    A plain class rather than an async generator: it is entered for every request, and the
    generator's machinery was about 5 % of the pipeline's CPU on `batchrun bench`.
    """

    __slots__ = ("_limits", "_tokens", "_retry")

    def __init__(self, limits: Limits, tokens: int, retry: bool) -> None:
        self._limits = limits
        self._tokens = tokens
        self._retry = retry

    async def __aenter__(self) -> Ticket:
        limits = self._limits
        if self._retry:
            await limits.retries.acquire()
        try:
            # A place free and a start that need not wait: no coroutine of their own (a few µs a request).
            if not limits.in_flight.take_free():
                await limits.in_flight.acquire()
            try:
                ticket = limits.start_now(self._tokens, self._retry)
                return ticket if ticket is not None else await limits._admit(self._tokens, self._retry)
            except BaseException:
                limits.in_flight.release()
                raise
        except BaseException:
            if self._retry:
                limits.retries.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._limits.in_flight.release()
        if self._retry:
            self._limits.retries.release()

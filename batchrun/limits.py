"""How fast requests may start: in-flight limit, requests and tokens per minute, pauses.

* In flight: `InFlight` places whose number moves AIMD-style between 1 and
  `run.concurrency` (PROTOCOL.md §6.3): halved on a rate-limit 429 or a 503 (at
  most once a second), +1 after a limit's worth of successes in a row. A shrink
  never interrupts requests already in flight; new ones wait until fewer than
  the new limit are.
* Per minute (`MinuteBudget`, one for requests, one for tokens): starts are
  paced `60 / limit` apart per unit, so a minute's worth is spread over the
  minute, and a log of the last 60 s of charges makes sure no 60-second window
  ever holds more than the limit.
* Tokens are charged up front with `estimate_tokens` and corrected with the
  real usage when the answer arrives.
* A server hint (Retry-After & co.) pauses every new start, not just one row's.
  A hintless push-back pauses every start too, with the backoff of §6.1, which
  grows while push-backs keep coming without a run of successes in between
  (requests sent before the last pause do not count again), and it ends with
  one request alone, the others waiting for its answer: the relay's own window
  counts failed requests, so only a global pause helps, and only a probe tells
  when the window has room again.
* The outage breaker (breaker.py) holds every start while the relay is down.

Why not aiolimiter: its leaky bucket lets a full `max_rate` through at once and
then refills, so a 60-second window can hold nearly twice the limit; it has no
way to correct a charge after the fact (token usage); and pauses and the
breaker would still be ours. Pacing plus an exact window log is a few lines.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from batchrun.breaker import OutageBreaker
from batchrun.protocols import CallError

WINDOW_S = 60.0
OUTPUT_CAP_KEYS = ("max_completion_tokens", "max_tokens", "maxOutputTokens")
DEFAULT_OUTPUT_ESTIMATE = 256
CHARS_PER_TOKEN = 4
BACKOFF_CAP_S = 60.0
DECREASE_EVERY_S = 1.0
# Token charges are estimates, corrected seconds later: up to 3 s of pacing given back by
# corrections may be used at once, or the overestimate would slow the run (3 s of a
# minute's budget is still no burst).
TOKEN_CREDIT_S = 3.0  # the in-flight limit halves at most this often


def estimate_tokens(prompt_chars: int, params: dict[str, Any]) -> int:
    """Prompt characters / 4, plus the output cap the params set (or 256 when none is set)."""
    cap = output_cap(params)
    return prompt_tokens_estimate(prompt_chars) + (cap if cap is not None else DEFAULT_OUTPUT_ESTIMATE)


def prompt_tokens_estimate(prompt_chars: int) -> int:
    return math.ceil(prompt_chars / CHARS_PER_TOKEN)


def output_cap(params: dict[str, Any]) -> int | None:
    """The output-token cap params set, in any protocol's name; None when there is none."""
    config = params.get("generationConfig") if isinstance(params.get("generationConfig"), dict) else {}
    return next((v for k in OUTPUT_CAP_KEYS for v in (params.get(k), config.get(k)) if isinstance(v, int)), None)


def backoff_s(retries_made: int) -> float:
    """PROTOCOL.md §6.1 with no server hint: 1, 2, 4 … 60 s, equal jitter (never 0, never above d)."""
    d = min(BACKOFF_CAP_S, 2.0**retries_made)
    return d / 2 + random.uniform(0, d / 2)


class Charge:
    """An amount charged to a budget at one moment; the amount may be corrected later."""

    __slots__ = ("at", "amount")

    def __init__(self, at: float, amount: float) -> None:
        self.at = at
        self.amount = amount


class MinuteBudget:
    """At most `per_minute` units (requests or tokens) started in any 60-second window, evenly paced.

    Pacing: after a start of `n` units the next may start `n * 60 / per_minute` s
    later; at most `credit_s` of unused pacing (idle time, or corrections that
    gave an overestimate back) may be used at once. The window log is the hard
    bound; a single charge larger than the whole budget still goes, alone in its window.
    """

    def __init__(self, per_minute: float, credit_s: float = 0.0) -> None:
        self.per_minute = per_minute
        self._credit_s = credit_s
        self._s_per_unit = WINDOW_S / per_minute
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
                return max(pace, c.at + WINDOW_S - now)
        return max(pace, self._log[-1].at + WINDOW_S - now)

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
        self._cutoff = now - WINDOW_S
        while self._log and self._log[0].at <= self._cutoff:
            self._in_window -= self._log.popleft().amount


@dataclass
class Ticket:
    """One admitted attempt: when it started, its token charge, whether it probes a relay that seemed down."""

    started_at: float
    tokens: Charge | None
    probe: bool
    rate_probe: bool = False


PUSHBACK_CLASSES = {"rate_limited"}


class InFlight:
    """Places for requests in flight, resizable (the AIMD limit).

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

    async def __aenter__(self) -> None:
        if self.used < self._total and not self._waiters:
            self.used += 1
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
    ) -> None:
        self.max_concurrency = concurrency
        self.in_flight = InFlight(concurrency)
        self.requests = MinuteBudget(requests_per_minute) if requests_per_minute else None
        self.tokens = MinuteBudget(tokens_per_minute, TOKEN_CREDIT_S) if tokens_per_minute else None
        self.breaker = OutageBreaker(outage_timeout_s)
        self._paused_until = -math.inf
        self._successes = 0  # in a row, towards the next +1
        self._pushbacks = 0  # hintless decreases since the last run of successes: the global backoff's exponent
        self._last_decrease = -math.inf
        self._last_backoff = -math.inf
        self._rate_probe = "off"  # after a hintless pause: "wanted", then "in_flight" until its answer
        self._gate = anyio.Lock()  # one request at a time passes the rate checks, in order
        self._changed = anyio.Event()  # set when a probe ends (the breaker's or the rate limit's)

    @property
    def limit(self) -> int:
        return self.in_flight.total

    @property
    def paused_until(self) -> float:
        """When the current pause of every start ends (anyio's clock; in the past when none)."""
        return self._paused_until

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[Ticket]:
        """Hold one in-flight place for a request estimated at `tokens`.

        Raises the breaker's CallError (abort rule A) if the relay stayed down too long.
        """
        async with self.in_flight:
            yield await self._admit(tokens)

    async def _admit(self, tokens: int) -> Ticket:
        # With the gate free, a start that need not wait goes at once: taking the lock costs a yield.
        if not self._gate.locked() and self._wait_s(now := anyio.current_time(), tokens) <= 0:
            return self._start(now, tokens)
        async with self._gate:
            while (wait := self._wait_s(now := anyio.current_time(), tokens)) > 0:
                with anyio.move_on_after(wait):
                    await self._changed.wait()
            return self._start(now, tokens)

    def _wait_s(self, now: float, tokens: int) -> float:
        return max(
            self._paused_until - now,
            self.requests.wait_s(now, 1) if self.requests else 0.0,
            self.tokens.wait_s(now, tokens) if self.tokens else 0.0,
            self.breaker.wait_s(now),  # raises once the outage outlasts its timeout
            math.inf if self._rate_probe == "in_flight" else 0.0,
        )

    def _start(self, now: float, tokens: int) -> Ticket:
        """Charge a start that passed `_wait_s` (no await in between: nothing can change meanwhile)."""
        if self.requests:
            self.requests.charge(now, 1)
        charge = self.tokens.charge(now, tokens) if self.tokens else None
        rate_probe = self._rate_probe == "wanted"
        if rate_probe:
            self._rate_probe = "in_flight"
        return Ticket(now, charge, self.breaker.started(now), rate_probe)

    def succeeded(self, ticket: Ticket, actual_tokens: int | None) -> None:
        now = anyio.current_time()
        if self.tokens and ticket.tokens and actual_tokens is not None:
            self.tokens.correct(ticket.tokens, actual_tokens, now)
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            self._pushbacks = 0
            if self.limit < self.max_concurrency:
                self.in_flight.total = self.limit + 1
        if ticket.rate_probe:
            self._rate_probe = "off"
            self._wake()
        self._breaker_outcome(ticket, now, failed=False)

    def failed(self, ticket: Ticket, error: CallError) -> None:
        now = anyio.current_time()
        if ticket.rate_probe:
            self._rate_probe = "off"
            self._wake()
        if error.error_class in PUSHBACK_CLASSES or error.status == 503:
            self._push_back(ticket, now, error.retry_hint)
        self._breaker_outcome(ticket, now, failed=self.breaker.counts_as_down(error), error=error)

    def excuses(self, error: CallError) -> bool:
        """A failure while the relay looks down does not use up the row's attempts: it waits for the relay."""
        return self.breaker.looks_down and self.breaker.counts_as_down(error)

    def _push_back(self, ticket: Ticket, now: float, hint_s: float | None) -> None:
        """Halve the in-flight limit (at most once a second) and pause every start."""
        self._successes = 0
        if now - self._last_decrease >= DECREASE_EVERY_S:
            self._last_decrease = now
            self.in_flight.total = max(1, self.limit // 2)
        if hint_s:
            self._pause(now + hint_s)
        elif ticket.started_at >= self._last_backoff:  # not one of the wave that caused the last backoff
            self._last_backoff = now
            self._pause(now + backoff_s(self._pushbacks))
            self._pushbacks += 1
            if self._rate_probe == "off":
                # We cannot know when the server's window has room again: one request finds out,
                # the others wait for its answer instead of all being refused together.
                self._rate_probe = "wanted"

    def _pause(self, until: float) -> None:
        self._paused_until = max(self._paused_until, until)

    def _breaker_outcome(self, ticket: Ticket, now: float, failed: bool, error: CallError | None = None) -> None:
        if self.breaker.record(now, failed, ticket.probe, error):
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

"""How fast requests may start: in-flight limit, requests and tokens per minute.

* In flight: `InFlight` places whose number moves AIMD-style between 1 and
  `run.concurrency` (halved on push-back, +1 after a limit's worth of successes).
* Requests per minute: starts are spaced `60 / rpm` apart (smooth, not bursty)
  and a log of the last `rpm` starts makes sure no 60-second window holds more.
* Tokens per minute: each request is charged an estimate up front (prompt
  characters / 4 + the output cap from params) and corrected with the real usage;
  the tokens charged in the last 60 seconds never pass the limit.
* A server hint (Retry-After & co.) pauses every new start, not just one row's.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

WINDOW_S = 60.0
OUTPUT_CAP_KEYS = ("max_completion_tokens", "max_tokens", "maxOutputTokens")
DEFAULT_OUTPUT_ESTIMATE = 256


def estimate_tokens(prompt_chars: int, params: dict[str, Any]) -> int:
    """Prompt characters / 4, plus the output cap the params set (or a default)."""
    cap = output_cap(params)
    return prompt_tokens_estimate(prompt_chars) + (cap if cap is not None else DEFAULT_OUTPUT_ESTIMATE)


def prompt_tokens_estimate(prompt_chars: int) -> int:
    return math.ceil(prompt_chars / 4)


def output_cap(params: dict[str, Any]) -> int | None:
    """The output-token cap params set, in any protocol's name; None when there is none."""
    config = params.get("generationConfig") if isinstance(params.get("generationConfig"), dict) else {}
    return next((v for k in OUTPUT_CAP_KEYS for v in (params.get(k), config.get(k)) if isinstance(v, int)), None)


class _Charge:
    """Tokens charged to the window at one moment; corrected once usage is known."""

    __slots__ = ("at", "tokens")

    def __init__(self, at: float, tokens: int) -> None:
        self.at = at
        self.tokens = tokens


class InFlight:
    """Places for requests in flight, resizable (the AIMD limit).

    anyio's CapacityLimiter does this too, but yields to the event loop twice on every
    acquire and release: a quarter of the pipeline's own CPU per row on `batchrun bench`.
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
    ) -> None:
        self.max_concurrency = concurrency
        self.in_flight = InFlight(concurrency)
        self._rpm = requests_per_minute
        self._tpm = tokens_per_minute
        self._starts: deque[float] = deque()
        self._charges: deque[_Charge] = deque()
        self._charged = 0
        self._next_start = 0.0
        self._paused_until = 0.0
        self._successes = 0
        self._last_decrease = -math.inf
        self._gate = anyio.Lock()  # one request at a time passes the rate checks, in order

    @property
    def limit(self) -> int:
        return self.in_flight.total

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[_Charge]:
        """Hold one in-flight place for a request estimated at `tokens`."""
        async with self.in_flight:
            charge = await self._admit(tokens)
            yield charge

    async def _admit(self, tokens: int) -> _Charge:
        now = time.monotonic()
        if not (self._rpm or self._tpm or self._gate.locked()) and now >= self._paused_until:
            return _Charge(now, tokens)  # nothing to wait for: the gate's lock would only cost a yield
        async with self._gate:
            while True:
                now = time.monotonic()
                wait = max(self._paused_until - now, self._rpm_wait(now), self._tpm_wait(now, tokens))
                if wait <= 0:
                    break
                await anyio.sleep(wait)
            if self._rpm:
                self._starts.append(now)
                self._next_start = now + WINDOW_S / self._rpm
            charge = _Charge(now, tokens)
            if self._tpm:
                self._charges.append(charge)
                self._charged += tokens
            return charge

    def _rpm_wait(self, now: float) -> float:
        if not self._rpm:
            return 0.0
        while self._starts and self._starts[0] <= now - WINDOW_S:
            self._starts.popleft()
        full = self._starts[0] + WINDOW_S - now if len(self._starts) >= self._rpm else 0.0
        return max(self._next_start - now, full)

    def _tpm_wait(self, now: float, tokens: int) -> float:
        if not self._tpm:
            return 0.0
        while self._charges and self._charges[0].at <= now - WINDOW_S:
            self._charged -= self._charges.popleft().tokens
        if not self._charges or self._charged + tokens <= self._tpm:
            return 0.0  # an estimate larger than the whole limit still goes, alone
        # Wait until enough of the oldest charges leave the window.
        freed = 0
        for c in self._charges:
            freed += c.tokens
            if self._charged - freed + tokens <= self._tpm:
                return c.at + WINDOW_S - now + 1e-3
        return self._charges[-1].at + WINDOW_S - now + 1e-3

    def correct(self, charge: _Charge, actual_tokens: int | None) -> None:
        """Replace a request's estimate with its real usage, if still in the window."""
        if actual_tokens is None or not self._tpm:
            return
        if self._charges and charge.at >= self._charges[0].at:
            self._charged += actual_tokens - charge.tokens
        charge.tokens = actual_tokens

    def on_success(self) -> None:
        self._successes += 1
        if self._successes >= self.limit and self.limit < self.max_concurrency:
            self.in_flight.total = self.limit + 1
            self._successes = 0

    def on_pushback(self, hint_s: float | None) -> None:
        """A rate-limit 429 or a 503: halve the in-flight limit (at most once a second), honour the hint for all."""
        now = time.monotonic()
        self._successes = 0
        if now - self._last_decrease >= 1.0:
            self.in_flight.total = max(1, self.limit // 2)
            self._last_decrease = now
        if hint_s:
            self._paused_until = max(self._paused_until, now + hint_s)

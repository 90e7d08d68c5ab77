"""Pacing by a rate that adapts to what the relay allows (docs/backoff.md).

`RateSignal` tells a relay's "too fast" from random upstream saturation: one
hint-less 429 or 503 among successes is noise (only that row waits, on its own
back-off); a pattern of them is a rate limit — `RUN_SIGNAL` in a row, or
`SHARE_SIGNAL` of the last `WINDOW` answers. Only answers to requests sent
since the last slow-down count, so one wave of refusals slows down once.

`AdaptiveRate` spaces starts `1 / rate` apart. It is off (no pacing) until the
first signal. A slow-down cuts the rate to `BETA` times what got through in the
last second (the relay's real allowance), never below `MIN_CUT` nor above
`BETA` times the rate actually sent; the rate then grows back on a cubic curve,
as TCP CUBIC does and as AWS's adaptive retry mode does for throttling: fast at
first, flat near the ceiling it was cut from (where most of the time is spent),
then faster again in case the relay now allows more (after half a minute
without a push-back it is far above anything sent: pacing no longer holds
anything back).
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 32
SHARE_SIGNAL = 20  # of WINDOW: a 30 % random rate reaches it about once in 40,000 windows
RUN_SIGNAL = 6  # in a row, at least
RUN_SIGNAL_PROBING = 3  # in a row, while paced above the last ceiling: that is where the limit was
FALSE_ALARM = 1e-5  # random push-backs make a run that long this rarely (a 30 % rate: 10 in a row)
NOISE_ANSWERS = 200  # the push-back share is averaged over about this many answers
MEASURE_S = 1.0  # rates sent and let through are measured over the last second
BETA = 0.9  # a cut goes to this share of the ceiling
BELOW_REFUSED = 0.95  # the ceiling: this share of what got through (at 100 %, the relay's edge, it is refused)
MIN_CUT = 0.5  # nor below this share of the rate before (a window full of refusals lets nothing through)
CEILING_S = 1.5  # back at the ceiling this long after a cut (the cubic's concave half)
GROWTH = 0.002  # past the ceiling: +0.2 % after 1 s, +5 % after 3 s, +25 % after 5 s, double after 8 s
MIN_RATE = 0.1  # requests per second
BURST_S = 0.1  # unused pacing that may be spent at once
SETTLE_STARTS = 8  # after a slow-down, answers to this many requests still judge the old rate,
SETTLE_S = (0.25, 1.0)  # but no fewer than were sent in the first and no more than in the second of these


class RecentCount:
    """How many events in the last MEASURE_S seconds."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def add(self, now: float) -> None:
        times = self._times
        times.append(now)
        while times[0] <= now - MEASURE_S:  # ends at `now` at the latest (one comparison, once a request)
            times.popleft()

    def per_s(self, now: float) -> float:
        self._expire(now)
        return len(self._times) / MEASURE_S

    def _expire(self, now: float) -> None:
        while self._times and self._times[0] <= now - MEASURE_S:
            self._times.popleft()


class RateSignal:
    """Whether the latest push-backs mean "too fast" (a pattern) rather than random saturation.

    The run that counts as a pattern is longer when push-backs are common anyway (`noise`, their
    share over the last few hundred answers, patterns and the answers a slow-down settles on
    left out): random ones make a run that long once in 1 / FALSE_ALARM answers at most.
    """

    def __init__(self) -> None:
        self._recent: deque[bool] = deque(maxlen=WINDOW)
        self._pushed = 0
        self.run = 0  # push-backs in a row
        self.noise = 0.0
        self._noise_before_run = 0.0
        self._answers = 0
        self.since = -math.inf  # answers to requests sent before this say nothing new

    def answer(self, started_at: float, pushed_back: bool, now: float, probing: bool = False) -> bool:
        """Record one answer; True when it completes a pattern (the caller slows down)."""
        if started_at < self.since:
            return False
        if len(self._recent) == WINDOW:
            self._pushed -= self._recent[0]
        self._recent.append(pushed_back)
        self._pushed += pushed_back
        self.run = self.run + 1 if pushed_back else 0
        if self.run == 1:
            self._noise_before_run = self.noise
        self._answers += 1
        self.noise += (pushed_back - self.noise) / min(self._answers, NOISE_ANSWERS)  # a plain mean at first
        if self._pushed >= SHARE_SIGNAL or (pushed_back and self.run >= self._run_needed(probing)):
            self.noise = self._noise_before_run if self.run else self.noise  # a pattern is not noise
            self.restart(now)
            return True
        return False

    def _run_needed(self, probing: bool) -> int:
        least = RUN_SIGNAL_PROBING if probing else RUN_SIGNAL
        if self.noise <= 0.0:
            return least
        return max(least, math.ceil(math.log(FALSE_ALARM) / math.log(min(self.noise, 0.9))))

    def restart(self, now: float, rate: float = math.inf) -> None:
        """A slow-down to `rate` happened at `now`: judge again on answers to requests sent once it settled."""
        self._recent.clear()
        self._pushed = self.run = 0
        self.since = now + min(max(SETTLE_STARTS / rate, SETTLE_S[0]), SETTLE_S[1])


class AdaptiveRate:
    """Starts spaced `1 / rate` apart; the rate cut on a signal and grown back on a cubic curve."""

    def __init__(self) -> None:
        self._ceiling: float | None = None  # None: not pacing
        self._cut_at = -math.inf
        self._next_start = -math.inf

    @property
    def pacing(self) -> bool:
        return self._ceiling is not None

    def rate(self, now: float) -> float:
        """Requests per second allowed now (math.inf when not pacing)."""
        if self._ceiling is None:
            return math.inf
        t = now - self._cut_at - CEILING_S
        if t < 0:
            rate = self._ceiling * (1 + (1 - BETA) * (t / CEILING_S) ** 3)
        else:
            rate = self._ceiling * (1 + GROWTH * t**3)
        return max(rate, MIN_RATE)

    def probing(self, now: float) -> bool:
        """Paced, and above the ceiling of the last cut: looking for more than the relay allowed then."""
        return self._ceiling is not None and now > self._cut_at + CEILING_S

    def wait_s(self, now: float) -> float:
        return max(self._next_start - now, 0.0) if self._ceiling is not None else 0.0

    def started(self, now: float) -> None:
        rate = self.rate(now)
        if rate != math.inf:
            self._next_start = max(self._next_start, now - BURST_S) + 1 / rate

    def cut(self, now: float, sent_per_s: float, ok_per_s: float) -> float:
        """Slow down to what the relay let through (random push-backs aside); returns the new rate."""
        # What was sent: the paced rate (the last second may hold a pause), else the measured one.
        before = self.rate(now) if self.pacing else max(sent_per_s, ok_per_s, MIN_RATE)
        ceiling = max(min(ok_per_s * BELOW_REFUSED, before), before * MIN_CUT, MIN_RATE)
        rate = ceiling * BETA
        self._ceiling = ceiling
        self._cut_at = now
        self._next_start = max(self._next_start, now) if self._next_start > -math.inf else now
        return rate

    def cap(self, rate: float, now: float) -> None:
        """Never faster than `rate` from now on, until the curve grows past it (server headers said so)."""
        if rate < self.rate(now):
            self._ceiling = max(rate, MIN_RATE)
            self._cut_at = now - CEILING_S  # on the flat part: it stays near `rate` for a few seconds
            self._next_start = max(self._next_start, now)

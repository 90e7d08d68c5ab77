"""A key's window that the relay's 429s do not state, learned from what its answers show (docs/backoff.md).

A relay limiting N requests per W seconds lets a burst of N through from an empty window, then refuses
everything until the first of them is W old. So, for the first window of a run:

* N: the starts answered between the first start and the first start refused (`refused_at`);
* W: from the first start to the first start answered again after the refusals (`reopened_at`).

While the window is full (a pattern of push-backs, flow/adaptive.py's `RateSignal`), starts go one at a
time, `WATCH_SHARE` of the time since the refusals began apart: the reopening is seen within a few percent
of W, and so few starts keep even a window that counts refused requests from staying full for long. A
Retry-After pauses the starts (flow/limits.py) until the reset it names: the next start finds the reopening.

Both bounds lean the safe way: N counts only answered starts, W ends at a start that was answered (the
window reopened at or before it). A reopening sooner than `MIN_WINDOW_S` is a per-second limit, which the
adaptive rate fits: nothing is learned then.
"""

from __future__ import annotations

import math
from array import array

from batchrun.flow.pace import LearnedWindow

WATCH_SHARE = 1 / 20  # while watching, starts this share of the time since the refusals began apart
WATCH_MIN_GAP_S = 0.4
WATCH_STARTS = 2.0  # and at most this many starts per N (the burst's count) over the time since: few, against N
MIN_WINDOW_S = 2.0
MIN_REQUESTS = 2
MIN_REFUSED = 3  # refused starts, at least: one refusal (with a Retry-After, say) is random push-back
MIN_REFUSING_SHARE = 0.5  # refusals lasted at least this share of the window: a burst, then a full window
MAX_WINDOW_S = 90.0  # a first refusal later than this after the first start: not the first window's, nothing learned
MAX_REOPEN_S = 2 * MAX_WINDOW_S  # answered again only later than this: an outage, not a window; nothing learned


class WindowGuess:
    """Watches one key's answers for a window its 429s do not state; `answered` returns it once seen."""

    def __init__(self) -> None:
        self._first_start: float | None = None
        # start times of answered requests, from the first start on; 8 bytes each (up to MAX_WINDOW_S of a fast run's)
        self._answered = array("d")
        self.refused_at = math.inf  # the earliest start refused (push-back), inf while none
        self.watching = False  # a pattern of refusals: the window is full, starts go one at a time
        self.done = False  # learned, or found to be no window worth learning
        self.learned: LearnedWindow | None = None  # the window guessed here, as raised since by probes
        self._next_start = -math.inf
        self._last_refused = -math.inf
        self._refused = 0  # refused starts since the first
        self._shortest_s = 0.0  # the window is longer than this: from the first start to the last one refused

    def started(self, now: float) -> None:
        if self._first_start is None:
            self._first_start = now
        if self.watching:
            since = now - self.refused_at
            least = max(WATCH_MIN_GAP_S, since * WATCH_SHARE, since * WATCH_STARTS / max(len(self._answered), 1))
            self._next_start = now + least

    def wait_s(self, now: float) -> float:
        """While watching: seconds until the next start may go."""
        return max(self._next_start - now, 0.0) if self.watching else 0.0

    def refused(self, started_at: float) -> None:
        if self.done:
            return
        self.refused_at = min(self.refused_at, started_at)
        self._refused += 1
        self._last_refused = max(self._last_refused, started_at)
        if self._first_start is not None and self.refused_at - self._first_start > MAX_WINDOW_S:
            self.done, self.watching = True, False

    def pattern(self) -> bool:
        """The refusals are a pattern: True when watching begins (starts are then spaced here)."""
        if self.done or self.watching or self.refused_at == math.inf:
            return False
        self.watching = True
        return True

    def answered(self, started_at: float) -> LearnedWindow | None:
        """A success; the window, when it is the first start answered after a run of refusals watched."""
        if self.done:
            return None
        if started_at <= self.refused_at:  # (started with the first refused one: before it, at the relay)
            if self._first_start is None or started_at - self._first_start <= MAX_WINDOW_S:
                self._answered.append(started_at)
            return None
        if not self.watching or self._refused < MIN_REFUSED:  # random push-back, not a full window: watch on
            self.refused_at, self._refused, self.watching = math.inf, 0, False
            return None
        self.watching, self.done = False, True
        first = self._first_start if self._first_start is not None else started_at
        window_s = started_at - first
        requests = sum(first <= at <= self.refused_at for at in self._answered)
        refusing_s = started_at - self.refused_at
        if not MIN_WINDOW_S <= window_s <= MAX_REOPEN_S or requests < MIN_REQUESTS:
            return None
        if refusing_s < window_s * MIN_REFUSING_SHARE:  # a limit per second, met late in the run: not its window
            return None
        self._shortest_s = self._last_refused - first
        self.learned = LearnedWindow(requests, _tenths_up(window_s), "learned")
        return self.learned

    def raised(self, window: LearnedWindow) -> LearnedWindow:
        """A start above `window` was answered. A stated window doubles (its next 429 says the new limit). A
        guessed one is shorter than thought: it goes half way to the shortest it can be (the count is exact; a
        window too short would be overrun, and a relay counting refused requests would then refuse on and on)."""
        if window is not self.learned:
            return LearnedWindow(2 * window.requests, window.window_s, "learned")
        shorter = _tenths_up(max(self._shortest_s, (window.window_s + self._shortest_s) / 2))
        if shorter < window.window_s:
            self.learned = LearnedWindow(window.requests, shorter, "learned")
        else:  # as short as it can be: the count was short
            self.learned = LearnedWindow(window.requests + 1, window.window_s, "learned")
        return self.learned


def _tenths_up(seconds: float) -> float:
    return math.ceil(seconds * 10) / 10

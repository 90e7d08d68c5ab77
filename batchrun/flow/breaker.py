"""The outage breaker: when the relay is down, wait and probe instead of failing every row.

If nearly every recent attempt failed in a way that says the relay itself is
down (connection refused or reset, timeouts, a storm of 5xx), the breaker
opens: no row is sent, except one probe at a time, 1, 2, 4 … 30 s apart. The
first answer that shows the relay alive closes it. If it stays open longer than
`run.outage_timeout_s` (counted from the first failure of the run of failures, so the
time it took to open is not added), every waiting start gets an abort-rule-A error, so the
run stops with its rows pending and can be resumed. Once a few attempts in a
row have failed that way, failures stop using up rows' attempts (`looks_down`),
so no row ends as an error just before the breaker opens.
"""

from __future__ import annotations

import math
from collections import deque

from batchrun.base.stops import StopRule
from batchrun.protocols.relay_errors import CallError

DOWN_CLASSES = {"connection", "timeout", "server", "malformed"}
WINDOW = 20  # recent attempts looked at
OPEN_AT = 18  # failures among them that open the breaker
LOOKS_DOWN_AFTER = 5  # failures in a row: rows stop using up attempts, so none fails before the breaker opens
PROBE_EVERY_MAX_S = 30.0


class OutageBreaker:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._recent: deque[bool] = deque()  # True: the attempt failed as if the relay were down
        self._failures = 0
        self._in_a_row = 0
        self._opened_at: float | None = None
        self._down_since = math.inf  # the first failure of the current run of failures
        self._probing = False
        self._probes = 0
        self._next_probe = -math.inf
        self._last_error: CallError | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    @property
    def looks_down(self) -> bool:
        return self._opened_at is not None or self._in_a_row >= LOOKS_DOWN_AFTER

    @property
    def last_error(self) -> CallError | None:
        return self._last_error

    def gives_up_in_s(self, now: float) -> float | None:
        """While open: seconds until the run stops for the outage (None: closed)."""
        return None if self._opened_at is None else max(0.0, self._opened_at + self.timeout_s - now)

    @staticmethod
    def counts_as_down(error: CallError) -> bool:
        return error.error_class in DOWN_CLASSES

    def give_up_in(self, now: float) -> float:
        """Seconds until the relay has looked down for `timeout_s` (math.inf while it does not look down).

        Counted from the first failure of the run of failures, whether or not the breaker has opened yet:
        a storm of 503s halves the concurrency and pauses for ever longer, so opening can take many minutes.
        """
        return max(0.0, self._down_since + self.timeout_s - now) if self.looks_down else math.inf

    def wait_s(self, now: float) -> float:
        """Seconds until a start may go (math.inf: until a probe ends). Raises once the outage lasted too long."""
        left = self.give_up_in(now)
        if left <= 0:
            raise self._gave_up()
        if self._opened_at is None:
            return 0.0
        if self._probing:
            return left
        return min(max(self._next_probe - now, 0.0), left)

    def started(self, now: float) -> bool:
        """A start passed `wait_s`; True if it is the probe of an open breaker."""
        if self._opened_at is None:
            return False
        self._probing = True
        return True

    def record(self, now: float, failed: bool, probe: bool, error: CallError | None) -> bool:
        """An attempt's outcome; True when starts held by the breaker may try again."""
        if failed:
            self._last_error = error
        if failed and self._in_a_row == 0:
            self._down_since = now
        self._in_a_row = self._in_a_row + 1 if failed else 0
        if self._opened_at is not None:
            if not failed:
                self._close()
                return True
            if probe:
                self._probing = False
                self._probes += 1
                self._next_probe = now + min(PROBE_EVERY_MAX_S, 2.0**self._probes)
                return True
            return False  # an attempt started before the breaker opened
        if len(self._recent) == WINDOW:
            self._failures -= self._recent.popleft()
        self._recent.append(failed)
        self._failures += failed
        if self._failures >= OPEN_AT:
            self._opened_at = now
            self._next_probe = now + 1.0
        return False

    def _close(self) -> None:
        self._recent.clear()
        self._failures = 0
        self._opened_at = None
        self._probing = False
        self._probes = 0

    def _gave_up(self) -> CallError:
        last = f"; last error: {self._last_error}" if self._last_error else ""
        return CallError(
            "outage",
            f"every request failed for {self.timeout_s:g} s (run.outage_timeout_s){last}",
            retryable=False,
            abort=StopRule.A,
        )

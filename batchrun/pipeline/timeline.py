"""What happened when, recorded for `batchrun report` in bounded space.

* `AttemptLog`: one row's attempts, each as its time since the row's first attempt and
  its outcome (`ok`, or the error class and HTTP status), kept in the row's checkpoint
  record. A row retried through a long outage is capped at `MAX_LOGGED` entries (the
  `attempts` column still counts them all).
* `note_run`: the last run's state (running, finished, stopped by the server, stopped at the
  budget, interrupted) in the checkpoint's meta; a run killed outright stays "running".
* `LimiterTimeline`: the in-flight limit, the paced rate and the pauses of every start, one
  line per second of wall time that saw an attempt end, written with the checkpoint's commits.
  The space it takes grows with the run's duration, never with its rows or events.
* `Watched`: what the people watching see besides finished rows (429s, retries, time paused,
  each key's pace), counted this run by `AttemptLog` and `LimiterTimeline` on the event loop,
  read by the progress bar's ticker and the summary.

The limiter is read after every attempt, which is when `Limits` changes (`succeeded` /
`failed`); `observe` is the one place to re-point at a change hook of `Limits`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchrun.flow.limits import Limits
from batchrun.flow.pace import KeyPace
from batchrun.ledger.checkpoint import Checkpoint

MAX_LOGGED = 32
OK = "ok"
LAST_RUN = "last_run"  # checkpoint meta key


def note_run(checkpoint: Checkpoint, state: str, at: float, wall_s: float | None = None) -> None:
    last = orjson.loads(checkpoint.get_meta(LAST_RUN) or "{}")
    if state == "running":
        last = {"started_at": at}
    last.update(state=state, updated_at=at, wall_s=wall_s)
    checkpoint.set_meta(LAST_RUN, orjson.dumps(last).decode())


def last_run(checkpoint: Checkpoint) -> dict[str, Any]:
    """What `note_run` recorded last; empty for a checkpoint written before it existed."""
    return dict(orjson.loads(checkpoint.get_meta(LAST_RUN) or "{}"))


@dataclass
class Watched:
    """Counted this run on the event loop; read from the bar's ticker thread, so each field is replaced whole."""

    answered_429: int = 0  # attempts the relay answered 429 (push-back)
    retries: int = 0  # attempts that followed a failed one of the same row
    paused_s: float = 0.0  # time every new start was held by a pause
    paused_until: float = 0.0  # wall time the current pause ends (in the past: none)
    paces: tuple[KeyPace, ...] = ()  # each key's pace and learned window, as of the last second with an attempt


class AttemptLog:
    def __init__(self, watched: Watched | None = None) -> None:
        self.started_at: float | None = None  # wall time of the first attempt
        self._entries: list[str] = []
        self._watched = watched
        self._failed_last = False

    def start(self) -> None:
        self.started_at = time.time()

    def note(self, outcome: str, status: int | None = None) -> None:
        if self.started_at is None:
            return
        if self._watched is not None:  # counted before the cap: a long outage's attempts all count
            self._watched.answered_429 += status == 429
            self._watched.retries += self._failed_last  # an answer that failed its schema asks again: not a retry
        self._failed_last = outcome != OK
        if len(self._entries) >= MAX_LOGGED:
            return
        entry = f"{time.time() - self.started_at:.3f}:{outcome}"
        self._entries.append(entry if status is None else f"{entry}:{status}")

    def text(self) -> str | None:
        return " ".join(self._entries) or None


def parse_attempt_log(text: str | None) -> list[tuple[float, str, int | None]]:
    """(seconds since the row's first attempt, outcome, HTTP status) of each logged attempt."""
    entries = []
    for entry in (text or "").split():
        offset, outcome, *status = entry.split(":")
        entries.append((float(offset), outcome, int(status[0]) if status and status[0].isdigit() else None))
    return entries


@dataclass
class _Second:
    limit_min: int
    limit_max: int
    limit_last: int
    paused_s: float = 0.0
    rate: float | None = None  # requests per second paced, all keys together, at the second's first attempt


def paced_rate(paces: tuple[KeyPace, ...]) -> float | None:
    """The requests per second the keys in use are paced at together; None when none is paced."""
    rates = [p.rate_per_s for p in paces if p.rate_per_s is not None and p.retired is None]
    return sum(rates) if rates else None


@dataclass
class LimiterTimeline:
    checkpoint: Checkpoint
    watched: Watched = field(default_factory=Watched)
    key_variable: str = ""  # the key's variable, as `Limits.paces` names it
    _seconds: dict[int, _Second] = field(default_factory=dict)
    _paused_through: float = -math.inf  # wall time up to which pauses are counted already
    _second: int = 0  # the wall-clock second of the latest observation

    def observe(self, limits: Limits) -> None:
        """Note the limiter's state now; seconds before the current one go to the checkpoint."""
        now = time.time()
        second = int(now)
        limit = limits.limit
        new_second = second != self._second
        if new_second:  # the seconds before it are complete
            self._second = second
            self._emit(lambda s: s < second)
            # Once a second, not per attempt: the paces cost more than the rest of `observe`.
            self.watched.paces = tuple(limits.paces(self.key_variable))
        line = self._seconds.get(second)
        if line is None:
            line = self._seconds[second] = _Second(limit, limit, limit)
        elif limit != line.limit_last:
            line.limit_min, line.limit_max = min(line.limit_min, limit), max(line.limit_max, limit)
            line.limit_last = limit
        if new_second:
            line.rate = paced_rate(self.watched.paces)
        left = limits.paused_until - limits.now()
        if left > 0:
            self._add_pause(max(now, self._paused_through), now + left, limit)

    def close(self) -> None:
        """The run ends: every second noted so far goes to the checkpoint."""
        self._emit(lambda s: True)

    def _add_pause(self, start: float, end: float, limit: int) -> None:
        if end <= start:
            return
        self._paused_through = end
        self.watched.paused_s += end - start
        self.watched.paused_until = end
        for second in range(int(start), math.ceil(end)):
            line = self._seconds.setdefault(second, _Second(limit, limit, limit))
            line.paused_s += min(end, second + 1) - max(start, second)

    def _emit(self, done: Callable[[int], bool]) -> None:
        ready = sorted(s for s in self._seconds if done(s))
        if ready:
            lines = [(s, self._seconds.pop(s)) for s in ready]
            self.checkpoint.record_limiter(
                [(s, ln.limit_min, ln.limit_max, ln.limit_last, round(ln.paused_s, 3), ln.rate) for s, ln in lines]
            )

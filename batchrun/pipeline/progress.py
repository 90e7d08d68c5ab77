"""The progress bar: rows done, the rate now, ETA, what holds the run, retries and 429s, each key's pace, tokens, cost.

The bar is redrawn by a ticker thread every REFRESH_S, whether rows finish or not (a pause counts
down), so a finished row only adds to a few counters: the pipeline finishes thousands a second.
The ticker reads those counters and `Watched` (pipeline/timeline.py), which the event loop writes;
it never touches the limiter itself. The rate shown is the rows of the last RATE_WINDOW_S, not
tqdm's, which stays frozen at its last value while nothing finishes.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from tqdm.auto import tqdm  # a widget in notebooks, text in a terminal

from batchrun.base.redaction import for_terminal
from batchrun.flow.pace import KeyPace
from batchrun.flow.spend import cost
from batchrun.job.spec import PricingSpec
from batchrun.ledger.checkpoint import RowRecord
from batchrun.pipeline.timeline import Watched

REFRESH_S = 0.5
RATE_WINDOW_S = 10.0  # the rate shown: rows finished in the last 10 s
ETA_WINDOW_S = 60.0  # the ETA: from the rows of the last minute, steadier than the rate shown
PAUSE_SHOWN_S = 0.5  # a shorter pause is not worth a word in the bar
SUFFIXES = ("", "k", "M", "G", "T")
BAR_FORMAT = "{l_bar}{bar}| {count} [{elapsed}{postfix}]"


def human(value: float) -> str:
    """A count or rate for people: 987, 9.87, 23.1k, 1.2M; three significant digits, never 2e+04."""
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1000:
        return str(int(value))
    exponent = 0
    scaled = float(f"{value:.3g}")
    while abs(scaled) >= 1000 and exponent < len(SUFFIXES) - 1:
        exponent += 1
        scaled = float(f"{value / 1000**exponent:.3g}")
    return f"{scaled:f}".rstrip("0").rstrip(".") + SUFFIXES[exponent]


def money(amount: float) -> str:
    """An amount of money in the bar: four decimals while small (prices per row are), else as `human`."""
    return f"{amount:.4f}" if amount < 1000 else human(amount)


def pace_text(paces: tuple[KeyPace, ...]) -> str | None:
    """Each key's paced rate against its learned limit; the key's variable is named only when there are several."""
    several = len(paces) > 1
    parts = []
    for pace in paces:
        name = f"{pace.key} " if several else ""
        if pace.retired is not None:
            parts.append(f"{name}retired ({pace.retired})")
            continue
        words = []
        if pace.rate_per_s is not None:
            words.append(f"pace {human(pace.rate_per_s)}/s")
        if pace.window is not None:
            window = pace.window
            limit = f"{human(window.requests / window.window_s)}/s" if window.window_s > 0 else "?"
            words.append(f"of {limit} ({window.requests} per {window.window_s:g} s, {window.source})")
        if words or several:
            parts.append(name + (" ".join(words) or "not paced"))
    return "; ".join(parts) or None


def paid_images(record: RowRecord) -> int:
    """The images a row's answer was paid for (`pricing.per_image`): a shared row's are the source row's."""
    if not record.image_paths or record.shared_from is not None:
        return 0
    return len(orjson.loads(record.image_paths))


class Progress:
    def __init__(
        self,
        total: int,
        quiet: bool,
        pricing: PricingSpec | None,
        max_cost: float | None = None,
        spent: float = 0.0,
        tokens: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`spent` and `tokens`: the job's before this run, so cost and tokens both count the whole job.

        `clock` is the wall clock (a test's own); the ticker thread starts unless `quiet`."""
        self._bar = _Bar(
            total=total,
            unit="row",
            disable=quiet,
            file=sys.stderr,
            dynamic_ncols=True,
            bar_format=BAR_FORMAT,
        )
        self._pricing = pricing
        self._max_cost = max_cost
        self._clock = clock
        self.total = total
        self.done = 0  # rows finished this run
        self.failed = 0
        self.tokens = tokens
        self.cost = spent
        self.watched: Watched | None = None  # set by an engine that counts retries, 429s, pauses and paces
        self._waiting: str | None = None  # what holds the run, as the engine says it
        self._seen: deque[tuple[float, int]] = deque([(clock(), 0)])  # (time, rows done) at each tick
        self._ticker = None if quiet else _Ticker(self.tick)

    def watch(self) -> Watched:
        """What the engine counts for the bar and the summary: the local engine fills it (the Ray engine cannot)."""
        self.watched = Watched()
        return self.watched

    def row_done(self, status: str, record: RowRecord | None) -> None:
        if record is None:
            self.count(status, None, None)
            return
        self.count(status, record.prompt_tokens, record.completion_tokens, paid_images(record), record.cached_tokens)

    def count(
        self,
        status: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        images: int = 0,
        cached_tokens: int | None = None,
    ) -> None:
        """One finished row, by its status and tokens (what the Ray engine's actors report); the ticker draws it."""
        self.done += 1
        if status != "ok":
            self.failed += 1
        prompt, completion = prompt_tokens or 0, completion_tokens or 0
        self.tokens += prompt + completion
        if self._pricing is not None:
            self.cost += cost(self._pricing, prompt, completion, images, cached_tokens)

    def say(self, line: str) -> None:
        """One line about the run (what it is waiting for), above the bar; printed with --quiet too."""
        tqdm.write(for_terminal(f"batchrun: {line}"), file=sys.stderr)  # the line may quote the relay

    def waiting(self, what: str | None) -> None:
        """What holds the run now (None: nothing), shown in the bar from the next tick until it changes."""
        self._waiting = what

    def tick(self) -> None:
        """Redraw the bar (the ticker calls this every REFRESH_S; a test may call it with its own clock)."""
        now = self._clock()
        self._seen.append((now, self.done))
        while len(self._seen) > 2 and self._seen[1][0] <= now - ETA_WINDOW_S:
            self._seen.popleft()
        self._bar.set_postfix_str(for_terminal(self.describe(now)), refresh=False)  # a retired key may quote the relay
        self._bar.update(self.done - self._bar.n)
        self._bar.refresh()

    def describe(self, now: float) -> str:
        """The bar's words after the count: rate, ETA, what holds the run, failures, pace, tokens and cost."""
        rate = self._rate(now, RATE_WINDOW_S)
        eta_rate = self._rate(now, ETA_WINDOW_S)
        left = self.total - self.done
        eta = tqdm.format_interval(left / eta_rate) if eta_rate > 0 else "?"
        words = [f"{human(round(rate, 1))} rows/s", f"ETA {eta}"]
        watched = self.watched
        if self._waiting is not None:
            words.append(self._waiting)
        if watched is not None and (paused := watched.paused_until - now) >= PAUSE_SHOWN_S:
            words.append(f"paused {math.ceil(paused)} s")
        words.append(f"failed {human(self.failed)}")
        if watched is not None:
            words += [f"retries {human(watched.retries)}", f"429s {human(watched.answered_429)}"]
            pace = pace_text(watched.paces)
            if pace is not None:
                words.append(pace)
        job = f"job: {human(self.tokens)} tokens"
        if self._pricing is not None:
            budget = f" of {money(self._max_cost)}" if self._max_cost is not None else ""
            job += f", {money(self.cost)}{budget} {self._pricing.currency}"
        words.append(job)
        return ", ".join(words)

    def _rate(self, now: float, window_s: float) -> float:
        """Rows per second over the last `window_s` (or since the start, when shorter)."""
        since, done_then = next(((t, n) for t, n in self._seen if t >= now - window_s), self._seen[-1])
        span = now - since
        return (self.done - done_then) / span if span > 0 else 0.0

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        self.tick()
        self._bar.close()


class _Bar(tqdm):  # type: ignore[type-arg]
    """tqdm, its counts written by `human` (tqdm's unit_scale writes 52 as 52.0)."""

    @property
    def format_dict(self) -> dict[str, Any]:
        shown = dict(super().format_dict)
        total = shown["total"]
        shown["count"] = f"{human(shown['n'])}/{human(total) if total is not None else '?'}"
        return shown


class _Ticker:
    """A daemon thread that calls `tick` every REFRESH_S until stopped (a run's end, Ctrl-C included)."""

    def __init__(self, tick: Callable[[], None]) -> None:
        self._tick = tick
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batchrun-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(REFRESH_S):
            self._tick()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

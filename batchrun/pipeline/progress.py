"""The progress bar: rows done and failed, requests per second, tokens, cost, ETA."""

from __future__ import annotations

import sys
import time

import orjson
from tqdm.auto import tqdm  # a widget in notebooks, text in a terminal

from batchrun.base.redaction import for_terminal
from batchrun.flow.spend import cost
from batchrun.job.spec import PricingSpec
from batchrun.ledger.checkpoint import RowRecord

REFRESH_S = 0.5


def paid_images(record: RowRecord) -> int:
    """The images a row's answer was paid for (`pricing.per_image`): a shared row's are the source row's."""
    if not record.image_paths or record.shared_from is not None:
        return 0
    return len(orjson.loads(record.image_paths))


class Progress:
    def __init__(
        self, total: int, quiet: bool, pricing: PricingSpec | None, max_cost: float | None = None, spent: float = 0.0
    ) -> None:
        """`spent`: the job's cost before this run, so the bar shows the job's total against `max_cost`."""
        self._bar = tqdm(total=total, unit="row", disable=quiet, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        self._pricing = pricing
        self._max_cost = max_cost
        self.failed = 0
        self.tokens = 0
        self.cost = spent
        self._pending = 0
        self._last = 0.0
        self._waiting: str | None = None  # what holds the run, shown in the bar

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
        """One finished row, by its status and tokens (what the Ray engine's actors report)."""
        if status != "ok":
            self.failed += 1
        prompt, completion = prompt_tokens or 0, completion_tokens or 0
        self.tokens += prompt + completion
        if self._pricing is not None:
            self.cost += cost(self._pricing, prompt, completion, images, cached_tokens)
        self._pending += 1
        now = time.monotonic()
        if now - self._last >= REFRESH_S:  # tqdm calls are not free at thousands of rows a second
            self._refresh(now)

    def say(self, line: str) -> None:
        """One line about the run (what it is waiting for), above the bar; printed with --quiet too."""
        tqdm.write(for_terminal(f"batchrun: {line}"), file=sys.stderr)  # the line may quote the relay

    def waiting(self, what: str | None) -> None:
        """What holds the run now (None: nothing), shown in the bar until it changes."""
        if what != self._waiting:
            self._waiting = what
            self._refresh(time.monotonic())
            self._bar.refresh()

    def _refresh(self, now: float) -> None:
        postfix: dict[str, object] = {"failed": self.failed, "tokens": self.tokens}
        if self._waiting is not None:
            postfix["waiting"] = self._waiting
        if self._pricing is not None:
            budget = f" of {self._max_cost:.4f}" if self._max_cost is not None else ""
            postfix["cost"] = f"{self.cost:.4f}{budget} {self._pricing.currency}"
        self._bar.set_postfix(postfix, refresh=False)  # before update(), which redraws the bar
        self._bar.update(self._pending)
        self._pending = 0
        self._last = now

    def close(self) -> None:
        self._refresh(time.monotonic())
        self._bar.close()

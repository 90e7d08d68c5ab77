"""The progress bar: rows done and failed, requests per second, tokens, cost, ETA."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from batchrun.checkpoint import RowRecord
from batchrun.spec import PricingSpec

REFRESH_S = 0.5


class Progress:
    def __init__(self, total: int, quiet: bool, pricing: PricingSpec | None) -> None:
        self._bar = tqdm(total=total, unit="row", disable=quiet, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        self._pricing = pricing
        self.failed = 0
        self.tokens = 0
        self.cost = 0.0
        self._pending = 0
        self._last = 0.0

    def row_done(self, status: str, record: RowRecord | None) -> None:
        if status != "ok":
            self.failed += 1
        if record is not None:
            prompt, completion = record.prompt_tokens or 0, record.completion_tokens or 0
            self.tokens += prompt + completion
            if self._pricing is not None:
                self.cost += (
                    prompt * self._pricing.input_per_million + completion * self._pricing.output_per_million
                ) / 1e6
        self._pending += 1
        now = time.monotonic()
        if now - self._last >= REFRESH_S:  # tqdm calls are not free at thousands of rows a second
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        self._bar.update(self._pending)
        self._pending = 0
        self._last = now
        postfix = {"failed": self.failed, "tokens": self.tokens}
        if self._pricing is not None:
            postfix["cost"] = f"{self.cost:.4f} {self._pricing.currency}"
        self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self._refresh(time.monotonic())
        self._bar.close()

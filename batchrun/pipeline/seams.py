"""The row path's collaborators, declared: what sending a row needs from the run around it.

The local engine passes its own parts (checkpoint.Checkpoint, limits.Limits,
sharing.SharedAnswers, stops.AbortWatch, spend.Budget, progress.Progress); the Ray engine's
workers pass stand-ins that talk to one coordinator for the whole job
(engines/coordinator_link.py). The row path depends only on these protocols, so either
engine can compose it and mypy checks that both fit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol

from batchrun.ledger.checkpoint import RowRecord
from batchrun.protocols import CallError
from batchrun.protocols.relay_errors import QuotaLeft


class Ledger(Protocol):
    """The checkpoint as the row path uses it: an intent before the first send, then the row's end."""

    async def begin(self, idx: int) -> None: ...
    def finish(self, record: RowRecord) -> None: ...
    def withdraw(self, idx: int) -> None: ...


class Admission(Protocol):
    """The limiter: a place for each attempt, and what the attempt's outcome teaches it."""

    def slot(self, tokens: int, retry: bool = False) -> AbstractAsyncContextManager[Any]: ...
    def succeeded(self, ticket: Any, actual_tokens: int | None, quota: QuotaLeft | None = None) -> None: ...
    def failed(self, ticket: Any, error: CallError) -> None: ...
    def excuses(self, error: CallError) -> bool: ...


class Spending(Protocol):
    """The budget (`run.max_cost`): each request's worst case held before it is sent, settled after."""

    @property
    def stopped(self) -> bool: ...
    async def reserve(self, prompt_estimate: int, cap: int | None) -> float | None: ...
    def settle(
        self,
        held: float,
        prompt_estimate: int,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        images: int = 0,
        cached_tokens: int | None = None,
    ) -> None: ...


class Sharing(Protocol):
    """Identical requests sent once: a row finds an answer, or leads its key and publishes its own."""

    async def find(self, key: bytes, idx: int, row_id: str) -> RowRecord | None: ...
    def leading(self, key: bytes) -> AbstractContextManager[Callable[[RowRecord], None]]: ...


class StopWatch(Protocol):
    """The stop rules (base/stops.py): told every outcome; `tripped` once the run must stop."""

    tripped: CallError | None

    def on_success(self) -> None: ...
    def on_error(self, error: CallError) -> None: ...


class ProgressSink(Protocol):
    """Where finished rows are counted (the progress bar, or an actor's report to the driver)."""

    def row_done(self, status: str, record: RowRecord | None) -> None: ...

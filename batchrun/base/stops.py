"""When a run stops because going on cannot help (docs/protocol.md §5.2), and what happens to the rows it held.

A failed call may carry a `StopRule`. The `AbortWatch` counts them and trips when
a rule is met; the run then sends nothing more. Rows that failed with such an
error are held back (`HeldRows`) rather than finished: if the run stops they stay
pending, so a resume asks again; if it goes on after all, they are errors like any other.

This module is a leaf: the engines' collaborators and the protocols' errors
depend on it, never the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

ABORT_AFTER = 3  # rules B and C: answers in a row before the run stops
# Rule D: identical refusals in a row. At most `concurrency` more are in flight when it trips, so a run
# sends at most concurrency + SAME_REFUSALS requests to a relay that refuses everything. Ten in a row with
# no success between is what a 10 % share of row-specific refusals does once in ten billion rows.
SAME_REFUSALS = 10
_REQUEST_ID = re.compile(r"\s*\(request id: [^)]*\)")


class StopRule(str, Enum):
    """Which kind of answer stops the run, and after how many. A str, so "A" == StopRule.A."""

    A = "A"
    """At once: the account cannot go on (no quota or balance), or the relay stayed down too long.
    Every further request would fail the same way, and may cost money."""

    B = "B"
    """After ABORT_AFTER in a row with no success between: the key is refused (401, a 403 that
    is not about quota). One refusal may be a relay hiccup; three running are the key."""

    C = "C"
    """After ABORT_AFTER identical answers in a row, only while no row has succeeded yet: the job
    itself is wrong (unknown model, a parameter the model refuses, answers that are not the
    API's). Once a row succeeded, the job works and such answers are that row's own problem."""

    D = "D"
    """After SAME_REFUSALS refusals in a row (4xx) with the same words and no success since: the relay
    refuses everything alike (a proxy without its database, a wrong master key), whatever worked before.
    A refusal of one row's content comes among successes, or in other words, and never stops the run."""


class Stopping(Protocol):
    """What the watch reads of a failure (a protocols.CallError)."""

    @property
    def abort(self) -> StopRule | None: ...
    @property
    def status(self) -> int | None: ...
    @property
    def code(self) -> str: ...
    @property
    def error_class(self) -> str: ...
    @property
    def message(self) -> str: ...


E = TypeVar("E", bound=Stopping)
R = TypeVar("R")


class AbortWatch(Generic[E]):
    """Stops the run when going on cannot help: `tripped` is the failure that met its rule."""

    def __init__(self) -> None:
        self.tripped: E | None = None
        self._any_success = False
        self._b_run = 0
        self._c_key: tuple[Any, ...] | None = None
        self._c_run = 0
        self._d_key: tuple[Any, ...] | None = None
        self._d_run = 0

    def on_success(self) -> None:
        self._any_success = True
        self._b_run = 0
        self._d_run = 0

    def on_error(self, error: E) -> None:
        if error.abort == StopRule.A:
            self.tripped = error
        elif error.abort == StopRule.B:
            self._b_run += 1
            if self._b_run >= ABORT_AFTER:
                self.tripped = error
        elif error.abort == StopRule.C and not self._any_success:
            key = (error.status, error.code, error.error_class)
            self._c_run = self._c_run + 1 if key == self._c_key else 1
            self._c_key = key
            if self._c_run >= ABORT_AFTER:
                self.tripped = error
        elif error.abort == StopRule.D:
            key = (error.status, error.code, _REQUEST_ID.sub("", error.message))
            self._d_run = self._d_run + 1 if key == self._d_key else 1
            self._d_key = key
            if self._d_run >= SAME_REFUSALS:
                self.tripped = error


class HeldRows(Generic[R]):
    """Rows whose failure may stop the run: not finished until the run knows whether it stops."""

    def __init__(self) -> None:
        self._rows: list[R] = []

    def __len__(self) -> int:
        return len(self._rows)

    def hold(self, row: R) -> None:
        self._rows.append(row)

    def release(self, finish: Callable[[R], None]) -> None:
        """The run goes on after all: each held row is finished (as the error it is)."""
        rows, self._rows = self._rows, []
        for row in rows:
            finish(row)

    def withdraw(self, withdraw: Callable[[R], None]) -> None:
        """The run stopped: each held row goes back to pending."""
        rows, self._rows = self._rows, []
        for row in rows:
            withdraw(row)

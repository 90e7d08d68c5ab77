"""Several keys (docs/keys.md): one limiter per key, rows to whichever key can take them soonest.

`KeyPool` is a `Limits` to the engines (the run's one limiter) whose own places and
outage breaker are the job's, while each key has a lane of its own: a `Limits` with
the job's `run` limits, its own learned window and its own push-back. A key answered
with an exhausted quota or refused as invalid is retired for the rest of the run (one
line names its variable, never its value); its row goes on with another key, without
using up an attempt. Only when no key is left does the answer count towards the
stop rules, as with one key.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from batchrun.base.stops import StopRule
from batchrun.flow.limits import LimiterChange, Limits, Slot, Ticket
from batchrun.flow.pace import KeyPace
from batchrun.job.spec import RunSpec
from batchrun.protocols import CallError
from batchrun.protocols.relay_errors import QuotaLeft

RETIRING_CLASSES = {"quota": "its quota or balance is used up", "auth": "the relay refused it as invalid"}


def limits_for(names: Sequence[str], concurrency: int, run: RunSpec, say: Callable[[str], None]) -> Limits:
    """The run's limiter: one key's `Limits`, or a `KeyPool` of several (`names`: their variables)."""
    if len(names) == 1:
        return Limits(concurrency, run.requests_per_minute, run.tokens_per_minute, run.outage_timeout_s, key=names[0])
    return KeyPool(names, concurrency, run.requests_per_minute, run.tokens_per_minute, run.outage_timeout_s, say=say)


def _say(line: str) -> None:
    print(f"batchrun: {line}", file=sys.stderr)


class KeyPool(Limits):
    """The keys named by `provider.api_key_env` (a list): `lanes[i]` limits the key in `names[i]`."""

    def __init__(
        self,
        names: Sequence[str],
        concurrency: int,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        outage_timeout_s: float = math.inf,
        on_change: Callable[[LimiterChange], None] | None = None,
        say: Callable[[str], None] = _say,
    ) -> None:
        super().__init__(concurrency, None, None, outage_timeout_s, on_change)
        self.lanes = [
            Limits(concurrency, requests_per_minute, tokens_per_minute, outage_timeout_s, on_change, key=name)
            for name in names
        ]
        for index, lane in enumerate(self.lanes):
            lane.index = index
            lane.breaker = self.breaker  # one relay: down for every key at once
            lane.peers = [other for other in self.lanes if other is not lane]
        self._say = say

    @property
    def paused_until(self) -> float:
        """Until when every key is paused (the soonest a start may go)."""
        return min((lane.paused_until for lane in self._active()), default=-math.inf)

    def paces(self, key: str | None = None) -> list[KeyPace]:
        return [pace for lane in self.lanes for pace in lane.paces()]

    def slot(self, tokens: int, retry: bool = False) -> PoolSlot:  # type: ignore[override]
        return PoolSlot(self, tokens, retry)

    def soonest(self, tokens: int) -> Limits:
        """The key that can take a start soonest: places free first, then the shortest wait."""
        lanes = self._active()
        if not lanes:
            raise CallError(
                "quota", "every key of provider.api_key_env left the run", retryable=False, abort=StopRule.A
            )
        return min(lanes, key=lambda lane: _soon(lane, tokens))

    def succeeded(self, ticket: Ticket, actual_tokens: int | None, quota: QuotaLeft | None = None) -> None:
        self.lanes[ticket.key].succeeded(ticket, actual_tokens, quota)

    def failed(self, ticket: Ticket, error: CallError) -> None:
        lane = self.lanes[ticket.key]
        lane.failed(ticket, error)
        why = RETIRING_CLASSES.get(error.error_class)
        if why is None:
            return
        if lane.retired is None:
            lane.retired = why
            self._say(f"key {lane.key} retired for the rest of the run: {why} ({error})")
        if self._active():  # another key takes the row over: not the row's failure, nor a reason to stop
            error.switch_key, error.retryable, error.abort = True, True, None

    def excuses(self, error: CallError) -> bool:
        return self.lanes[0].excuses(error)

    def _active(self) -> list[Limits]:
        return [lane for lane in self.lanes if lane.retired is None]


def _soon(lane: Limits, tokens: int) -> tuple[bool, float, int]:
    """Whether its places are all taken, how long until its limits let a start go, how many are there or queued."""
    load = lane.in_flight.used + lane.in_flight.waiting
    return load >= lane.limit, lane.wait_s(tokens), load


class PoolSlot:
    """A place with the key that can take it soonest (`KeyPool.slot`); the ticket says which key."""

    __slots__ = ("_pool", "_tokens", "_retry", "_slot")

    def __init__(self, pool: KeyPool, tokens: int, retry: bool) -> None:
        self._pool = pool
        self._tokens = tokens
        self._retry = retry
        self._slot: Slot | None = None

    async def __aenter__(self) -> Ticket:
        while True:
            lane = self._pool.soonest(self._tokens)
            slot = lane.slot(self._tokens, self._retry)
            ticket = await slot.__aenter__()
            if lane.retired is None:
                self._slot = slot
                return ticket
            await slot.__aexit__(None, None, None)  # retired while this row waited for it: another key takes it

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._slot is not None:
            await self._slot.__aexit__(*exc_info)

"""A worker's stand-ins for the job-wide coordinator (engines/coordinator.py), and `ClusterWorker`,
which sends a worker's batches of rows through the row pipeline with them.

On a worker, the row pipeline (pipeline/rows.py) talks to the coordinator through
`ClusterLedger`, `ClusterLimits`, `ClusterSharing`, `ClusterWatch` and `ClusterBudget`,
which implement the row path's declared collaborators (pipeline/seams.py: Ledger,
Admission, Sharing, StopWatch, Spending), over one `CoordinatorLink`. The link reaches the
coordinator through `CoordinatorCalls`: a Ray actor handle for the Ray engine
(engines/ray_coordinator.py), or any other way to call its methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from batchrun.engines.coordinator import (
    FOLLOW,
    INTENT_SLICE,
    LEAD,
    LONGEST_SYNC_S,
    MOST_INTENTS,
    SYNC_RATE,
    SYNC_S,
    RowValues,
    SyncState,
    error_fields,
    row_values,
)
from batchrun.flow.breaker import OutageBreaker
from batchrun.flow.sharing import SharedAnswers
from batchrun.flow.spend import Budget
from batchrun.job.inputs import ROW_INDEX
from batchrun.job.render import Renderer
from batchrun.job.spec import Job
from batchrun.job.structured import AnswerParser
from batchrun.ledger.checkpoint import RowRecord
from batchrun.pipeline.rows import RowBatch, RowParts, RowPipeline, WorkItem, open_transport
from batchrun.pipeline.seams import ProgressSink
from batchrun.protocols import CallError, protocol_for
from batchrun.protocols.relay_errors import QuotaLeft


class CoordinatorGone(Exception):
    """The coordinator cannot be reached any more (its process ended: the driver was killed)."""


class CoordinatorCalls(Protocol):
    """How a worker calls the coordinator's methods; raises CoordinatorGone once it cannot."""

    async def ask(self, method: str, *args: Any) -> Any: ...


class CoordinatorLink:
    """A worker's line to the coordinator, and its lease.

    Calls nobody waits for are sent in groups, one `sync` every `period`, whose answer
    renews the lease and says whether the job stopped. The period is `SYNC_S`, longer at
    high rates (fewer, larger syncs: a sync's cost to the coordinator hardly depends on its size).
    Ray does not run an async actor's calls in the order they were sent, so syncs go one at a
    time, and a batch ends with `settle`: its finished rows are with the coordinator before the
    driver hears of them.
    """

    def __init__(self, coordinator: CoordinatorCalls) -> None:
        """On the worker's event loop: the link syncs (and the worker is alive) for as long as the loop runs."""
        self._coordinator = coordinator
        self.worker = uuid.uuid4().hex  # this worker, as the coordinator knows it (a restarted one is another)
        self._outbox: list[tuple[str, tuple[Any, ...]]] = []
        self._lease_until = -math.inf  # monotonic time
        self._renewed = asyncio.Event()
        self._wake = asyncio.Event()  # sync now, not at the next tick
        self._synced = asyncio.Event()
        self._started = self._done = 0  # syncs sent, and answered
        self._sent = 0  # requests started since the last sync
        self._counted = 0  # requests started since `_measured_at`
        self._measured_at = time.monotonic()
        self.rate = 0.0  # requests this worker starts a second
        self.period = SYNC_S  # seconds between syncs
        self._last_row: tuple[RowRecord | None, RowValues] = (None, ())  # see `values`
        self._intents: list[int] = []  # rows whose intents the next sync carries
        self._committing: asyncio.Future[bool] | None = None  # that sync's answer about them
        self.state: SyncState | None = None
        self.demand: Callable[[], int] = lambda: 0
        self.on_sync: list[Callable[[SyncState], None]] = []
        self._syncer = asyncio.ensure_future(self._sync_every())

    def tell(self, method: str, *args: Any) -> None:
        self._outbox.append((method, args))

    def sync_soon(self) -> None:
        """What was told is wanted now (places given back that other workers wait for), not in a period."""
        self._wake.set()

    def values(self, record: RowRecord) -> RowValues:
        """A finished row's values: the same tuple for the same record, so that a sync carrying it
        twice (the end of its lead and its finish) pickles it once."""
        last, values = self._last_row
        if record is not last:
            values = row_values(record)
            self._last_row = (record, values)
        return values

    def count_sent(self) -> None:
        self._sent += 1
        self._counted += 1

    def commit(self, indexes: list[int], now: bool) -> asyncio.Future[bool]:
        """These rows' intents go with the next sync (`now`: at once); True: committed, False: not to be sent."""
        self._intents += indexes
        if self._committing is None:
            self._committing = asyncio.get_running_loop().create_future()
        if now:
            self._wake.set()
        return self._committing

    async def ask(self, method: str, *args: Any) -> Any:
        return await self._coordinator.ask(method, *args)

    async def leased(self) -> None:
        """Returns while this worker may start requests: never once the driver is gone."""
        while time.monotonic() >= self._lease_until:
            self._renewed.clear()
            await self._renewed.wait()

    async def settle(self, news: bool = True) -> None:
        """Everything told so far is with the coordinator, and (`news`) this worker knows the job's state after it.

        Without `news`, an empty outbox needs no sync of its own: only the one under way, if any."""
        carrying = self._started + 1 if news or self._outbox else self._started
        if self._done >= carrying:
            return
        self._wake.set()
        while self._done < carrying:
            self._synced.clear()
            await self._synced.wait()

    async def _sync_every(self) -> None:
        while True:
            calls, self._outbox = self._outbox, []
            sent, self._sent = self._sent, 0
            intents, self._intents = self._intents, []
            committing, self._committing = self._committing, None
            self._started += 1
            asked_at = time.monotonic()
            try:
                state: SyncState = await self.ask("sync", self.worker, self.demand(), sent, calls, intents)
            except CoordinatorGone:  # the driver was killed: no more leases
                if committing is not None:
                    committing.set_result(False)
                await asyncio.sleep(SYNC_S)
                continue
            if committing is not None:
                committing.set_result(state.committed)
            self.state = state
            self._lease_until = asked_at + state.lease_s
            self._measure(time.monotonic())
            for listener in self.on_sync:
                listener(state)
            self._done += 1
            self._renewed.set()
            self._synced.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.period)
            self._wake.clear()

    def _measure(self, now: float) -> None:
        """The rate, over SYNC_S at least (syncs a row needed at once come sooner), and the period that follows."""
        elapsed = now - self._measured_at
        if elapsed >= SYNC_S:
            self.rate = self._counted / elapsed
            self._counted, self._measured_at = 0, now
            self.period = min(LONGEST_SYNC_S, SYNC_S * max(1.0, self.rate / SYNC_RATE))


class ClusterWatch:
    """The abort watch (seams.StopWatch), kept by the coordinator; `tripped` is this worker's latest news of it."""

    def __init__(self, link: CoordinatorLink) -> None:
        self._link = link
        self.tripped: CallError | None = None
        self._success_told = False  # since this worker's latest error, in this sync: more would say nothing new
        link.on_sync.append(self._synced)

    def on_error(self, error: CallError) -> None:
        self._link.tell("on_error", error_fields(error))
        self._success_told = False

    def on_success(self) -> None:
        if not self._success_told:
            self._link.tell("on_success")
            self._success_told = True

    def _synced(self, state: SyncState) -> None:
        self.tripped = CallError(**state.tripped) if state.tripped else None
        self._success_told = False


class _Use:
    """One attempt's permit, as the worker holds it."""

    __slots__ = ("number", "started", "answered")

    def __init__(self, number: int) -> None:
        self.number = number
        self.started = time.monotonic()
        self.answered = False


class ClusterLimits:
    """The limiter (seams.Admission), answered by the coordinator's through leased permits.

    While the coordinator says starts are free, a permit answered successfully serves this
    worker's next attempt without a call; a failed attempt's permit always goes back, so the
    limiter learns from it and may pace what follows. A lease that lapsed (the driver is gone)
    holds every attempt; news that the job stopped cancels this worker's batches.
    """

    def __init__(self, link: CoordinatorLink, watch: ClusterWatch) -> None:
        self._link = link
        self._watch = watch
        self._batches: set[anyio.CancelScope] = set()
        self._idle: list[int] = []  # permits held and not in use
        self._held = 0  # permits held, in use or not
        self._waiting: list[asyncio.Future[int]] = []
        self._leasing = False
        self._places = 1
        self._free = False
        self._looks_down = False  # the relay, as of the latest lease or sync
        link.demand = lambda: self._held + len(self._waiting)
        link.on_sync.append(self._synced)

    def stop_batches(self) -> None:
        """The job stops (a row found out first): every batch's rows not sent stay pending."""
        self._stop(None)

    @contextmanager
    def stoppable(self) -> Iterator[None]:
        """Around one batch: cancelled, like the local run's workers, when the job stops."""
        with anyio.CancelScope() as scope:
            self._batches.add(scope)
            try:
                yield
            finally:
                self._batches.discard(scope)

    @asynccontextmanager
    async def slot(self, tokens: int, retry: bool = False) -> AsyncIterator[_Use]:
        """A permit for one attempt; the attempt ends with `succeeded` (inside) or `failed` (just after)."""
        await self._link.leased()
        use = _Use(await (self._fresh(tokens, retry) if retry or not self._free else self._kept(tokens)))
        try:
            yield use
        except BaseException:  # cancelled mid-attempt: no outcome follows
            if not use.answered:  # an answered one's permit went on already
                self._release(use.number)
            raise

    async def _kept(self, tokens: int) -> int:
        """An idle permit of this worker's, or one leased with those the other waiting rows need."""
        if self._idle:
            return self._idle.pop()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        if not self._leasing:
            self._leasing = True
            asyncio.ensure_future(self._lease(tokens))
        try:
            return await waiter
        except BaseException:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            elif not waiter.cancelled():  # handed a permit while being cancelled: keep it for another row
                self._hand_over(waiter.result())
            raise

    async def _lease(self, tokens: int) -> None:
        try:
            while self._waiting:
                for number in await self._ask(tokens, False, len(self._waiting)):
                    self._held += 1
                    self._hand_over(number)
        finally:
            self._leasing = False

    async def _fresh(self, tokens: int, retry: bool) -> int:
        (number,) = await self._ask(tokens, retry, 1)
        self._held += 1
        return number

    async def _ask(self, tokens: int, retry: bool, want: int) -> list[int]:
        answer: dict[str, Any] = {"again": True}
        while "again" in answer:
            answer = await self._link.ask("lease", self._link.worker, tokens, retry, want)
        if "refused" in answer:
            raise CallError(**answer["refused"])
        if "stopped" in answer:  # the job stopped: this row stays pending, nothing is sent
            self._stop(answer["stopped"])
            await anyio.sleep_forever()
        self._free, self._looks_down = answer["free"], answer["looks_down"]
        permits: list[int] = answer["permits"]
        return permits

    def _hand_over(self, number: int) -> None:
        """A permit to the row that waited longest, or kept idle; given back if this worker holds too many."""
        while self._waiting:
            waiter = self._waiting.pop(0)
            if not waiter.done():
                waiter.set_result(number)
                return
        if self._free and self._held <= self._places:
            self._idle.append(number)
        else:
            self._release(number)

    def _release(self, number: int) -> None:
        self._held -= 1
        self._link.tell("give_back", number)
        self._link.sync_soon()

    def succeeded(self, use: _Use, actual_tokens: int | None, quota: QuotaLeft | None = None) -> None:
        use.answered = True
        keep = self._free and self._held <= self._places
        self._link.tell("succeeded", use.number, time.monotonic() - use.started, actual_tokens, quota, keep)
        if keep:
            self._hand_over(use.number)
        else:
            self._held -= 1
            if self._free:  # beyond this worker's share: another worker waits for the place
                self._link.sync_soon()

    def failed(self, use: _Use, error: CallError) -> None:
        self._held -= 1
        self._link.tell("failed", use.number, time.monotonic() - use.started, error_fields(error))

    def excuses(self, error: CallError) -> bool:
        return self._looks_down and OutageBreaker.counts_as_down(error)

    def _synced(self, state: SyncState) -> None:
        self._places, self._free, self._looks_down = state.places, state.free, state.looks_down
        if state.stopped:
            self._stop(state.tripped)
        # Idle permits go back when no row waits for one, when starts are paced, or beyond this worker's share.
        while self._idle and (not self._waiting or not self._free or self._held > self._places):
            self._release(self._idle.pop())

    def _stop(self, tripped: dict[str, Any] | None) -> None:
        if tripped:
            self._watch.tripped = CallError(**tripped)
        for scope in self._batches:
            scope.cancel()


class ClusterLedger:
    """The checkpoint as the row pipeline uses it (seams.Ledger), with intents committed a slice ahead.

    The intents of this worker's next rows (`expect`, in the order they will be sent) are
    committed a slice at a time, carried by a sync, before any of them is sent; a row about
    to be sent whose intent is not committed yet waits for its slice. Rows of a slice that
    end without being sent (answered by an identical request, left pending) are withdrawn.
    A kill may leave a slice's intents of rows never sent: the rerun counts them among the
    rows that may have been paid twice, with the rows that were in flight.
    """

    def __init__(self, link: CoordinatorLink, concurrency: int) -> None:
        self._link = link
        low, high = INTENT_SLICE
        self._least = max(low, min(high, concurrency))
        self._slice = self._least
        self._rate = 0.0  # the link's rate the slice was sized by
        self._grown = False  # since the latest sync
        self._upcoming: dict[int, None] = {}  # rows this worker will send, in order, intents not yet asked
        self._committing: dict[int, asyncio.Future[bool]] = {}
        self._committed: set[int] = set()  # intents committed, rows not begun
        self._refusing = False
        link.on_sync.append(self._synced)

    def expect(self, indexes: list[int]) -> None:
        self._upcoming.update(dict.fromkeys(indexes))
        self._ahead()

    async def begin(self, idx: int) -> None:
        """Returns once the row's intent is committed; after Ctrl-C, or once the job stopped, waits to be cancelled."""
        if idx not in self._committed:
            if not self._grown:  # none left: a row waits for a sync, so hold more (until the rate says how many)
                self._grown, self._slice = True, min(MOST_INTENTS, 2 * self._slice)
            committing = self._committing.get(idx)
            if committing is None:
                committing = self._commit([idx], now=True)
            else:
                self._link.commit([], now=True)  # it rides on the next sync: that sync is needed now
            if not await asyncio.shield(committing):
                await anyio.sleep_forever()
        if self._refusing:
            await anyio.sleep_forever()
        self._committed.discard(idx)
        self._link.count_sent()
        self._ahead()

    def _ahead(self) -> None:
        """The next slice rides on the next sync while this one is used, so a row about to be sent seldom waits."""
        if self._upcoming and len(self._committed) + len(self._committing) < self._slice:
            self._commit([], now=not self._committed)

    def _commit(self, first: list[int], now: bool) -> asyncio.Future[bool]:
        for idx in first:
            self._upcoming.pop(idx, None)
        indexes = first + list(itertools.islice(self._upcoming, self._slice - len(first)))
        for idx in indexes[len(first) :]:
            del self._upcoming[idx]
        committing = self._link.commit(indexes, now)
        for idx in indexes:
            self._committing[idx] = committing
        committing.add_done_callback(partial(self._committed_now, indexes))
        return committing

    def _committed_now(self, indexes: list[int], done: asyncio.Future[bool]) -> None:
        for idx in indexes:
            self._committing.pop(idx, None)
        if done.result():
            self._committed.update(indexes)

    def finish(self, record: RowRecord) -> None:
        self._upcoming.pop(record.idx, None)
        self._committed.discard(record.idx)
        self._link.tell("finish", self._link.values(record))

    def withdraw(self, idx: int) -> None:
        self._committed.discard(idx)
        self._link.tell("withdraw", idx)

    def give_back(self, indexes: list[int]) -> None:
        """A batch ended: its rows that were expected but not sent are no longer in flight."""
        for idx in indexes:
            self._upcoming.pop(idx, None)
            if idx in self._committed:
                self.withdraw(idx)

    def _synced(self, state: SyncState) -> None:
        link = self._link
        self._grown = False
        if link.rate != self._rate:  # measured anew
            self._rate = link.rate
            self._slice = max(self._least, min(MOST_INTENTS, math.ceil(link.rate * 2 * link.period)))
        if state.refusing and not self._refusing:
            self._refusing = True  # rows committed but not begun are not sent: no longer in flight
            for idx in list(self._committed):
                self.withdraw(idx)


class ClusterBudget:
    """The budget (seams.Spending), held by the coordinator; `stopped` once it refused a request of the job."""

    def __init__(self, link: CoordinatorLink) -> None:
        self._link = link
        self.stopped = False
        link.on_sync.append(self._synced)

    async def reserve(self, prompt_estimate: int, cap: int | None) -> float | None:
        held: float | None = await self._link.ask("reserve", prompt_estimate, cap)
        self.stopped = self.stopped or held is None
        return held

    def settle(
        self,
        held: float,
        prompt_estimate: int,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        images: int = 0,
        cached_tokens: int | None = None,
    ) -> None:
        # Told, not asked: until the coordinator hears it, the worst case stays held (never less safe).
        self._link.tell("settle", held, prompt_estimate, prompt_tokens, completion_tokens, images, cached_tokens)

    def _synced(self, state: SyncState) -> None:
        self.stopped = self.stopped or state.budget_stopped


class ClusterSharing:
    """Identical requests answered once across the whole job: claimed per batch, asked about only on collisions."""

    def __init__(self, link: CoordinatorLink) -> None:
        self._link = link
        self._local = SharedAnswers()  # this worker's rows of one key wait here for the one asking it
        self._verdicts: dict[int, bool | RowRecord] = {}  # row index -> what `Coordinator.claim` said

    async def claim(self, rows: list[tuple[int, str, bytes]]) -> list[int]:
        """Claims the keys of these rows (index, id, key) for this worker; returns the rows it may have to send."""
        verdicts = await self._link.ask("claim", self._link.worker, rows)
        self._verdicts.update((idx, verdict) for (idx, _, _), verdict in zip(rows, verdicts))
        return [idx for (idx, _, _), verdict in zip(rows, verdicts) if verdict is LEAD]

    async def find(self, key: bytes, idx: int, row_id: str) -> RowRecord | None:
        verdict = self._verdicts.pop(idx, FOLLOW)
        if isinstance(verdict, RowRecord):
            return verdict
        record = await self._local.find(key, idx, row_id)
        if record is not None:
            if verdict is LEAD:  # answered here after all: the claim ends with the answer
                self._end_leading(key, record)
            return record
        if verdict is FOLLOW:
            record = await self._link.ask("find_shared", key, idx, row_id, self._link.worker)
            if record is not None:
                return record
            # This row leads the key now; one of this worker's rows may have taken it meanwhile: wait for it.
            record = await self._local.find(key, idx, row_id)
            if record is not None:
                self._end_leading(key, record)
                return record
        return None  # no await since the local find: nobody here took the lead

    @contextmanager
    def leading(self, key: bytes) -> Iterator[Callable[[RowRecord], None]]:
        answers: list[RowRecord] = []
        with self._local.leading(key) as publish:
            try:
                yield answers.append
            finally:
                record = answers[0] if answers else None
                if record is not None:
                    publish(record)
                self._end_leading(key, record)

    def _end_leading(self, key: bytes, record: RowRecord | None) -> None:
        """Only a successful answer is shared across the job; it goes as values, like a finished row."""
        answer = self._link.values(record) if record is not None and record.status == "ok" else None
        self._link.tell("end_leading", key, answer, self._link.worker)


class ClusterWorker:
    """One worker process's part of the job: the row pipeline with the coordinator's stand-ins as its
    collaborators, and `concurrency` workers (RowPipeline.work, the local engine's worker loop).

    The rows of every batch it is given join one stream, served in order, so rows are sent in
    the order their intents were committed (ClusterLedger commits them a slice ahead, in that order).
    """

    def __init__(
        self,
        job: Job,
        columns: list[str],
        id_name: str,
        concurrency: int,
        calls: CoordinatorCalls,
        url: str,
        budgeted: bool,
    ) -> None:
        self._job = job
        self._columns = columns
        self._id_name = id_name
        self._concurrency = concurrency
        self._calls = calls
        self._url = url
        self._budgeted = budgeted
        self._pipeline: RowPipeline | None = None

    def start(self) -> RowPipeline:
        """The pipeline, made on first use, on the event loop the worker runs on (anyio's primitives need it).

        Raises JobError when this worker cannot do the job (e.g. the key's variable is not set here)."""
        if self._pipeline is not None:
            return self._pipeline
        job = self._job
        transport = open_transport(job, self._url, self._concurrency)
        self.link = CoordinatorLink(self._calls)
        watch = ClusterWatch(self.link)
        self._limits = ClusterLimits(self.link, watch)
        self._ledger = ClusterLedger(self.link, self._concurrency)
        self._sharing = ClusterSharing(self.link)
        parts = RowParts(self._ledger, self._limits, self._sharing, watch, transport)
        parser = AnswerParser.for_spec(job.spec, protocol_for(job.spec.provider.api))
        # Without a budget, nothing to ask the coordinator: a budget without a limit holds nothing.
        budget = ClusterBudget(self.link) if self._budgeted else Budget(None, job.spec.pricing, spent=0.0)
        pipeline = RowPipeline(job, Renderer(job, self._columns), parser, self._id_name, parts, budget)
        self._rows, receive = anyio.create_memory_object_stream[WorkItem](math.inf)
        # Kept: the event loop holds its tasks only weakly.
        self._workers = [asyncio.ensure_future(self._work(pipeline, receive)) for _ in range(self._concurrency)]
        self._pipeline = pipeline
        return pipeline

    async def send(self, rows: list[dict[str, Any]], report: ProgressSink) -> None:
        """Sends the rows of one batch not finished yet, each counted by `report`; returns once all ended,
        and what they did is with the coordinator."""
        pipeline = self.start()
        todo = set(await self._calls.ask("unfinished", [row[ROW_INDEX] for row in rows]))
        batch = RowBatch(report)
        items: list[WorkItem] = []
        for row in rows:
            if row[ROW_INDEX] in todo and (item := pipeline.item(row, report)) is not None:
                items.append(item)
        leads = await self._sharing.claim([(item.idx, item.row_id, item.key) for item in items])
        self._ledger.expect(leads)
        with self._limits.stoppable():
            for item in items:
                self._rows.send_nowait(batch.add(item))
            await batch.finished()
        self._ledger.give_back(leads)
        await self.link.settle()  # this worker's errors are with the coordinator: the job's state includes them
        pipeline.settle_held(report)
        await self.link.settle(news=False)  # the batch's rows are with the coordinator before the driver hears of them

    async def _work(self, pipeline: RowPipeline, receive: MemoryObjectReceiveStream[WorkItem]) -> None:
        """One worker: rows of any batch, in the order they came. When the job stops, every batch's
        rows not sent stay pending, and the worker goes on with the next rows."""
        while True:
            await pipeline.work(receive.clone(), _NOWHERE, self._limits.stop_batches)


class _Nowhere:
    """Progress for a row without a batch: a worker's rows all come with their batch's own."""

    def row_done(self, status: str, record: RowRecord | None) -> None:
        pass


_NOWHERE = _Nowhere()

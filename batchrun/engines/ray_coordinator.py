"""The Ray engine's cluster-wide state: one actor for the whole job, and its stand-ins on the workers.

What must hold for the whole job, not per worker, lives in one `Coordinator` actor on
the driver's node, built from the local engine's own parts. Workers talk to it per
slice of rows, not per row (a Ray call costs the coordinator 0.5–1 ms of CPU, which,
made per row, capped the job at ~600 rows/s however many nodes it had):

* the limiter (`limits.Limits`): a worker leases permits (in-flight places) for several
  attempts at once. While nothing paces starts (no requests or tokens per minute, no
  pause, no push-back pattern, the relay not looking down), a permit is only a place,
  and the worker keeps it from one attempt to the next; otherwise each attempt takes a
  fresh one, paced by the job's limiter. Outcomes reach the limiter in groups, so
  push-back, concurrency 429s and the breaker act on the whole job. Each worker keeps at
  most its share of the places (the job's limit split by how many rows each has to
  send) and gives back the rest, so a worker out of work leaves nothing unused.
* the checkpoint (`checkpoint.Checkpoint`, the same SQLite file a local run writes):
  a worker commits the intents of a slice of rows in one transaction, before the first
  of them is sent ("intent before spend"), and reports finished rows in groups, each
  committed when it arrives (within about `SYNC_S` of the answer). Rows of a slice that
  were not sent are withdrawn. Workers never open the file, so it needs no storage
  shared between nodes.
* the abort watch (a wrong key stops the job after a few 401s, not a few per worker).
* shared answers: a worker claims its batch's request keys in one call; a key another
  worker leads (or answered) is waited for, and only those rows make a call of their own.
* the budget (`spend.Budget`, `run.max_cost`): a worker asks it to hold each request's
  worst case before sending and tells it the real usage after, so the job's spent +
  held never passes the budget, by the same rule as a local run. Once it refuses a
  request, no row not yet sent is given to a worker; rows in flight finish. Asked
  only when the job has a budget: without one a worker's budget answers locally.

Leases end: every worker syncs with the coordinator every `SYNC_S`, and may send only
while its lease runs, which lasts `DRIVER_GRACE_S` past the driver's last sign of life.
A killed (or frozen) driver's workers therefore stop sending within `DRIVER_GRACE_S`,
even if Ray takes longer to end them. A worker that dies (Ray then restarts it and retries its
batch) cannot give back its permits or its claims: what a worker silent for `LEASE_S`
held is taken back.

On a worker, the row pipeline (pipeline/rows.py) talks to it through `ClusterLedger`,
`ClusterLimits`, `ClusterSharing`, `ClusterWatch` and `ClusterBudget`, which implement the
row path's declared collaborators (pipeline/seams.py: Ledger, Admission, Sharing, StopWatch, Spending), over one
`CoordinatorLink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import math
import operator
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import ray

from batchrun.base.stops import AbortWatch
from batchrun.flow.breaker import OutageBreaker
from batchrun.flow.limits import Limits, Ticket
from batchrun.flow.sharing import RECENT_ANSWERS, SharedAnswers
from batchrun.flow.spend import Budget
from batchrun.job.spec import RunSpec
from batchrun.ledger.checkpoint import Checkpoint, RowRecord
from batchrun.protocols import CallError
from batchrun.protocols.relay_errors import QuotaLeft

# Rows of every worker may wait on the coordinator at once (for a permit, an intent's
# commit, an identical request's answer); Ray queues calls beyond this, and a queued
# release behind waiting acquires would stall the job.
MAX_WAITING_CALLS = 1_000_000
SYNC_S = 0.2  # how often a worker sends what nobody waits for, and renews its lease
DRIVER_GRACE_S = 1.5  # workers may start requests this long after the driver's last sign of life
DRIVER_PING_S = 0.5
LEASE_S = 15.0  # a worker silent this long is taken for dead: its permits and claims are taken back
# Intents committed at once: the job's concurrency, within these bounds, or what the worker sent
# in its latest sync period if more (so a sync carries its next period's intents).
INTENT_SLICE = (8, 64)
MOST_INTENTS = 512

# What `Coordinator.claim` says about a row: it leads its request key (sends it), it
# follows another row's request (asks `find_shared` before sending), or a RowRecord:
# an identical request's answer, nothing to send.
LEAD = True
FOLLOW = False
# Calls a worker tells (no answer), many per row. Ray wraps every method of an actor class
# (for tracing, a few µs a call), so `sync` calls the plain functions underneath.
# A finished row crosses to the coordinator as its fields' values, in RowRecord's order: a
# tuple unpickles in a quarter of a RowRecord's time, and the coordinator handles one per row.
RowValues = tuple[Any, ...]
row_values: Callable[[RowRecord], RowValues] = operator.attrgetter(*RowRecord.__dataclass_fields__)
TOLD = ("succeeded", "failed", "give_back", "finish", "withdraw", "on_error", "on_success", "end_leading", "settle")


def error_fields(error: CallError) -> dict[str, Any]:
    """A CallError as plain fields: the exception itself does not survive pickling."""
    return asdict(error)


class _Permit:
    """One in-flight place, held by a task of the coordinator until the worker gives it back."""

    def __init__(self, owner: str) -> None:
        self.decided = anyio.Event()
        self.released = anyio.Event()
        self.ticket: Ticket | None = None  # what Limits.slot yielded; None until granted
        self.refused: CallError | None = None  # the limiter gave up instead (the relay stayed down)
        self.task: asyncio.Task[None] | None = None
        self.owner = owner


@dataclass
class SyncState:
    """What a worker learns at each sync: its lease, its share of the places, and whether to stop."""

    lease_s: float  # it may start requests for this long (0: the driver is gone)
    places: int  # permits it may hold
    free: bool  # a permit is only a place: keep it from one attempt to the next
    looks_down: bool
    tripped: dict[str, Any] | None
    stopped: bool  # the job stopped: nothing more is sent
    refusing: bool  # Ctrl-C: no row that has not begun may be sent
    budget_stopped: bool
    committed: bool  # the intents this sync carried are committed (False: those rows may not be sent)


@ray.remote(num_cpus=0, max_concurrency=MAX_WAITING_CALLS)
class Coordinator:
    """The job's state that must hold for every worker at once (see above); one per run, on the driver's node."""

    def __init__(self, folder: str, concurrency: int, run: RunSpec, budget: Budget) -> None:
        self._setup = (Path(folder), concurrency, run)
        self.budget = budget  # the driver's, with what earlier runs spent
        self._ids = itertools.count()
        self._permits: dict[int, _Permit] = {}
        self._held: dict[str, int] = {}  # worker -> permits it holds
        self._demand: dict[str, int] = {}  # worker -> permits it could use now (held + rows waiting)
        self._leading: dict[bytes, str] = {}  # request key -> the worker whose row is asking it
        # Answers of ended leads, newest last; given to `sharing` only when an identical request comes.
        self._answered: OrderedDict[bytes, RowValues] = OrderedDict()
        self._ends: dict[bytes, asyncio.Event] = {}  # keys rows of other workers wait for
        self._seen: dict[str, float] = {}  # worker -> when it last spoke
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusing = False
        self.requested = 0
        self.finished = 0
        self.problem: str | None = None  # a worker could not start: the job stops and the driver says why

    async def start(self) -> None:
        """anyio's primitives need the actor's event loop, so they are made here rather than in __init__."""
        folder, concurrency, run = self._setup
        self.checkpoint = Checkpoint(folder)  # the driver holds the run's lock
        self.limits = Limits(concurrency, run.requests_per_minute, run.tokens_per_minute, run.outage_timeout_s)
        self.watch: AbortWatch[CallError] = AbortWatch()
        self.sharing = SharedAnswers()
        self._driver_seen = time.monotonic()
        self._cpu_from: float | None = None  # when the first rows came: Ray's start-up is no row's cost
        self._told = {name: inspect.unwrap(getattr(type(self), name)) for name in TOLD}
        self._spawn(self.checkpoint.flush_loop())
        self._spawn(self._take_back_from_silent_workers())

    def _spawn(self, work: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def driver_alive(self) -> None:
        self._driver_seen = time.monotonic()

    async def sync(
        self, worker: str, demand: int, sent: int, calls: list[tuple[str, tuple[Any, ...]]], intents: list[int]
    ) -> SyncState:
        """A worker's calls that nobody waits for (see CoordinatorLink), and what it must know now.

        `demand`: the permits it could use now; `sent`: the requests it started since its last sync;
        `intents`: rows it may send next, committed before the answer.
        """
        self._seen[worker] = anyio.current_time()
        self._demand[worker] = demand
        self.requested += sent
        told = self._told
        for method, args in calls:
            told[method](self, *args)
        committed = True
        if intents:
            committed = await self._begin(intents)  # one commit: these intents and the rows finished so far
        elif any(method == "finish" for method, _ in calls):
            await self.checkpoint.flush()  # answers are committed within a sync of arriving, as locally
        return SyncState(
            lease_s=max(0.0, DRIVER_GRACE_S - (time.monotonic() - self._driver_seen)),
            places=self._share(worker),
            free=self._free(),
            looks_down=self.limits.breaker.looks_down,
            tripped=await self.tripped(),
            stopped=await self.stopped(),
            refusing=self._refusing,
            budget_stopped=self.budget.stopped,
            committed=committed,
        )

    async def _take_back_from_silent_workers(self) -> None:
        while True:
            await anyio.sleep(1.0)
            cutoff = anyio.current_time() - LEASE_S
            for worker in [w for w, seen in self._seen.items() if seen < cutoff]:
                del self._seen[worker]
                self._demand.pop(worker, None)
                for number, permit in list(self._permits.items()):
                    if permit.owner == worker:
                        self._drop(number)
                for key in [key for key, owner in self._leading.items() if owner == worker]:
                    self.end_leading(key, None, worker)

    # --- the limiter ----------------------------------------------------------------

    def _free(self) -> bool:
        """Nothing paces starts now: a permit is only an in-flight place, and may serve attempt after attempt."""
        limits = self.limits
        return (
            limits.requests is None
            and limits.tokens is None
            and not limits.pace.pacing
            and limits.paused_until <= anyio.current_time()
            and not limits.breaker.looks_down
        )

    def _share(self, worker: str) -> int:
        """The places this worker may hold: the job's limit, split by what each worker could use."""
        total = self.limits.limit
        wanted = sum(self._demand.values())
        if wanted <= total:
            return total
        return max(1, math.floor(total * self._demand.get(worker, 0) / wanted))

    async def lease(self, worker: str, tokens: int, retry: bool, want: int) -> dict[str, Any]:
        """Permits for up to `want` attempts estimated at `tokens` each: waits for one, adds those free now.

        {"permits": [numbers], "free": ..., "looks_down": ...}; {"refused": error} when the
        limiter gives up (the relay stayed down too long); {"stopped": error} once the job
        stopped; {"again": True} when the worker was taken for dead while it waited.
        """
        self._seen[worker] = anyio.current_time()
        if await self.stopped():
            return {"stopped": await self.tripped()}
        first = await self._grant(worker, tokens, retry)
        if isinstance(first, dict):
            return first
        numbers = [first]
        in_flight = self.limits.in_flight
        while (
            len(numbers) < want
            and not retry
            and self._free()
            and in_flight.used < in_flight.total
            and self._held.get(worker, 0) < self._share(worker)
        ):
            more = await self._grant(worker, tokens, retry)  # free and with room: granted without waiting
            if isinstance(more, dict):
                break
            numbers.append(more)
        return {"permits": numbers, "free": self._free(), "looks_down": self.limits.breaker.looks_down}

    async def _grant(self, worker: str, tokens: int, retry: bool) -> int | dict[str, Any]:
        number = next(self._ids)
        permit = self._permits[number] = _Permit(worker)
        permit.task = self._spawn(self._hold(permit, tokens, retry))
        await permit.decided.wait()
        if permit.ticket is not None and number in self._permits:
            return number
        self._drop(number)
        if permit.refused is not None:
            return {"refused": error_fields(permit.refused)}
        if await self.stopped():
            return {"stopped": await self.tripped()}
        return {"again": True}

    async def _hold(self, permit: _Permit, tokens: int, retry: bool) -> None:
        try:
            async with self.limits.slot(tokens, retry) as ticket:
                permit.ticket = ticket
                self._held[permit.owner] = self._held.get(permit.owner, 0) + 1
                permit.decided.set()
                await permit.released.wait()
        except CallError as e:
            permit.refused = e
            permit.decided.set()

    def _ticket(self, permit: _Permit, elapsed_s: float) -> Ticket | None:
        """The permit's ticket, dated to its latest attempt (a kept permit serves many)."""
        ticket = permit.ticket
        if ticket is not None:
            started = asyncio.get_running_loop().time() - elapsed_s  # anyio's clock, without its look-up
            if started > ticket.started_at:
                ticket.started_at, ticket.in_flight = started, self.limits.in_flight.used
        return ticket

    def succeeded(
        self, number: int, elapsed_s: float, actual_tokens: int | None, quota: QuotaLeft | None, keep: bool
    ) -> None:
        """An attempt was answered (`actual_tokens`: its usage); `keep`: the worker keeps the permit for its next."""
        permit = self._permits.get(number)
        if permit is None:  # taken back already: past learning from
            return
        ticket = self._ticket(permit, elapsed_s)
        if not keep:
            self._drop(number)
        if ticket is not None:
            self.limits.succeeded(ticket, actual_tokens, quota)

    def failed(self, number: int, elapsed_s: float, fields: dict[str, Any]) -> None:
        permit = self._permits.get(number)
        if permit is None:
            return
        ticket = self._ticket(permit, elapsed_s)
        self._drop(number)
        if ticket is not None:
            self.limits.failed(ticket, CallError(**fields))

    def give_back(self, number: int) -> None:
        """A permit the worker no longer needs (or an attempt that was cancelled): nothing is learnt from it."""
        self._drop(number)

    def _drop(self, number: int) -> _Permit | None:
        """A permit leaves: granted, its place is freed; waiting, it is given up."""
        permit = self._permits.pop(number, None)
        if permit is not None:
            permit.released.set()
            if permit.ticket is None and permit.task is not None:
                permit.task.cancel()
                permit.decided.set()
            elif permit.ticket is not None:
                self._held[permit.owner] -= 1
        return permit

    def _stop(self) -> None:
        """The run aborts: waiting permits are refused, so no new request goes out anywhere."""
        for number, permit in list(self._permits.items()):
            if permit.ticket is None:
                self._drop(number)

    # --- the checkpoint ---------------------------------------------------------------

    async def unfinished(self, indexes: list[int]) -> list[int]:
        """Which of these rows still need a request (none once the run stopped or the budget ran out)."""
        if not indexes or await self.stopped() or self.budget.stopped:
            return []
        await self.checkpoint.flush()  # rows finished moments ago count as finished
        done = self.checkpoint.finished_in_range(min(indexes), max(indexes) + 1)
        return [i for i in indexes if i not in done]

    async def _begin(self, indexes: list[int]) -> bool:
        """Durably record that these rows may be requested (one transaction); False: none may be any more."""
        if self._refusing or await self.stopped():
            return False
        return await self.checkpoint.commit_intents(indexes)

    def finish(self, values: RowValues) -> None:
        self.finished += 1
        self.checkpoint.finish(RowRecord(*values))

    def withdraw(self, idx: int) -> None:
        self.checkpoint.withdraw(idx)

    # --- the abort watch -------------------------------------------------------------

    def on_error(self, fields: dict[str, Any]) -> None:
        was_tripped = self.watch.tripped is not None
        self.watch.on_error(CallError(**fields))
        if self.watch.tripped is not None and not was_tripped:
            self._stop()

    def on_success(self) -> None:
        self.watch.on_success()

    async def tripped(self) -> dict[str, Any] | None:
        return error_fields(self.watch.tripped) if self.watch.tripped else None

    # --- shared answers --------------------------------------------------------------

    async def claim(self, worker: str, rows: list[tuple[int, str, bytes]]) -> list[bool | RowRecord]:
        """For each (row index, row id, request key) of a worker's batch: LEAD, FOLLOW or the shared answer."""
        self._seen[worker] = anyio.current_time()
        if self._cpu_from is None:
            self._cpu_from = time.process_time()
        verdicts: list[bool | RowRecord] = []
        for idx, row_id, key in rows:
            if key in self._leading:
                verdicts.append(FOLLOW)
                continue
            record = await self._shared(key, idx, row_id)
            if record is None:
                self._leading[key] = worker
            verdicts.append(LEAD if record is None else record)
        return verdicts

    async def find_shared(self, key: bytes, idx: int, row_id: str, worker: str) -> RowRecord | None:
        """An identical request's answer for this row, once its leader ends; None: this row leads the key now."""
        self._seen[worker] = anyio.current_time()
        while key in self._leading:
            await self._ends.setdefault(key, asyncio.Event()).wait()
        record = await self._shared(key, idx, row_id)
        if record is None:
            self._leading[key] = worker
        return record

    async def _shared(self, key: bytes, idx: int, row_id: str) -> RowRecord | None:
        """An ended lead's answer as this row's record (never waits: nothing is in flight in `sharing`)."""
        answered = self._answered.pop(key, None)
        if answered is not None:
            with self.sharing.leading(key) as publish:
                publish(RowRecord(*answered))
        return await self.sharing.find(key, idx, row_id)

    def end_leading(self, key: bytes, answer: RowValues | None, worker: str) -> None:
        """`answer`: the lead's row, if it was answered successfully (see ClusterSharing)."""
        if self._leading.get(key) != worker:  # taken back from a worker taken for dead
            return
        del self._leading[key]
        if answer is not None:
            self._answered[key] = answer
            if len(self._answered) > RECENT_ANSWERS:
                self._answered.popitem(last=False)
        ended = self._ends.pop(key, None)
        if ended is not None:
            ended.set()

    # --- the budget -------------------------------------------------------------------

    async def reserve(self, prompt_estimate: int, cap: int | None) -> float | None:
        return await self.budget.reserve(prompt_estimate, cap)

    def settle(
        self,
        held: float,
        prompt_estimate: int,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        images: int,
        cached_tokens: int | None = None,
    ) -> None:
        self.budget.settle(held, prompt_estimate, prompt_tokens, completion_tokens, images, cached_tokens)

    # --- the driver ------------------------------------------------------------------

    async def stopped(self) -> bool:
        """Tripped, a worker that cannot start, or a checkpoint that can no longer be written (disk full, read-only)."""
        return self.watch.tripped is not None or self.problem is not None or self.checkpoint.failure is not None

    async def cannot_start(self, problem: str) -> None:
        """A worker cannot do the job (e.g. the key's variable is not set on its node): nothing more is sent."""
        self.problem = self.problem or problem
        self._stop()

    async def refuse_new_rows(self) -> None:
        """Ctrl-C: no row that has not begun may be sent; rows in flight may finish."""
        self._refusing = True
        self.checkpoint.refuse_new_rows()

    async def awaiting_answer(self) -> int:
        return len(self.checkpoint.awaiting_answer)

    async def close(self) -> dict[str, Any]:
        """Commits what is left and closes the checkpoint; returns what the driver reports."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.checkpoint.flush()
        self.checkpoint.close()
        return {
            "requested": self.requested,
            "awaiting_answer": sorted(self.checkpoint.awaiting_answer),
            "tripped": await self.tripped(),
            "problem": self.problem,
            "failure": self.checkpoint.failure,
            "budget": (self.budget.spent, self.budget.refused),
            "cpu_s": time.process_time() - (self._cpu_from or time.process_time()),  # all the process's threads
            "finished": self.finished,
        }


# --- stand-ins on the workers ------------------------------------------------------------


class CoordinatorLink:
    """A worker's line to the coordinator, and its lease.

    Calls nobody waits for are sent in groups, one `sync` every `SYNC_S`, whose answer
    renews the lease and says whether the job stopped. Ray does not run an async actor's
    calls in the order they were sent, so syncs go one at a time, and a batch ends with
    `settle`: its finished rows are with the coordinator before the driver hears of them.
    """

    def __init__(self, coordinator: Any) -> None:
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
        self._last_row: tuple[RowRecord | None, RowValues] = (None, ())  # see `values`
        self._intents: list[int] = []  # rows whose intents the next sync carries
        self._committing: asyncio.Future[bool] | None = None  # that sync's answer about them
        self.state: SyncState | None = None
        self.demand: Callable[[], int] = lambda: 0
        self.on_sync: list[Callable[[SyncState], None]] = []
        self._syncer = asyncio.ensure_future(self._sync_every(SYNC_S))

    def tell(self, method: str, *args: Any) -> None:
        self._outbox.append((method, args))

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

    def commit(self, indexes: list[int], now: bool) -> asyncio.Future[bool]:
        """These rows' intents go with the next sync (`now`: at once); True: committed, False: not to be sent."""
        self._intents += indexes
        if self._committing is None:
            self._committing = asyncio.get_running_loop().create_future()
        if now:
            self._wake.set()
        return self._committing

    async def ask(self, method: str, *args: Any) -> Any:
        return await getattr(self._coordinator, method).remote(*args)

    async def leased(self) -> None:
        """Returns while this worker may start requests: never once the driver is gone."""
        while time.monotonic() >= self._lease_until:
            self._renewed.clear()
            await self._renewed.wait()

    async def settle(self) -> None:
        """Everything told so far is with the coordinator, and this worker knows the job's state after it."""
        carrying = self._started + 1  # the next sync takes the outbox as it is now
        self._wake.set()
        while self._done < carrying:
            self._synced.clear()
            await self._synced.wait()

    async def _sync_every(self, seconds: float) -> None:
        while True:
            calls, self._outbox = self._outbox, []
            sent, self._sent = self._sent, 0
            intents, self._intents = self._intents, []
            committing, self._committing = self._committing, None
            self._started += 1
            asked_at = time.monotonic()
            try:
                state: SyncState = await self._coordinator.sync.remote(self.worker, self.demand(), sent, calls, intents)
            except ray.exceptions.RayError:  # the coordinator is gone (the driver was killed): no more leases
                if committing is not None:
                    committing.set_result(False)
                await asyncio.sleep(seconds)
                continue
            if committing is not None:
                committing.set_result(state.committed)
            self.state = state
            self._lease_until = asked_at + state.lease_s
            for listener in self.on_sync:
                listener(state)
            self._done += 1
            self._renewed.set()
            self._synced.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), seconds)
            self._wake.clear()


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

    def succeeded(self, use: _Use, actual_tokens: int | None, quota: QuotaLeft | None = None) -> None:
        use.answered = True
        keep = self._free and self._held <= self._places
        self._link.tell("succeeded", use.number, time.monotonic() - use.started, actual_tokens, quota, keep)
        if keep:
            self._hand_over(use.number)
        else:
            self._held -= 1

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
        self._begun = 0  # rows begun since the latest sync
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
        self._begun += 1
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
        self._slice = max(self._least, min(MOST_INTENTS, self._begun))
        self._begun = 0
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

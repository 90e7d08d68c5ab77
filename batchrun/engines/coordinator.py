"""The job-wide coordinator of a run whose rows are sent from many processes: what must hold for
the whole job, not per worker, in one object, built from the local engine's own parts.

It knows nothing of Ray: engines/ray_coordinator.py makes it a Ray actor, and workers reach it
through engines/coordinator_link.py. Workers talk to it per slice of rows, not per row (a Ray
call costs the coordinator 0.5–1 ms of CPU, which, made per row, capped the job at ~600 rows/s
however many nodes it had):

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
  committed when it arrives (within a sync period of the answer). Rows of a slice that
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

Leases end: every worker syncs with the coordinator every `SYNC_S` (up to `LONGEST_SYNC_S` at high
rates), and may send only
while its lease runs, which lasts `DRIVER_GRACE_S` past the driver's last sign of life.
A killed (or frozen) driver's workers therefore stop sending within `DRIVER_GRACE_S`,
even if the cluster takes longer to end them. A worker that dies (Ray then restarts it and retries its
batch) cannot give back its permits or its claims: what a worker silent for `LEASE_S`
held is taken back.

`close` returns what the driver's engine reports back to the run (engines/contract.py: `Sent`).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import operator
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

from batchrun.base.errors import JobError
from batchrun.base.stops import AbortWatch
from batchrun.engines.contract import Sent
from batchrun.flow.limits import Limits, Ticket
from batchrun.flow.sharing import RECENT_ANSWERS, SharedAnswers
from batchrun.flow.spend import Budget
from batchrun.job.spec import RunSpec
from batchrun.ledger.checkpoint import Checkpoint, RowRecord
from batchrun.protocols import CallError
from batchrun.protocols.relay_errors import QuotaLeft

SYNC_S = 0.2  # how often a worker sends what nobody waits for, and renews its lease
# Fewer, larger syncs at high rates (each costs the coordinator about 0.5 ms of CPU, whatever it carries):
# from SYNC_RATE rows a second a worker starts, its syncs space out, up to LONGEST_SYNC_S apart.
SYNC_RATE = 500.0
LONGEST_SYNC_S = 0.3  # longer saves little (0.2 to 0.5 s: 1-2 µs a row) and moves places slower
DRIVER_GRACE_S = 1.5  # workers may start requests this long after the driver's last sign of life
DRIVER_PING_S = 0.5
LEASE_S = 15.0  # a worker silent this long is taken for dead: its permits and claims are taken back
# Intents committed at once: the job's concurrency, within these bounds, or what the worker starts
# in two sync periods if more (so the next periodic sync carries the next slice before this one runs out).
INTENT_SLICE = (8, 64)
MOST_INTENTS = 512
CPU_LOG_MARKS = 2_000

# What `Coordinator.claim` says about a row: it leads its request key (sends it), it
# follows another row's request (asks `find_shared` before sending), or a RowRecord:
# an identical request's answer, nothing to send.
LEAD = True
FOLLOW = False
# Calls a worker tells (no answer), many per row, carried by its next `sync`.
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
        # (rows finished, the process's CPU seconds) from the first rows on, at each sync: what a row costs
        # the coordinator, over the whole run or after start-up (`batchrun bench`). Ray's start-up is no row's cost.
        self.cpu_log: list[tuple[int, float]] = []
        # A Ray actor's methods are wrapped (for tracing, a few µs a call): `sync` calls the plain functions.
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
        if self.cpu_log:
            self._log_cpu()
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

    def _log_cpu(self) -> None:
        log = self.cpu_log
        log.append((self.finished, time.process_time()))
        if len(log) > CPU_LOG_MARKS:  # every other mark goes: a long run's log stays small, as evenly spread
            del log[1:-1:2]

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
        if not self.cpu_log:
            self.cpu_log.append((0, time.process_time()))
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
            "cpu_log": [*self.cpu_log, (self.finished, time.process_time())],  # all the process's threads
            "finished": self.finished,
        }


def sent_back(final: dict[str, Any], interrupts: int) -> Sent:
    """What the engine reports back to the run (engines/contract.py), from the coordinator's `close`.

    The coordinator's checkpoint and budget are not the run's: what the run needs of them comes back here.
    Raises JobError when a worker could not start (e.g. the key's variable is not set on its node)."""
    if final["problem"] is not None:
        raise JobError(final["problem"])
    tripped = CallError(**final["tripped"]) if final["tripped"] is not None else None
    spent, refused = final["budget"]
    in_flight = len(final["awaiting_answer"])
    return Sent(final["requested"], interrupts, tripped, in_flight, final["failure"], spent, refused)

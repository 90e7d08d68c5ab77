"""The Ray engine's cluster-wide state: one actor for the whole job, and its stand-ins on the workers.

What must hold for the whole job, not per worker, lives in one `Coordinator` actor on
the driver's node, built from the local engine's own parts:

* the limiter (`limits.Limits`): every attempt on any worker waits for a permit from it,
  so concurrency, requests and tokens per minute, push-back and server pauses are the
  job's. One limiter rather than an exact split of the limits across actors: a split
  would leave the share of an actor that ran out of work unused, breaks when the pool
  autoscales, and cannot pause or halve the whole job when the relay pushes back. A
  permit costs a Ray call (well under a millisecond), far below a request's latency.
* the checkpoint (`checkpoint.Checkpoint`, the same SQLite file a local run writes):
  intents are committed before each request, finished rows at least every 0.2 s, so
  a killed driver or worker loses at most the rows in flight. Workers never open the
  file, so it needs no storage shared between nodes.
* the abort watch (a wrong key stops the job after a few 401s, not a few per worker)
  and the shared answers of identical requests.
* the budget (`spend.Budget`, `run.max_cost`): a worker asks it to hold each request's
  worst case before sending and tells it the real usage after, so the job's spent +
  held never passes the budget, by the same rule as a local run. Once it refuses a
  request, no row not yet sent is given to a worker; rows in flight finish. Asked
  only when the job has a budget: without one a worker's budget answers locally.

A worker that dies (Ray then restarts it and retries its batch) cannot give back its
permits or its lead on an identical request: each worker says it is alive at least every
`HEARTBEAT_S`, and what a worker silent for `LEASE_S` held is taken back.

On a worker, the row pipeline (rows.py) talks to it through `ClusterLedger`,
`ClusterLimits`, `ClusterSharing`, `ClusterWatch` and `ClusterBudget`, which implement the
row path's declared collaborators (seams.py: Ledger, Admission, Sharing, StopWatch, Spending), over one
`CoordinatorLink`.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import ray

from batchrun.breaker import OutageBreaker
from batchrun.checkpoint import Checkpoint, RowRecord
from batchrun.limits import Limits, Ticket
from batchrun.protocols import CallError
from batchrun.protocols.relay_errors import QuotaLeft
from batchrun.sharing import SharedAnswers
from batchrun.spec import RunSpec
from batchrun.spend import Budget
from batchrun.stops import AbortWatch

# Rows of every worker may wait on the coordinator at once (for a permit, an intent's
# commit, an identical request's answer); Ray queues calls beyond this, and a queued
# release behind waiting acquires would stall the job.
MAX_WAITING_CALLS = 1_000_000
TELL_EVERY_S = 0.02  # how long a worker keeps the calls nobody waits for before sending them together
HEARTBEAT_S = 1.0
LEASE_S = 15.0


def error_fields(error: CallError) -> dict[str, Any]:
    """A CallError as plain fields: the exception itself does not survive pickling."""
    return asdict(error)


class _Permit:
    """One attempt's place in the limiter, held by a task of the coordinator until the attempt ends."""

    def __init__(self) -> None:
        self.decided = anyio.Event()
        self.released = anyio.Event()
        self.ticket: Ticket | None = None  # what Limits.slot yielded; None until granted
        self.refused: CallError | None = None  # the limiter gave up instead (the relay stayed down)
        self.task: asyncio.Task[None] | None = None
        self.owner = ""


@ray.remote(num_cpus=0, max_concurrency=MAX_WAITING_CALLS)
class Coordinator:
    """The job's state that must hold for every worker at once (see above); one per run, on the driver's node."""

    def __init__(self, folder: str, concurrency: int, run: RunSpec, budget: Budget) -> None:
        self._setup = (Path(folder), concurrency, run)
        self.budget = budget  # the driver's, with what earlier runs spent
        self._ids = itertools.count()
        self._permits: dict[int, _Permit] = {}
        self._leading: dict[bytes, tuple[Any, Callable[[RowRecord], None], str]] = {}
        self._seen: dict[str, float] = {}  # worker -> when it last spoke
        self._tasks: set[asyncio.Task[None]] = set()
        self.requested = 0
        self.problem: str | None = None  # a worker could not start: the job stops and the driver says why

    async def start(self) -> None:
        """anyio's primitives need the actor's event loop, so they are made here rather than in __init__."""
        folder, concurrency, run = self._setup
        self.checkpoint = Checkpoint(folder)  # the driver holds the run's lock
        self.limits = Limits(concurrency, run.requests_per_minute, run.tokens_per_minute, run.outage_timeout_s)
        self.watch: AbortWatch[CallError] = AbortWatch()
        self.sharing = SharedAnswers()
        self._spawn(self.checkpoint.flush_loop())
        self._spawn(self._take_back_from_silent_workers())

    def _spawn(self, work: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def told(self, worker: str, calls: list[tuple[str, tuple[Any, ...]]]) -> None:
        """A worker's batch of calls that nobody waits for (see CoordinatorLink); empty, it says the worker lives."""
        self._seen[worker] = anyio.current_time()
        for method, args in calls:
            await getattr(self, method)(*args)

    async def _take_back_from_silent_workers(self) -> None:
        while True:
            await anyio.sleep(HEARTBEAT_S)
            cutoff = anyio.current_time() - LEASE_S
            for worker in [w for w, seen in self._seen.items() if seen < cutoff]:
                del self._seen[worker]
                for number, permit in list(self._permits.items()):
                    if permit.owner == worker:
                        self._drop(number)
                for key, (_, _, owner) in list(self._leading.items()):
                    if owner == worker:
                        await self.end_leading(key, None)

    def _drop(self, number: int) -> _Permit | None:
        """A permit leaves: granted, its place is freed; waiting, it is given up."""
        permit = self._permits.pop(number, None)
        if permit is not None:
            permit.released.set()
            if permit.ticket is None and permit.task is not None:
                permit.task.cancel()
                permit.decided.set()
        return permit

    # --- the limiter ----------------------------------------------------------------

    async def acquire(self, tokens: int, worker: str, retry: bool = False) -> dict[str, Any]:
        """A place for one attempt estimated at `tokens` (`retry`: within the retry budget too).

        {"permit": number, "looks_down": ...}; {"refused": error} when the limiter gives up
        (the relay stayed down too long); {"stopped": error} once the job stopped; {"again":
        True} when the worker was taken for dead while it waited.
        """
        self._seen[worker] = anyio.current_time()
        if await self.stopped():
            return {"stopped": await self.tripped()}
        number = next(self._ids)
        permit = self._permits[number] = _Permit()
        permit.owner = worker
        permit.task = self._spawn(self._hold(permit, tokens, retry))
        await permit.decided.wait()
        if permit.ticket is not None and number in self._permits:
            return {"permit": number, "looks_down": self.limits.breaker.looks_down}
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
                permit.decided.set()
                await permit.released.wait()
        except CallError as e:
            permit.refused = e
            permit.decided.set()

    async def succeeded(self, number: int, actual_tokens: int | None, quota: QuotaLeft | None = None) -> None:
        """The attempt was answered (`actual_tokens`: its usage). A permit taken back already is past learning from."""
        permit = self._drop(number)
        if permit is not None and permit.ticket is not None:
            self.limits.succeeded(permit.ticket, actual_tokens, quota)

    async def failed(self, number: int, fields: dict[str, Any]) -> None:
        permit = self._drop(number)
        if permit is not None and permit.ticket is not None:
            self.limits.failed(permit.ticket, CallError(**fields))

    async def abandoned(self, number: int) -> None:
        """The attempt was cancelled: its place is free, and nothing is learnt from it."""
        self._drop(number)

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

    async def begin(self, idx: int) -> None:
        await self.checkpoint.begin(idx)
        self.requested += 1

    async def finish(self, record: RowRecord) -> None:
        self.checkpoint.finish(record)

    async def withdraw(self, idx: int) -> None:
        self.checkpoint.withdraw(idx)

    # --- the abort watch -------------------------------------------------------------

    async def on_error(self, fields: dict[str, Any]) -> None:
        was_tripped = self.watch.tripped is not None
        self.watch.on_error(CallError(**fields))
        if self.watch.tripped is not None and not was_tripped:
            self._stop()

    async def on_success(self) -> None:
        self.watch.on_success()

    async def tripped(self) -> dict[str, Any] | None:
        return error_fields(self.watch.tripped) if self.watch.tripped else None

    # --- shared answers --------------------------------------------------------------

    async def find_shared(self, key: bytes, idx: int, row_id: str, worker: str) -> RowRecord | None:
        """An identical request's answer for this row; None: this row asks, and leads its key until `end_leading`."""
        self._seen[worker] = anyio.current_time()
        record = await self.sharing.find(key, idx, row_id)
        if record is None and worker in self._seen:  # no await since find: nobody else took the lead
            leading = self.sharing.leading(key)
            self._leading[key] = (leading, leading.__enter__(), worker)
        return record

    async def end_leading(self, key: bytes, record: RowRecord | None) -> None:
        found = self._leading.pop(key, None)
        if found is None:  # taken back from a worker taken for dead
            return
        leading, publish, _ = found
        if record is not None:
            publish(record)
        leading.__exit__(None, None, None)

    # --- the budget -------------------------------------------------------------------

    async def reserve(self, prompt_estimate: int, cap: int | None) -> float | None:
        return await self.budget.reserve(prompt_estimate, cap)

    async def settle(
        self, held: float, prompt_estimate: int, prompt_tokens: int | None, completion_tokens: int | None, images: int
    ) -> None:
        self.budget.settle(held, prompt_estimate, prompt_tokens, completion_tokens, images)

    # --- the driver ------------------------------------------------------------------

    async def stopped(self) -> bool:
        return self.watch.tripped is not None or self.problem is not None

    async def cannot_start(self, problem: str) -> None:
        """A worker cannot do the job (e.g. the key's variable is not set on its node): nothing more is sent."""
        self.problem = self.problem or problem
        self._stop()

    async def refuse_new_rows(self) -> None:
        """Ctrl-C: no row that has not begun may be sent; rows in flight may finish."""
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
            "budget": (self.budget.spent, self.budget.refused),
        }


# --- stand-ins on the workers ------------------------------------------------------------


class CoordinatorLink:
    """A worker's line to the coordinator.

    Calls nobody waits for are told in batches (one Ray call per `TELL_EVERY_S`, or with
    the next question), which keeps the coordinator's work per row small. Ray does not
    run an async actor's calls in the order they were sent, so a batch ends with `settle`:
    its finished rows are with the coordinator before the driver hears of them, and news
    of an abort is read only after this worker's own errors arrived.
    """

    def __init__(self, coordinator: Any) -> None:
        """On the worker's event loop: the link says the worker is alive for as long as the loop runs."""
        self._coordinator = coordinator
        self.worker = uuid.uuid4().hex  # this worker, as the coordinator knows it (a restarted one is another)
        self._outbox: list[tuple[str, tuple[Any, ...]]] = []
        self._told: list[Any] = []  # Ray's references to the batches of told calls, until settled
        self._teller = asyncio.ensure_future(self._tell_every(TELL_EVERY_S))

    def tell(self, method: str, *args: Any) -> None:
        self._outbox.append((method, args))

    async def ask(self, method: str, *args: Any) -> Any:
        self._send_outbox()
        return await getattr(self._coordinator, method).remote(*args)

    async def settle(self) -> None:
        self._send_outbox()
        told, self._told = self._told, []
        await asyncio.gather(*told)

    def _send_outbox(self) -> None:
        if self._outbox:
            self._told.append(self._coordinator.told.remote(self.worker, self._outbox))
            self._outbox = []

    async def _tell_every(self, seconds: float) -> None:
        quiet = 0.0
        while True:
            await asyncio.sleep(seconds)
            quiet = 0.0 if self._outbox else quiet + seconds
            if quiet >= HEARTBEAT_S:
                self._coordinator.told.remote(self.worker, [])
                quiet = 0.0
            self._send_outbox()


class ClusterWatch:
    """The abort watch (seams.StopWatch), kept by the coordinator; `tripped` is this worker's latest news of it."""

    def __init__(self, link: CoordinatorLink) -> None:
        self._link = link
        self.tripped: CallError | None = None

    def on_error(self, error: CallError) -> None:
        self._link.tell("on_error", error_fields(error))

    def on_success(self) -> None:
        self._link.tell("on_success")

    async def refresh(self) -> None:
        await self._link.settle()
        fields = await self._link.ask("tripped")
        self.tripped = CallError(**fields) if fields else None


class ClusterLimits:
    """The limiter (seams.Admission), answered by the coordinator's; a refused permit stops this worker's batches."""

    def __init__(self, link: CoordinatorLink, watch: ClusterWatch) -> None:
        self._link = link
        self._watch = watch
        self._batches: set[anyio.CancelScope] = set()
        self._looks_down = False  # the relay, as of the latest permit

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
    async def slot(self, tokens: int, retry: bool = False) -> AsyncIterator[int]:
        """A permit's number; its attempt ends with `succeeded` (inside) or `failed` (just after)."""
        answer: dict[str, Any] = {"again": True}
        while "again" in answer:
            answer = await self._link.ask("acquire", tokens, self._link.worker, retry)
        if "refused" in answer:
            raise CallError(**answer["refused"])
        if "stopped" in answer:  # the job stopped: this row stays pending, nothing is sent
            if answer["stopped"]:
                self._watch.tripped = CallError(**answer["stopped"])
            for scope in self._batches:
                scope.cancel()
            await anyio.sleep_forever()
        self._looks_down = answer["looks_down"]
        try:
            yield answer["permit"]
        except BaseException:  # cancelled mid-attempt: no outcome follows
            self._link.tell("abandoned", answer["permit"])
            raise

    def succeeded(self, permit: int, actual_tokens: int | None, quota: QuotaLeft | None = None) -> None:
        self._link.tell("succeeded", permit, actual_tokens, quota)

    def failed(self, permit: int, error: CallError) -> None:
        self._link.tell("failed", permit, error_fields(error))

    def excuses(self, error: CallError) -> bool:
        return self._looks_down and OutageBreaker.counts_as_down(error)


class ClusterLedger:
    """The checkpoint as the row pipeline uses it (seams.Ledger): intents, finished rows, withdrawn rows."""

    def __init__(self, link: CoordinatorLink) -> None:
        self._link = link

    async def begin(self, idx: int) -> None:
        await self._link.ask("begin", idx)

    def finish(self, record: RowRecord) -> None:
        self._link.tell("finish", record)

    def withdraw(self, idx: int) -> None:
        self._link.tell("withdraw", idx)


class ClusterBudget:
    """The budget (seams.Spending), held by the coordinator; `stopped` once it refused one of this worker's requests."""

    def __init__(self, link: CoordinatorLink) -> None:
        self._link = link
        self.stopped = False

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
    ) -> None:
        # Told, not asked: until the coordinator hears it, the worst case stays held (never less safe).
        self._link.tell("settle", held, prompt_estimate, prompt_tokens, completion_tokens, images)


class ClusterSharing:
    """Identical requests answered once across the whole job, not once per worker."""

    def __init__(self, link: CoordinatorLink) -> None:
        self._link = link

    async def find(self, key: bytes, idx: int, row_id: str) -> RowRecord | None:
        return await self._link.ask("find_shared", key, idx, row_id, self._link.worker)

    @contextmanager
    def leading(self, key: bytes) -> Iterator[Callable[[RowRecord], None]]:
        answers: list[RowRecord] = []
        try:
            yield answers.append
        finally:
            self._link.tell("end_leading", key, answers[0] if answers else None)

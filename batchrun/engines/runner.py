"""The run: open the checkpoint, send the rows with an engine, write the output from the checkpoint.

`Run` is what every engine shares: the input, the templates and the answer
parser, the checkpoint opened for resume, the budget, the progress bar, and at
the end the Parquet output, the summary, or the one-line reason the run stopped.
How the rows are sent is the `Engine`'s (engines/contract.py: what it is given and
what it reports back): `LocalEngine` here, `RayEngine` in engines/ray_engine.py; both
send each row through the same rows.RowPipeline, with the same worker loop.

The local engine: one producer renders rows into work items and feeds a bounded
stream, so memory stays flat however large the input; `concurrency` workers take
from it, each row going through the pipeline, and every finished row goes to the
checkpoint.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batchrun.base import storage
from batchrun.base.errors import BudgetReached, RunAborted, RunInterrupted
from batchrun.base.naming import Naming, flag
from batchrun.base.stops import AbortWatch, StopRule
from batchrun.engines.contract import Engine, OpenRun, Sent
from batchrun.engines.resume import ResumeFlags, open_for_run
from batchrun.flow import spend
from batchrun.flow.keys import limits_for
from batchrun.flow.learned import META_KEY as LEARNED_META
from batchrun.flow.learned import KeptLimits
from batchrun.flow.limits import Limits
from batchrun.flow.sharing import SharedAnswers
from batchrun.job.inputs import ROW_INDEX, InputTable
from batchrun.job.render import Renderer
from batchrun.job.spec import Job
from batchrun.job.structured import AnswerParser
from batchrun.ledger.checkpoint import DB_NAME, Checkpoint, checkpoint_folder
from batchrun.pipeline.cache_order import AnsweredLedger, CacheOrder, Sending
from batchrun.pipeline.progress import Progress
from batchrun.pipeline.rows import RowParts, RowPipeline, WorkItem, open_transport
from batchrun.pipeline.timeline import LimiterTimeline, note_run
from batchrun.pipeline.transport import CANNOT_CONNECT
from batchrun.protocols import CallError, protocol_for
from batchrun.results import output

GRACE_S = 3.0  # after Ctrl-C, how long rows in flight may take to finish before they are cancelled
PAUSE_SAID_S = 5.0  # a server's pause longer than this is said, not just waited out
WAITS_EVERY_S = 0.5  # how often the run looks at what it is waiting for
# Objects allocated, less those freed, between two collections of the youngest generation while a run
# goes on (Python's default is 700). Rows in flight keep thousands of objects alive for a moment; at
# 700 they were scanned and promoted again and again: 12-20 % of the run's CPU on `batchrun bench`.
GC_YOUNG_THRESHOLD = 50_000


@dataclass
class RunOptions:
    """How this run goes, beside the job (settings of the job file given for one run are laid over it:
    app/commands.settle)."""

    limit: int | None = None
    restart: bool = False
    retry_failed: bool = False
    rerun_changed: bool = False
    quiet: bool = False
    adopt_checkpoint: Path | None = None  # --adopt-checkpoint: an earlier checkpoint of this job, moved here
    durable_checkpoint: bool = True  # False only in `batchrun bench`, to measure the checkpoint's cost
    named: Naming = flag  # how messages name these settings: flags (the CLI) or keyword arguments (Python)
    presses: CtrlC | None = None  # Ctrl-C handed over by another thread; None: this thread's SIGINT


class CtrlC:
    """Ctrl-C presses handed to a run from another thread (a run in a worker thread gets no signal,
    and a run inside someone else's event loop must not take its SIGINT handler)."""

    def __init__(self) -> None:
        self.pressed = 0
        self._seen = 0

    def press(self) -> None:
        self.pressed += 1

    async def wait(self) -> None:
        while self._seen >= self.pressed:
            await anyio.sleep(0.05)
        self._seen += 1


class Run:
    def __init__(self, job: Job, options: RunOptions, engine: Engine | None = None) -> None:
        self.job = job
        self.options = options
        self.engine: Engine = engine or LocalEngine(options.presses)
        spec = job.spec
        self.concurrency = spec.run.concurrency
        self.limit = options.limit
        self.table = InputTable.for_job(job)
        self.renderer = Renderer(job, self.table.columns)
        self.parser = AnswerParser.for_spec(spec, protocol_for(spec.provider.api))
        output.check_columns(job, self.parser, self.table.columns)
        output.check_targets(job)
        job.api_keys()  # a key that cannot be sent stops the run before the checkpoint is opened
        self.budget = spend.Budget(spec.run.max_cost, spec.pricing, spent=0.0)

    def pipeline(self, parts: RowParts) -> RowPipeline:
        """The row pipeline of this job, working with `parts`."""
        return RowPipeline(self.job, self.renderer, self.parser, self.table.id_name, parts, self.budget)

    async def execute(self) -> dict[str, Any]:
        with _fewer_collections():
            return await self._execute()

    async def _execute(self) -> dict[str, Any]:
        started = time.monotonic()
        self.table.check_ids()
        if self.job.output_url is not None:
            fresh = not (checkpoint_folder(self.job.output_path) / DB_NAME).exists()
            storage.check_output(self.job.output_url, self.job.spec.output.storage_options, fresh)
        options = self.options
        flags = ResumeFlags(
            options.restart, options.rerun_changed, options.retry_failed, options.adopt_checkpoint, options.named
        )
        checkpoint, notes = open_for_run(self.job, self.table, self.renderer, flags, options.durable_checkpoint)
        try:
            if self.job.openai_batch_path is not None:  # before anything is paid for, not after
                output.check_openai_batch_target(self.job, checkpoint)
            note_run(checkpoint, "running", time.time())
            for note in notes:
                print(f"batchrun: {note}", file=sys.stderr)
            interrupted = checkpoint.count_interrupted()
            if self.options.retry_failed:
                checkpoint.forget_errors()
                if self.parser is not None:  # answers that failed the schema are errors too
                    for failed in output.failed_answers(checkpoint, self.parser, self.table.count()):
                        checkpoint.forget(failed)
            done = checkpoint.totals()
            if self.job.spec.pricing is not None:
                self.budget.spent = spend.cost(
                    self.job.spec.pricing,
                    done["prompt_tokens"],
                    done["completion_tokens"],
                    done["images"],
                    done["cached_tokens"],
                )
            total = self.table.count() if self.options.limit is None else min(self.options.limit, self.table.count())
            progress = Progress(
                total=total - checkpoint.count_finished(0, total),
                quiet=self.options.quiet,
                pricing=self.job.spec.pricing,
                max_cost=self.budget.limit,
                spent=self.budget.spent,
                tokens=(done["prompt_tokens"] or 0) + (done["completion_tokens"] or 0),
            )
            try:  # the bar's ticker thread stops however the run ends
                with _base_url(self.job) as base_url:
                    sent = await self.engine.send_all(self, checkpoint, progress, base_url)
            finally:
                progress.close()
            sent.settle_budget(self.budget)
            if sent.failure is not None:  # nothing more can be written, the run's note included
                resume = f"run `batchrun run {self.job.path}` again to resume"
                raise RunAborted(f"run stopped: {sent.failure}; {resume}")
            note_run(checkpoint, self._exit_state(sent), time.time(), time.monotonic() - started)
            if sent.interrupts:
                when = f"after {GRACE_S:g} s" if sent.interrupts == 1 else "at the second Ctrl-C"
                raise RunInterrupted(checkpoint.count_finished(0, total), total, sent.in_flight, when)
            if sent.tripped is not None:
                raise RunAborted(_abort_message(sent.tripped, self.job))
            if self.budget.stopped:
                pending = total - checkpoint.count_finished(0, total)
                raise BudgetReached(self.budget.stop_message(self.job, pending, options.named("max_cost")))
            totals = checkpoint.totals()
            written = output.write_parquet(self.table, checkpoint, self.job, self.options.limit, self.parser)
            if self.job.openai_batch_path is not None:
                output.write_openai_batch(self.table, checkpoint, self.job, self.options.limit)
            summary = self._summary(totals, written, total, interrupted, sent.requested, time.monotonic() - started)
            summary.update(output.watch_summary(progress.watched, checkpoint))
            output.write_summary(self.job.output_path, summary)
            return summary
        finally:
            checkpoint.close()

    def _exit_state(self, sent: Sent) -> str:
        """How the run ended, in the words `batchrun report` shows."""
        if sent.interrupts:
            return "interrupted"
        if sent.tripped is not None:
            return "stopped by the server"
        if self.budget.stopped:
            return "stopped at the budget"
        return "finished"

    def _summary(
        self,
        totals: dict[str, Any],
        written: dict[str, Any],
        total: int,
        interrupted: int,
        requested: int,
        wall_s: float,
    ) -> dict[str, Any]:
        pricing = self.job.spec.pricing
        summary: dict[str, Any] = {
            "job": self.job.spec.name,
            "output": self.job.output_url or str(self.job.output_path),
            "rows": total,
            "ok": written["ok"],
            "error": written["error"],
            "schema_invalid": written["schema_invalid"],
            "shared": written["shared"],
            "prompt_tokens": totals["prompt_tokens"],
            "completion_tokens": totals["completion_tokens"],
            "cached_tokens": totals["cached_tokens"],
            "requested_this_run": requested,
            "in_flight_at_last_stop": interrupted,
            "wall_s": round(wall_s, 3),
            "requests_per_s": round(requested / wall_s, 2) if wall_s > 0 else None,
        }
        if pricing is not None:
            summary["cost"] = round(written["cost"], 6)
            summary["currency"] = pricing.currency
            if self.budget.limit is not None:
                summary["max_cost"] = self.budget.limit
                summary["answers_without_usage"] = self.budget.unmetered
        return summary


class LocalEngine:
    """Sends the rows from this process: a producer, `concurrency` workers, and Ctrl-C handling.

    A row waiting for its retry holds no worker: a stand-in worker takes the next row meanwhile
    (at most 2 × concurrency workers at once), and the surplus retires after its row.
    """

    def __init__(self, presses: CtrlC | None = None) -> None:
        self._presses = presses  # None: this thread's SIGINT
        self._interrupts = 0
        self._producing = anyio.CancelScope()
        self._concurrency = 0
        self._workers = 0  # stand-ins included
        self._resting = 0  # rows waiting for a retry (their workers' places taken by stand-ins)
        self._stand_in: Callable[[], None] | None = None  # starts one more worker while the run's rows flow
        self._limits: Limits | None = None  # the run's, once sending starts; read to say what the run waits for
        self._watch = _Watch()
        self._outage_timeout_s = 0.0
        self._order: CacheOrder | None = None  # run.order: cache (pipeline/cache_order.py)

    async def send_all(self, run: OpenRun, checkpoint: Checkpoint, progress: Progress, base_url: str) -> Sent:
        spec = run.job.spec.run
        limits = limits_for(run.job.spec.provider.key_variables, run.concurrency, spec, progress.say)
        kept = KeptLimits(base_url, run.job.spec.model or "", run.job.api_keys())
        kept.seed(limits)  # windows learned by earlier runs, from the first request
        watch = _Watch()
        transport = open_transport(run.job, base_url, run.concurrency)
        # The Ray engine's limiter is the coordinator's: no timeline there.
        timeline = LimiterTimeline(checkpoint, progress.watch(), run.job.spec.provider.key_variables[0])
        self._concurrency = run.concurrency
        self._limits, self._watch, self._outage_timeout_s = limits, watch, spec.outage_timeout_s
        self._order = order = CacheOrder(run.concurrency) if spec.order == "cache" else None
        ledger = checkpoint if order is None else AnsweredLedger(checkpoint, order)
        checkpoint.send_ahead(run.concurrency)
        parts = RowParts(
            ledger,
            limits,
            SharedAnswers(),
            watch,
            transport,
            partial(timeline.observe, limits),
            self._rest,
            timeline.watched,
        )
        pipeline = run.pipeline(parts)
        try:
            await self._send_all(run, pipeline, checkpoint, progress, timeline)
        finally:
            if checkpoint.failure is None:  # a checkpoint that cannot be written says so itself
                # Cancelled (arun's task), the run made no last commit: what finished is kept all the same.
                checkpoint.give_back_ahead()
                checkpoint.flush_now()
                checkpoint.set_meta(LEARNED_META, kept.keep(limits, checkpoint.get_meta(LEARNED_META)))
            await transport.aclose()
            await pipeline.aclose()
        in_flight = len(checkpoint.awaiting_answer)
        budget = run.budget
        return Sent(
            pipeline.requested,
            self._interrupts,
            watch.tripped,
            in_flight,
            checkpoint.failure,
            budget.spent,
            budget.refused,
        )

    async def _send_all(
        self, run: OpenRun, pipeline: RowPipeline, checkpoint: Checkpoint, progress: Progress, timeline: LimiterTimeline
    ) -> None:
        send, receive = anyio.create_memory_object_stream[WorkItem](run.concurrency * 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(checkpoint.flush_loop)
            tg.start_soon(self._report_waits, progress)
            async with receive, anyio.create_task_group() as work:  # stand-ins clone `receive` until the end

                def start_worker() -> None:
                    work.start_soon(self._counted_work, pipeline, receive.clone(), progress, work.cancel_scope)

                self._stand_in = start_worker
                tg.start_soon(self._stop_on_ctrl_c, checkpoint, work.cancel_scope)
                tg.start_soon(self._stop_on_checkpoint_failure, checkpoint, work.cancel_scope)
                work.start_soon(self._produce_until_ctrl_c, run, pipeline, send, checkpoint, progress)
                for _ in range(run.concurrency):
                    start_worker()
            self._stand_in = None
            if pipeline.parts.watch.tripped is None:
                pipeline.release_held(progress)
            timeline.close()
            checkpoint.give_back_ahead()
            await checkpoint.flush()
            tg.cancel_scope.cancel()

    async def _counted_work(
        self,
        pipeline: RowPipeline,
        receive: MemoryObjectReceiveStream[WorkItem],
        progress: Progress,
        scope: anyio.CancelScope,
    ) -> None:
        self._workers += 1
        try:
            await pipeline.work(receive, progress, scope.cancel, retire=self._surplus)
        finally:
            self._workers -= 1

    def _surplus(self) -> bool:
        """More workers busy than places: a stand-in whose row's retry came back retires."""
        return self._workers - self._resting > self._concurrency

    async def _rest(self, seconds: float) -> None:
        """A row waits for its retry: a stand-in worker takes the next row meanwhile, so the places stay busy.

        Rows resting hold no place, and at most as many stand-ins as places run at once.
        """
        self._resting += 1
        try:
            active = self._workers - self._resting
            if self._stand_in is not None and active < self._concurrency and self._workers < 2 * self._concurrency:
                self._stand_in()
            await anyio.sleep(seconds)
        finally:
            self._resting -= 1

    async def _report_waits(self, progress: Progress) -> None:
        """Say what the run is waiting for, once when it starts (a line) and all along (the bar):
        a relay that cannot be reached, the outage breaker holding rows, a long pause asked by the server."""
        said: str | None = None
        while True:
            situation, line, short = self._waiting_for(anyio.current_time())
            if situation != said:
                if line is not None:
                    progress.say(line)
                elif said in ("unreachable", "down"):
                    progress.say("the relay answers again; going on")
                said = situation
            progress.waiting(short)
            await anyio.sleep(WAITS_EVERY_S)

    def _waiting_for(self, now: float) -> tuple[str | None, str | None, str | None]:
        """(situation, the line that says it, the bar's short form); all None when nothing holds the run."""
        if self._limits is None:
            return None, None, None
        breaker = self._limits.breaker
        if (left := breaker.gives_up_in_s(now)) is not None:
            last = breaker.last_error.message if breaker.last_error is not None else "requests fail"
            return (
                "down",
                f"the relay seems down ({last}): rows are held while one request at a time checks it; "
                f"the run stops in {left:.0f} s (run.outage_timeout_s) unless it answers, rows pending",
                f"relay down, stopping in {left:.0f} s",
            )
        if self._watch.unreachable is not None:
            return (
                "unreachable",
                f"{self._watch.unreachable.message.removeprefix('connection: ')}; retrying for up to "
                f"{self._outage_timeout_s:g} s (run.outage_timeout_s), then the run stops with rows pending",
                "cannot connect",
            )
        if (paused := self._limits.paused_until - now) > PAUSE_SAID_S:
            # The bar counts the pause down itself (pipeline/progress.py).
            return "paused", f"the server pushed back: every new request waits {paused:.0f} s", None
        return None, None, None

    async def _produce_until_ctrl_c(
        self,
        run: OpenRun,
        pipeline: RowPipeline,
        send: MemoryObjectSendStream[WorkItem],
        checkpoint: Checkpoint,
        progress: Progress,
    ) -> None:
        with self._producing:
            await self._produce(run, pipeline, send, checkpoint, progress)

    async def _stop_on_checkpoint_failure(self, checkpoint: Checkpoint, work: anyio.CancelScope) -> None:
        """Disk full or read-only: nothing more can be stored, so nothing more is sent or waited for."""
        await checkpoint.failed.wait()
        self._producing.cancel()
        work.cancel()

    async def _stop_on_ctrl_c(self, checkpoint: Checkpoint, work: anyio.CancelScope) -> None:
        """First Ctrl-C: send no new row; rows in flight get GRACE_S to finish. A second one cancels them now.

        Either way the run then commits what finished (the checkpoint is consistent at every commit).
        """
        async with self._ctrl_c() as pressed:
            await pressed()
            self._interrupts = 1
            self._producing.cancel()
            checkpoint.refuse_new_rows()
            work.deadline = anyio.current_time() + GRACE_S
            while checkpoint.awaiting_answer:
                with anyio.move_on_after(0.05):
                    await pressed()
                    self._interrupts = 2
                    break
            work.cancel()

    @asynccontextmanager
    async def _ctrl_c(self) -> AsyncIterator[Callable[[], Awaitable[object]]]:
        """A function that returns at the next Ctrl-C."""
        if self._presses is not None:
            yield self._presses.wait
            return
        # SIGTERM is what `timeout`, systemd, Kubernetes and batch schedulers send: the same as a Ctrl-C.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            yield partial(anext, signals)

    async def _produce(
        self,
        run: OpenRun,
        pipeline: RowPipeline,
        send: MemoryObjectSendStream[WorkItem],
        checkpoint: Checkpoint,
        progress: Progress,
    ) -> None:
        """The producer: the rows to send, in the order they are sent, as work items into the workers' stream."""
        async with send:
            sending = Sending(send, self._order, lambda: run.budget.stopped, checkpoint.expect)
            for batch in _unfinished_batches(run, checkpoint):
                for row in batch:
                    if run.budget.stopped:
                        return
                    item = pipeline.item(row, progress)
                    if item is not None and not sending.put_now(item):
                        await sending.put(item)
                await anyio.sleep(0)  # let workers run between batches
            await sending.drain()


def _unfinished_batches(run: OpenRun, checkpoint: Checkpoint) -> Iterator[Iterator[dict[str, Any]]]:
    """The input's rows not finished yet, in input order, a batch at a time (the input is read a batch at a time)."""
    for batch in run.table.batches(run.limit):
        lo, hi = batch[ROW_INDEX][0], batch[ROW_INDEX][-1] + 1
        done = checkpoint.finished_in_range(lo, hi)
        if len(done) == batch.height:
            continue  # all finished: a mostly done job resumes without touching its rows
        yield (row for row in batch.iter_rows(named=True) if row[ROW_INDEX] not in done)


class _Watch(AbortWatch[CallError]):
    """The stop rules, and the last failure to connect since the last answer (said while the run waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.unreachable: CallError | None = None

    def on_success(self) -> None:
        super().on_success()
        self.unreachable = None

    def on_error(self, error: CallError) -> None:
        super().on_error(error)
        if error.message.startswith(CANNOT_CONNECT):
            self.unreachable = error


def _abort_message(error: CallError, job: Job) -> str:
    what = {
        "auth": f"the API key was refused; check {', '.join(job.spec.provider.key_variables)}",
        "quota": "the account has no balance or quota left; top it up",
        "outage": f"the relay at {job.spec.provider.base_url} seems to be down",
    }.get(error.error_class, "the same error repeated before any row succeeded")
    if error.abort == StopRule.D:
        what = "the relay refused every request alike, and nothing succeeded since; fix what it says, then run again"
    return f"run stopped: {what}: {error}. Finished rows are kept"


_collections_lock = threading.Lock()
_runs_going = 0
_threshold_before: tuple[int, int, int] = (0, 0, 0)


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """While runs go on: objects from before the run (modules, the job, the templates) are set aside from
    the garbage collector's scans, and the youngest generation is collected less often. Both are
    undone when the last run in the process ends (runs of the Python API may overlap in threads)."""
    global _runs_going, _threshold_before
    with _collections_lock:
        _runs_going += 1
        if _runs_going == 1:
            gc.freeze()
            _threshold_before = gc.get_threshold()
            gc.set_threshold(max(GC_YOUNG_THRESHOLD, _threshold_before[0]), *_threshold_before[1:])
    try:
        yield
    finally:
        with _collections_lock:
            _runs_going -= 1
            if _runs_going == 0:
                gc.set_threshold(*_threshold_before)
                gc.unfreeze()


@contextmanager
def _base_url(job: Job) -> Iterator[str]:
    if not job.uses_emulator:
        yield job.spec.provider.base_url
        return
    from batchrun.emulator.server import EmulatorConfig, running_in_thread

    with running_in_thread(EmulatorConfig()) as url:
        yield url


async def run_job(job: Job, options: RunOptions) -> dict[str, Any]:
    return await Run(job, options).execute()

"""The run: input batches → requests → limiter → protocol → checkpoint → Parquet.

One producer renders rows into request bodies and feeds a bounded stream, so
memory stays flat however large the input; `concurrency` workers take from it,
each row going through the limiter and the retry loop, and every finished row
goes to the checkpoint. The output is written from the checkpoint at the end.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batchrun import fingerprint, images, output, protocols, spend, storage
from batchrun.checkpoint import DB_NAME, Checkpoint, RowRecord, checkpoint_folder
from batchrun.errors import BudgetReached, RunAborted, RunInterrupted
from batchrun.inputs import ROW_INDEX, InputTable
from batchrun.limits import Limits, estimate_tokens, output_cap, prompt_tokens_estimate
from batchrun.progress import Progress
from batchrun.protocols import CallError, Reply
from batchrun.redaction import redact
from batchrun.render import Renderer, Request, RowInputError
from batchrun.resume import ResumeFlags, open_for_run
from batchrun.sharing import SharedAnswers, request_key
from batchrun.spec import Job
from batchrun.structured import AnswerParser, ask_with_repairs, explain_native_rejection
from batchrun.timeline import OK, AttemptLog, LimiterTimeline, note_run
from batchrun.transport import CANNOT_CONNECT, AnswerCaps, Outcome, Transport, call_with_retries

ABORT_AFTER = 3  # PROTOCOL.md §5.2 rules B and C
KEPT_ANSWER_BYTES = 4 << 20  # output.openai_batch: a larger answer body is not kept (its line says so)
GRACE_S = 3.0  # after Ctrl-C, how long rows in flight may take to finish before they are cancelled
PAUSE_SAID_S = 5.0  # a server's pause longer than this is said, not just waited out
WAITS_EVERY_S = 0.5  # how often the run looks at what it is waiting for


@dataclass
class RunOptions:
    limit: int | None = None
    concurrency: int | None = None
    restart: bool = False
    retry_failed: bool = False
    rerun_changed: bool = False
    quiet: bool = False
    max_cost: float | None = None  # overrides run.max_cost
    adopt_checkpoint: Path | None = None  # --adopt-checkpoint: an earlier checkpoint of this job, moved here
    durable_checkpoint: bool = True  # False only in `batchrun bench`, to measure the checkpoint's cost
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


@dataclass
class WorkItem:
    idx: int
    row_id: str
    request: Request  # the body is built by the worker, once the row's images are loaded
    estimate: int  # tokens, for the tokens-per-minute window
    prompt_estimate: int  # input tokens, for the budget
    key: bytes  # identical requests share one answer
    request_hash: int  # the key with the job's request settings: what a rerun compares (fingerprint.py)
    cap: int | None  # output tokens at most, from params (and an OpenAI Batch line's body)


class AbortWatch:
    """Stops the run when going on cannot help (PROTOCOL.md §5.2 rules A, B, C)."""

    def __init__(self) -> None:
        self.tripped: CallError | None = None
        self._any_success = False
        self._b_run = 0
        self._c_key: tuple[Any, ...] | None = None
        self._c_run = 0

    def on_success(self) -> None:
        self._any_success = True
        self._b_run = 0

    def on_error(self, error: CallError) -> None:
        if error.abort == "A":
            self.tripped = error
        elif error.abort == "B":
            self._b_run += 1
            if self._b_run >= ABORT_AFTER:
                self.tripped = error
        elif error.abort == "C" and not self._any_success:
            key = (error.status, error.code, error.error_class)
            self._c_run = self._c_run + 1 if key == self._c_key else 1
            self._c_key = key
            if self._c_run >= ABORT_AFTER:
                self.tripped = error


class Run:
    def __init__(self, job: Job, options: RunOptions) -> None:
        self.job = job
        self.options = options
        spec = job.spec
        self.concurrency = options.concurrency or spec.run.concurrency
        self.table = InputTable.for_job(job)
        self.renderer = Renderer(job, self.table.columns)
        self.parser = AnswerParser.for_spec(spec)
        output.check_columns(job, self.parser, self.table.columns)
        output.check_targets(job)
        self.protocol = protocols.PROTOCOLS[spec.provider.api]
        # output.openai_batch needs every answer's body as received: only then are they kept.
        keep = job.openai_batch_path is not None
        self.decoders = {api: replace(p.decoder(spec), keep_answer=keep) for api, p in protocols.PROTOCOLS.items()}
        self.images = images.loader_for(job, self.protocol.INLINE_IMAGE_URLS)
        self.api_key = job.api_key()
        self.base_url = spec.provider.base_url  # the emulator's own address once execute() starts it
        self.watch = AbortWatch()
        run = spec.run
        self.limits = Limits(self.concurrency, run.requests_per_minute, run.tokens_per_minute, run.outage_timeout_s)
        self.settings = fingerprint.settings_digest(spec)
        self.requested = 0
        self._held: list[RowRecord] = []
        self._unreachable: CallError | None = None  # the last connection failure since the last answer
        self.interrupts = 0
        self._workers = 0  # the local run's workers, stand-ins included
        self._resting = 0  # rows waiting for a retry (their workers' places taken by stand-ins)
        self._stand_in: Callable[[], None] | None = None  # starts one more worker while the run's rows flow
        self._producing = anyio.CancelScope()
        self.sharing = SharedAnswers()
        max_cost = options.max_cost if options.max_cost is not None else spec.run.max_cost
        self.budget = spend.Budget(max_cost, spec.pricing, spent=0.0)
        self.timeline: LimiterTimeline | None = None  # a local run's; the Ray engine's limiter is the coordinator's

    async def execute(self) -> dict[str, Any]:
        started = time.monotonic()
        self.table.check_ids()
        if self.job.output_url is not None:
            fresh = not (checkpoint_folder(self.job.output_path) / DB_NAME).exists()
            storage.check_output(self.job.output_url, self.job.spec.output.storage_options, fresh)
        options = self.options
        flags = ResumeFlags(options.restart, options.rerun_changed, options.retry_failed, options.adopt_checkpoint)
        checkpoint, notes = open_for_run(self.job, self.table, self.renderer, flags, options.durable_checkpoint)
        self.timeline = LimiterTimeline(checkpoint)
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
            if self.job.spec.pricing is not None:
                done = checkpoint.totals()
                self.budget.spent = spend.cost(
                    self.job.spec.pricing, done["prompt_tokens"], done["completion_tokens"], done["images"]
                )
            total = self.table.count() if self.options.limit is None else min(self.options.limit, self.table.count())
            progress = Progress(
                total=total - checkpoint.count_finished(0, total),
                quiet=self.options.quiet,
                pricing=self.job.spec.pricing,
                max_cost=self.budget.limit,
                spent=self.budget.spent,
            )
            with _base_url(self.job) as base_url:
                self.base_url = base_url
                run = self.job.spec.run
                caps = AnswerCaps.of(run)
                transport = Transport(
                    base_url, self.api_key, run.timeout_s, self.concurrency, caps, self.protocol.KEY_HEADER
                )
                try:
                    await self._run_all(checkpoint, transport, progress)
                finally:
                    await transport.aclose()
                    await self.images.aclose()
                    progress.close()
            if checkpoint.failure is not None:  # nothing more can be written, the run's note included
                resume = f"run `batchrun run {self.job.path}` again to resume"
                raise RunAborted(f"run stopped: {checkpoint.failure}; {resume}")
            note_run(checkpoint, self._exit_state(), time.time(), time.monotonic() - started)
            if self.interrupts:
                when = f"after {GRACE_S:g} s" if self.interrupts == 1 else "at the second Ctrl-C"
                cancelled = len(checkpoint.awaiting_answer)
                raise RunInterrupted(checkpoint.count_finished(0, total), total, cancelled, when)
            if self.watch.tripped is not None:
                raise RunAborted(_abort_message(self.watch.tripped, self.job))
            if self.budget.stopped:
                raise BudgetReached(self.budget.stop_message(self.job, total - checkpoint.count_finished(0, total)))
            totals = checkpoint.totals()
            written = output.write_parquet(self.table, checkpoint, self.job, self.options.limit, self.parser)
            if self.job.openai_batch_path is not None:
                output.write_openai_batch(self.table, checkpoint, self.job, self.options.limit)
            summary = self._summary(totals, written, total, interrupted, time.monotonic() - started)
            output.write_summary(self.job.output_path, summary)
            return summary
        finally:
            checkpoint.close()

    async def _run_all(self, checkpoint: Checkpoint, transport: Transport, progress: Progress) -> None:
        send, receive = anyio.create_memory_object_stream[WorkItem](self.concurrency * 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(checkpoint.flush_loop)
            tg.start_soon(self._report_waits, progress)
            async with receive, anyio.create_task_group() as work:  # stand-ins clone `receive` until the end

                def start_worker() -> None:
                    work.start_soon(
                        self._counted_work, receive.clone(), checkpoint, transport, progress, work.cancel_scope
                    )

                self._stand_in = start_worker
                tg.start_soon(self._stop_on_ctrl_c, checkpoint, work.cancel_scope)
                tg.start_soon(self._stop_on_checkpoint_failure, checkpoint, work.cancel_scope)
                work.start_soon(self._produce_until_ctrl_c, send, checkpoint, progress)
                for _ in range(self.concurrency):
                    start_worker()
            self._stand_in = None
            if self.watch.tripped is None:
                self._release_held(checkpoint, progress)
            if self.timeline is not None:
                self.timeline.close()
            await checkpoint.flush()
            tg.cancel_scope.cancel()

    async def _produce_until_ctrl_c(
        self, send: MemoryObjectSendStream[WorkItem], checkpoint: Checkpoint, progress: Progress
    ) -> None:
        with self._producing:
            await self._produce(send, checkpoint, progress)

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
            self.interrupts = 1
            self._producing.cancel()
            checkpoint.refuse_new_rows()
            work.deadline = anyio.current_time() + GRACE_S
            while checkpoint.awaiting_answer:
                with anyio.move_on_after(0.05):
                    await pressed()
                    self.interrupts = 2
                    break
            work.cancel()

    @asynccontextmanager
    async def _ctrl_c(self) -> AsyncIterator[Callable[[], Awaitable[object]]]:
        """A function that returns at the next Ctrl-C."""
        if self.options.presses is not None:
            yield self.options.presses.wait
            return
        # SIGTERM is what `timeout`, systemd, Kubernetes and batch schedulers send: the same as a Ctrl-C.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            yield partial(anext, signals)

    async def _produce(
        self, send: MemoryObjectSendStream[WorkItem], checkpoint: Checkpoint, progress: Progress
    ) -> None:
        async with send:
            for batch in self.table.batches(self.options.limit):
                lo, hi = batch[ROW_INDEX][0], batch[ROW_INDEX][-1] + 1
                done = checkpoint.finished_in_range(lo, hi)
                if len(done) == batch.height:
                    continue  # all finished: a mostly done job resumes without touching its rows
                for row in batch.iter_rows(named=True):
                    if row[ROW_INDEX] in done:
                        continue
                    if self.budget.stopped:
                        return
                    item = self._item(row, checkpoint, progress)
                    if item is not None:
                        await send.send(item)
                await anyio.sleep(0)  # let workers run between batches

    def _item(self, row: dict[str, Any], checkpoint: Checkpoint, progress: Progress) -> WorkItem | None:
        """The row's request, ready to send; None when its templates fail on it (finished as an input error)."""
        spec = self.job.spec
        idx = row[ROW_INDEX]
        row_id = str(row[self.table.id_name])
        try:
            request = self.renderer.render(row)
        except Exception as e:  # a template or filter failing on this row's values (jinja2 does not wrap them all)
            what = f"row {row_id}: {e}" if isinstance(e, RowInputError) else f"template: {e}"
            checkpoint.finish(_input_error(idx, row_id, what))
            progress.row_done("error", None)
            return None
        chars = request.text_chars
        image_tokens = images.IMAGE_TOKEN_ESTIMATE * (len(request.images) + request.body_images)
        params = {**request.body, **spec.params} if request.body is not None else spec.params
        estimate = estimate_tokens(chars, params) + image_tokens
        prompt_estimate = prompt_tokens_estimate(chars) + image_tokens
        key = request_key(request)
        request_hash = fingerprint.row_hash(self.settings, key)
        return WorkItem(idx, row_id, request, estimate, prompt_estimate, key, request_hash, output_cap(params))

    async def work_rows(
        self, rows: list[dict[str, Any]], checkpoint: Checkpoint, transport: Transport, progress: Progress
    ) -> None:
        """These input rows, each rendered, sent and finished like any row of a local run (the Ray engine's batches).

        Rows held back by a possible abort stay held: `settle_held` decides about them.
        """
        send, receive = anyio.create_memory_object_stream[WorkItem](len(rows))
        async with anyio.create_task_group() as work:
            for _ in range(min(len(rows), self.concurrency)):
                work.start_soon(self._work, receive.clone(), checkpoint, transport, progress, work.cancel_scope)
            receive.close()
            with send:
                for row in rows:
                    item = self._item(row, checkpoint, progress)
                    if item is not None:
                        send.send_nowait(item)

    def settle_held(self, checkpoint: Checkpoint, progress: Progress) -> None:
        """Rows held back by a possible abort: pending if the run stopped, else errors after all."""
        if self.watch.tripped is None:
            self._release_held(checkpoint, progress)
            return
        for held in self._held:
            checkpoint.withdraw(held.idx)
        self._held.clear()

    async def _counted_work(self, *args: Any) -> None:
        self._workers += 1
        try:
            await self._work(*args)
        finally:
            self._workers -= 1

    async def _rest(self, seconds: float) -> None:
        """A row waits for its retry: a stand-in worker takes the next row meanwhile, so the places stay busy.

        Rows resting hold no place, and at most as many stand-ins as places run at once.
        """
        self._resting += 1
        try:
            active = self._workers - self._resting
            if self._stand_in is not None and active < self.concurrency and self._workers < 2 * self.concurrency:
                self._stand_in()
            await anyio.sleep(seconds)
        finally:
            self._resting -= 1

    async def _work(
        self,
        receive: MemoryObjectReceiveStream[WorkItem],
        checkpoint: Checkpoint,
        transport: Transport,
        progress: Progress,
        scope: anyio.CancelScope,
    ) -> None:
        async with receive:
            while self._workers - self._resting <= self.concurrency:  # else a stand-in retires
                try:
                    item = await receive.receive()
                except anyio.EndOfStream:
                    break
                if self.budget.stopped:
                    continue  # left pending: the budget allows no more requests
                try:
                    if not await self._row(item, checkpoint, transport, progress, scope):
                        return
                except Exception as e:  # the row is the unit of failure: this row's error, and the run goes on
                    self._finish(checkpoint, progress, _internal_error(item, e))

    async def _row(
        self,
        item: WorkItem,
        checkpoint: Checkpoint,
        transport: Transport,
        progress: Progress,
        scope: anyio.CancelScope,
    ) -> bool:
        """Everything one row's work does, up to its finished record; False when the run is stopping."""
        record = await self.sharing.find(item.key, item.idx, item.row_id)
        if record is not None:
            self._finish(checkpoint, progress, record)
            return True
        with self.sharing.leading(item.key) as publish:
            asked = await self._ask(item, checkpoint, transport)
            if asked is None:
                return True
            record, outcome = asked
            publish(record)
        if outcome.error is not None and outcome.error.abort is not None:
            # Held back: if the run aborts, this row stays pending rather than failed.
            self._held.append(record)
            if self.watch.tripped is not None:
                self.settle_held(checkpoint, progress)
                scope.cancel()
                return False
            return True
        if outcome.reply is not None:
            self._unreachable = None
            self.watch.on_success()
            self._release_held(checkpoint, progress)
        self._finish(checkpoint, progress, record)
        return True

    def _finish(self, checkpoint: Checkpoint, progress: Progress, record: RowRecord) -> None:
        """Counted first, then stored: a failure while counting ends the row as `internal` instead, stored once."""
        progress.row_done(self._status(record), record)
        checkpoint.finish(record)

    async def _ask(
        self, item: WorkItem, checkpoint: Checkpoint, transport: Transport
    ) -> tuple[RowRecord, Outcome] | None:
        """The row's request, and its repairs; None if the budget does not allow it."""
        spec = self.job.spec
        protocol = self._protocol(item.request)
        path = protocol.path(spec.model or "", spec.stream)
        cap = item.cap
        try:
            request_body = await self._body(item.request)
        except images.ImageError as e:  # nothing is sent for this row
            failed = Outcome(None, CallError("input", str(e), retryable=False), 0, 0.0)
            return _record(item, failed), failed
        decoder = self.decoders[item.request.api or spec.provider.api]
        if item.request.body is not None:  # a Batch line streams if its body (or the job) says so
            decoder = replace(decoder, stream=request_body.get("stream") is True)

        log = AttemptLog()

        async def begin() -> None:
            log.start()
            await checkpoint.begin(item.idx)

        def on_error(error: CallError) -> None:
            self._on_error(error)
            log.note(error.error_class, error.status)
            self._observe_limits()

        async def send(body: dict[str, Any], extra_tokens: int, first: bool) -> Outcome | None:
            prompt_estimate = item.prompt_estimate + extra_tokens
            held = self.budget.reserve(prompt_estimate, cap)
            if held is None:
                return None
            outcome = await call_with_retries(
                transport,
                self.limits,
                path,
                body,
                decoder,
                item.estimate + extra_tokens,
                spec.run.max_attempts,
                on_error,
                before_first_send=begin if first else _nothing,
                rest=self._rest,
            )
            reply = outcome.reply
            if reply is None:
                self.budget.settle(held, prompt_estimate, None, None)
            else:
                log.note(OK)
                self._observe_limits()
                self.budget.settle(
                    held, prompt_estimate, reply.prompt_tokens, reply.completion_tokens, len(reply.images)
                )
            return outcome

        async def follow_up(answer: str, message: str) -> Outcome | None:
            body = protocol.repair_body(request_body, answer, message)
            return await send(body, prompt_tokens_estimate(len(answer) + len(message)), first=False)

        outcome = await send(request_body, 0, first=True)
        if outcome is None:
            return None
        self.requested += 1
        if outcome.error is not None:
            explain_native_rejection(outcome.error, spec)
        repairs = 0
        if self.parser is not None and spec.output.repair_attempts:
            outcome, repairs = await ask_with_repairs(outcome, self.parser, spec.output.repair_attempts, follow_up)
        record = _record(item, outcome)
        record.repairs = repairs
        record.started_at, record.attempt_log = log.started_at, log.text()
        if outcome.reply is not None and outcome.reply.images:
            saved = await anyio.to_thread.run_sync(
                images.save_images, outcome.reply.images, self.job.images_dir, item.row_id
            )
            record.image_paths = orjson.dumps(saved).decode()
        return record, outcome

    def _on_error(self, error: CallError) -> None:
        self.watch.on_error(error)
        if error.message.startswith(CANNOT_CONNECT):
            self._unreachable = error

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
        timeout = self.job.spec.run.outage_timeout_s
        breaker = self.limits.breaker
        if (left := breaker.gives_up_in_s(now)) is not None:
            last = breaker.last_error.message if breaker.last_error is not None else "requests fail"
            return (
                "down",
                f"the relay seems down ({last}): rows are held while one request at a time checks it; "
                f"the run stops in {left:.0f} s (run.outage_timeout_s) unless it answers, rows pending",
                f"relay down, stopping in {left:.0f} s",
            )
        if self._unreachable is not None:
            return (
                "unreachable",
                f"{self._unreachable.message.removeprefix('connection: ')}; retrying for up to {timeout:g} s "
                "(run.outage_timeout_s), then the run stops with rows pending",
                "cannot connect",
            )
        if (paused := self.limits.paused_until - now) > PAUSE_SAID_S:
            return (
                "paused",
                f"the server pushed back: every new request waits {paused:.0f} s",
                f"paused {paused:.0f} s",
            )
        return None, None, None

    def _observe_limits(self) -> None:
        if self.timeline is not None:
            self.timeline.observe(self.limits)

    def _exit_state(self) -> str:
        """How the run ended, in the words `batchrun report` shows."""
        if self.interrupts:
            return "interrupted"
        if self.watch.tripped is not None:
            return "stopped by the server"
        if self.budget.stopped:
            return "stopped at the budget"
        return "finished"

    def _status(self, record: RowRecord) -> str:
        """The row's status as the output will have it: an answer that fails its check is an error."""
        if record.status != "ok" or self.parser is None:
            return record.status
        return (
            "ok"
            if self.parser.judge_stored(record.response_text, record.finish_reason, record.tool_calls).ok
            else "error"
        )

    async def _body(self, request: Request) -> dict[str, Any]:
        """Images are read only now, right before the row is sent (ImageError: nothing is sent)."""
        if request.images:
            request = replace(request, image_inputs=await self.images.load(request.images))
        return self._protocol(request).build(request, self.job.spec)

    def _protocol(self, request: Request) -> ModuleType:
        """The job's protocol, or the one an OpenAI Batch line's url names."""
        return protocols.PROTOCOLS[request.api] if request.api else self.protocol

    def _release_held(self, checkpoint: Checkpoint, progress: Progress) -> None:
        """The run goes on after all: rows held back by a possible abort are errors after all."""
        held, self._held = self._held, []
        for record in held:
            self._finish(checkpoint, progress, record)

    def _summary(
        self, totals: dict[str, Any], written: dict[str, Any], total: int, interrupted: int, wall_s: float
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
            "requested_this_run": self.requested,
            "in_flight_at_last_stop": interrupted,
            "wall_s": round(wall_s, 3),
            "requests_per_s": round(self.requested / wall_s, 2) if wall_s > 0 else None,
        }
        if pricing is not None:
            summary["cost"] = round(written["cost"], 6)
            summary["currency"] = pricing.currency
            if self.budget.limit is not None:
                summary["max_cost"] = self.budget.limit
        return summary


def _record(item: WorkItem, outcome: Outcome) -> RowRecord:
    """The row as stored; the answer's texts masked like every message (the model may echo a key in the prompt)."""
    reply, error = outcome.reply, outcome.error
    calls = redact(orjson.dumps(reply.tool_calls).decode()) if reply and reply.tool_calls else None
    note = "; ".join(reply.notes) if reply and reply.notes else None  # an ok row's `error` says what was odd
    return RowRecord(
        idx=item.idx,
        row_id=item.row_id,
        status="ok" if reply is not None else "error",
        response_text=redact(reply.text) if reply and reply.text else None,
        tool_calls=calls,
        finish_reason=reply.finish_reason if reply else None,
        model=redact(reply.model) if reply and reply.model else None,
        prompt_tokens=reply.prompt_tokens if reply else None,
        completion_tokens=reply.completion_tokens if reply else None,
        latency_s=round(outcome.latency_s, 4),
        attempts=outcome.attempts,
        error_class=error.error_class if error else None,
        error=str(error) if error else note,
        finished_at=time.time(),
        request_hash=item.request_hash,
        answer=_kept_answer(reply),
    )


def _internal_error(item: WorkItem, e: Exception) -> RowRecord:
    """An exception nobody foresaw in this row's work, as the row's result (masked, like every message)."""
    message = redact(f"internal: {type(e).__name__}: {e}")[:2000]
    failed = RowRecord(item.idx, item.row_id, "error", *[None] * 7, 0, "internal", message, time.time())
    failed.request_hash = item.request_hash
    return failed


def _kept_answer(reply: Reply | None) -> tuple[int, str | None, bytes] | None:
    """The answer body for output.openai_batch, when kept and not larger than the checkpoint keeps.

    Unlike the answer's text, the body carries every field a relay sends, and the request id is
    its header: a key echoed in either is masked before the checkpoint stores them."""
    if reply is None or reply.answer is None:
        return None
    body = redact(orjson.dumps(reply.answer).decode()).encode()
    request_id = redact(reply.request_id) if reply.request_id is not None else None
    return (200, request_id, body) if len(body) <= KEPT_ANSWER_BYTES else None


async def _nothing() -> None:
    return None


def _input_error(idx: int, row_id: str, message: str) -> RowRecord:
    return RowRecord(idx, row_id, "error", None, None, None, None, None, None, None, 0, "input", message, time.time())


def _abort_message(error: CallError, job: Job) -> str:
    what = {
        "auth": f"the API key was refused; check {job.spec.provider.api_key_env}",
        "quota": "the account has no balance or quota left; top it up",
        "outage": f"the relay at {job.spec.provider.base_url} seems to be down",
    }.get(error.error_class, "the same error repeated before any row succeeded")
    return f"run stopped: {what}: {error}. Finished rows are kept"


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

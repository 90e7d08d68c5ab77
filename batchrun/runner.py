"""The run: input batches → requests → limiter → protocol → checkpoint → Parquet.

One producer renders rows into request bodies and feeds a bounded stream, so
memory stays flat however large the input; `concurrency` workers take from it,
each row going through the limiter and the retry loop, and every finished row
goes to the checkpoint. The output is written from the checkpoint at the end.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import jinja2
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batchrun import output, protocols
from batchrun.checkpoint import Checkpoint, RowRecord, checkpoint_folder
from batchrun.errors import RunAborted
from batchrun.inputs import ROW_INDEX, InputTable
from batchrun.limits import Limits, estimate_tokens
from batchrun.progress import Progress
from batchrun.protocols import CallError
from batchrun.render import Renderer
from batchrun.spec import Job
from batchrun.transport import Outcome, Transport, call_with_retries

ABORT_AFTER = 3  # PROTOCOL.md §5.2 rules B and C


@dataclass
class RunOptions:
    limit: int | None = None
    concurrency: int | None = None
    restart: bool = False
    retry_failed: bool = False
    quiet: bool = False
    durable_checkpoint: bool = True  # False only in `batchrun bench`, to measure the checkpoint's cost


@dataclass
class WorkItem:
    idx: int
    row_id: str
    body: dict[str, Any]
    estimate: int


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
        self.table.check_ids()
        self.renderer = Renderer(job, self.table.columns)
        self.protocol = protocols.PROTOCOLS[spec.provider.api]
        self.api_key = job.api_key()
        self.watch = AbortWatch()
        self.limits = Limits(self.concurrency, spec.run.requests_per_minute, spec.run.tokens_per_minute)
        self.requested = 0
        self._held: list[RowRecord] = []

    async def execute(self) -> dict[str, Any]:
        started = time.monotonic()
        folder = checkpoint_folder(self.job.output_path)
        if self.options.restart and folder.exists():
            shutil.rmtree(folder)
        checkpoint = Checkpoint(folder, durable=self.options.durable_checkpoint)
        try:
            interrupted = checkpoint.take_interrupted()
            if self.options.retry_failed:
                checkpoint.forget_errors()
            total = self.table.count() if self.options.limit is None else min(self.options.limit, self.table.count())
            progress = Progress(
                total=total - checkpoint.count_finished(0, total),
                quiet=self.options.quiet,
                pricing=self.job.spec.pricing,
            )
            with _base_url(self.job) as base_url:
                transport = Transport(base_url, self.api_key, self.job.spec.run.timeout_s, self.concurrency)
                try:
                    await self._run_all(checkpoint, transport, progress)
                finally:
                    await transport.aclose()
                    progress.close()
            if self.watch.tripped is not None:
                raise RunAborted(_abort_message(self.watch.tripped, self.job))
            totals = checkpoint.totals()
            output.write_parquet(
                self.table, checkpoint, self.job.output_path, self.options.limit, self.job.spec.pricing
            )
            summary = self._summary(totals, total, interrupted, time.monotonic() - started)
            output.write_summary(self.job.output_path, summary)
            return summary
        finally:
            checkpoint.close()

    async def _run_all(self, checkpoint: Checkpoint, transport: Transport, progress: Progress) -> None:
        send, receive = anyio.create_memory_object_stream[WorkItem](self.concurrency * 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(checkpoint.flush_loop)
            async with anyio.create_task_group() as work:
                work.start_soon(self._produce, send, checkpoint, progress)
                for _ in range(self.concurrency):
                    work.start_soon(self._work, receive.clone(), checkpoint, transport, progress, work.cancel_scope)
                receive.close()
            if self.watch.tripped is None:
                self._release_held(checkpoint, progress)
            await checkpoint.flush()
            tg.cancel_scope.cancel()

    async def _produce(
        self, send: MemoryObjectSendStream[WorkItem], checkpoint: Checkpoint, progress: Progress
    ) -> None:
        spec = self.job.spec
        id_name = self.table.id_name
        async with send:
            for batch in self.table.batches(self.options.limit):
                lo, hi = batch[ROW_INDEX][0], batch[ROW_INDEX][-1] + 1
                done = checkpoint.finished_in_range(lo, hi)
                for row in batch.iter_rows(named=True):
                    idx = row[ROW_INDEX]
                    if idx in done:
                        continue
                    row_id = str(row[id_name])
                    try:
                        request = self.renderer.render(row)
                    except jinja2.TemplateError as e:
                        checkpoint.finish(_input_error(idx, row_id, f"template: {e}"))
                        progress.row_done("error", None)
                        continue
                    chars = len(request.user) + len(request.system or "")
                    body = self.protocol.build(request, spec)
                    await send.send(WorkItem(idx, row_id, body, estimate_tokens(chars, spec.params)))
                await anyio.sleep(0)  # let workers run between batches

    async def _work(
        self,
        receive: MemoryObjectReceiveStream[WorkItem],
        checkpoint: Checkpoint,
        transport: Transport,
        progress: Progress,
        scope: anyio.CancelScope,
    ) -> None:
        spec = self.job.spec
        path = self.protocol.path(spec.model, spec.stream)
        async with receive:
            async for item in receive:
                self.requested += 1
                outcome = await call_with_retries(
                    transport,
                    self.limits,
                    path,
                    item.body,
                    self.protocol.parse,
                    item.estimate,
                    spec.run.max_attempts,
                    self.watch.on_error,
                    before_first_send=partial(checkpoint.begin, item.idx),
                )
                record = _record(item, outcome)
                if outcome.error is not None and outcome.error.abort in ("A", "B"):
                    # Held back: if the run aborts, this row stays pending rather than failed.
                    self._held.append(record)
                    if self.watch.tripped is not None:
                        for held in self._held:
                            checkpoint.withdraw(held.idx)
                        scope.cancel()
                        return
                    continue
                if outcome.reply is not None:
                    self.watch.on_success()
                    self._release_held(checkpoint, progress)
                checkpoint.finish(record)
                progress.row_done(record.status, record)

    def _release_held(self, checkpoint: Checkpoint, progress: Progress) -> None:
        """The run goes on after all: rows held back by a possible abort are errors after all."""
        for held in self._held:
            checkpoint.finish(held)
            progress.row_done(held.status, held)
        self._held.clear()

    def _summary(self, totals: dict[str, Any], total: int, interrupted: int, wall_s: float) -> dict[str, Any]:
        pricing = self.job.spec.pricing
        summary: dict[str, Any] = {
            "job": self.job.spec.name,
            "output": str(self.job.output_path),
            "rows": total,
            "ok": totals["ok"],
            "error": totals["error"],
            "prompt_tokens": totals["prompt_tokens"],
            "completion_tokens": totals["completion_tokens"],
            "requested_this_run": self.requested,
            "in_flight_at_last_stop": interrupted,
            "wall_s": round(wall_s, 3),
            "requests_per_s": round(self.requested / wall_s, 2) if wall_s > 0 else None,
        }
        if pricing is not None:
            summary["cost"] = round(
                totals["prompt_tokens"] * pricing.input_per_million / 1e6
                + totals["completion_tokens"] * pricing.output_per_million / 1e6,
                6,
            )
            summary["currency"] = pricing.currency
        return summary


def _record(item: WorkItem, outcome: Outcome) -> RowRecord:
    reply, error = outcome.reply, outcome.error
    calls = orjson.dumps(reply.tool_calls).decode() if reply and reply.tool_calls else None
    return RowRecord(
        idx=item.idx,
        row_id=item.row_id,
        status="ok" if reply is not None else "error",
        response_text=reply.text if reply else None,
        tool_calls=calls,
        finish_reason=reply.finish_reason if reply else None,
        model=reply.model if reply else None,
        prompt_tokens=reply.prompt_tokens if reply else None,
        completion_tokens=reply.completion_tokens if reply else None,
        latency_s=round(outcome.latency_s, 4),
        attempts=outcome.attempts,
        error_class=error.error_class if error else None,
        error=str(error) if error else None,
        finished_at=time.time(),
    )


def _input_error(idx: int, row_id: str, message: str) -> RowRecord:
    return RowRecord(idx, row_id, "error", None, None, None, None, None, None, None, 0, "input", message, time.time())


def _abort_message(error: CallError, job: Job) -> str:
    what = {
        "auth": f"the API key was refused; check {job.spec.provider.api_key_env}",
        "quota": "the account has no balance or quota left; top it up",
    }.get(error.error_class, "the same error repeated before any row succeeded")
    return f"run stopped: {what}: {error}. Finished rows are kept; run `batchrun run {job.path}` again to resume."


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

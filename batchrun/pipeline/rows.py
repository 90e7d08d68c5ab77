"""The row pipeline: one input row to one finished, committed result.

render → images → protocol body → budget → limiter → transport with retries →
decode → parse → repair → checkpoint → progress. Every engine composes the same
`RowPipeline`; what it needs from the run around it comes in as the declared
collaborators of pipeline/seams.py, so the local engine passes its own parts and a Ray
actor passes stand-ins for the job-wide ones, and neither re-implements a step.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream

from batchrun.base.redaction import redact
from batchrun.base.stops import HeldRows
from batchrun.flow.limits import estimate_tokens, output_cap, prompt_tokens_estimate
from batchrun.flow.sharing import request_key
from batchrun.job.inputs import ROW_INDEX
from batchrun.job.render import Renderer, Request, RowInputError
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import Job
from batchrun.job.structured import AnswerParser
from batchrun.ledger.checkpoint import RowRecord
from batchrun.pipeline import fingerprint, images
from batchrun.pipeline.repair import ask_with_repairs, explain_native_rejection
from batchrun.pipeline.seams import Admission, Ledger, ProgressSink, Sharing, Spending, StopWatch
from batchrun.pipeline.timeline import OK, AttemptLog, Watched
from batchrun.pipeline.transport import AnswerCaps, Outcome, Transport, call_with_retries
from batchrun.protocols import APIS, CallError, Repairing, Reply, WireProtocol, protocol_for
from batchrun.protocols.reply import ImageOut

KEPT_ANSWER_BYTES = 4 << 20  # output.openai_batch: a larger answer body is not kept (its line says so)
MODEL_NAMES = 64  # masked model names remembered; a relay naming more is masked answer by answer


@dataclass(slots=True)  # made for every row: slots make it and read it faster
class WorkItem:
    idx: int
    row_id: str
    request: Request  # the body is built by the worker, once the row's images are loaded
    estimate: int  # tokens, for the tokens-per-minute window
    prompt_estimate: int  # input tokens, for the budget
    key: bytes  # identical requests share one answer
    request_hash: int  # the key with the job's request settings: what a rerun compares (pipeline/fingerprint.py)
    cap: int | None  # output tokens at most, from params (and an OpenAI Batch line's body)
    batch: RowBatch | None = None  # the rows it was queued with, if someone waits for them (a Ray actor's batch)


class RowBatch:
    """Rows queued together, counted by their own progress sink; `finished` returns once every one was taken
    and ended (sent, shared, or left pending). Rows are added before any is taken: one end, no clear."""

    def __init__(self, progress: ProgressSink) -> None:
        self.progress = progress
        self._left = 0
        self._ended = anyio.Event()

    def add(self, item: WorkItem) -> WorkItem:
        self._left += 1
        item.batch = self
        return item

    def ended(self) -> None:
        self._left -= 1
        if not self._left:
            self._ended.set()

    async def finished(self) -> None:
        if self._left:
            await self._ended.wait()


@dataclass
class RowParts:
    """The collaborators a pipeline works with; the engine decides what stands behind each."""

    ledger: Ledger
    admission: Admission
    sharing: Sharing
    watch: StopWatch
    transport: Transport
    observe_limits: Callable[[], None] = lambda: None  # after each attempt: the local limiter's timeline
    rest: Callable[[float], Awaitable[None]] = anyio.sleep  # before a retry (the local engine lends the row's worker)
    watched: Watched | None = None  # 429s and retries, counted for the bar and the summary (the local engine's)


class RowPipeline:
    """Sends rows and finishes each as its result; `requested` counts the requests it started."""

    def __init__(
        self,
        job: Job,
        renderer: Renderer,
        parser: AnswerParser | None,
        id_name: str,
        parts: RowParts,
        budget: Spending,
    ) -> None:
        spec = job.spec
        self.job = job
        self.renderer = renderer
        self.parser = parser
        self.id_name = id_name
        self.parts = parts
        self.budget = budget
        self.protocol = protocol_for(spec.provider.api)
        self.request_settings = RequestSettings.of(spec, self.protocol)
        # output.openai_batch needs every answer's body as received: only then are they kept.
        keep = job.openai_batch_path is not None
        self.decoders = {
            api: replace(protocol_for(api).decoder(self.request_settings), keep_answer=keep) for api in APIS
        }
        self.images = images.loader_for(job, self.protocol.INLINE_IMAGE_URLS)
        self.settings = fingerprint.settings_digest(self.request_settings)
        self.requested = 0
        self._held: HeldRows[RowRecord] = HeldRows()
        # What is the same for every row but an OpenAI Batch line (its body has its own): worked out once.
        self._cap = output_cap(spec.params)
        self._path = self.protocol.path(self.request_settings)
        self._decoder = self.decoders[spec.provider.api]
        # The job's settings a row reads, read once (each look-up on the job's pydantic models costs a few µs a row).
        self._max_attempts = spec.run.max_attempts
        self._repair_attempts = spec.output.repair_attempts
        self._models: dict[str, str] = {}  # model names as answered, masked (answers name the same few)

    async def aclose(self) -> None:
        await self.images.aclose()

    def item(self, row: dict[str, Any], progress: ProgressSink) -> WorkItem | None:
        """The row's request, ready to send; None when its templates fail on it (finished as an input error)."""
        idx = row[ROW_INDEX]
        row_id = str(row[self.id_name])
        try:
            request = self.renderer.render(row)
        except Exception as e:  # a template or filter failing on this row's values (jinja2 does not wrap them all)
            what = f"row {row_id}: {e}" if isinstance(e, RowInputError) else f"template: {e}"
            self.parts.ledger.finish(_input_error(idx, row_id, what))
            progress.row_done("error", None)
            return None
        image_tokens = images.IMAGE_TOKEN_ESTIMATE * (len(request.images) + request.body_images)
        prompt_estimate = prompt_tokens_estimate(request.text_chars) + image_tokens
        cap = self._cap if request.body is None else output_cap({**request.body, **self.job.spec.params})
        key = request_key(request)
        request_hash = fingerprint.row_hash(self.settings, key)
        estimate = estimate_tokens(prompt_estimate, cap)
        return WorkItem(idx, row_id, request, estimate, prompt_estimate, key, request_hash, cap)

    async def work(
        self,
        receive: MemoryObjectReceiveStream[WorkItem],
        progress: ProgressSink,
        stop: Callable[[], None],
        retire: Callable[[], bool] = lambda: False,
    ) -> None:
        """One worker, of either engine: sends the rows it receives, one at a time, until the stream ends.

        A row of a `RowBatch` is counted by the batch's progress sink, else by `progress`. When the run
        must stop, calls `stop` and returns. `retire` is asked before each row: True ends this worker
        (the local engine's surplus stand-ins).
        """
        async with receive:
            while not retire():
                try:  # a row ready is taken without a pass through the event loop (anyio's `receive` makes one)
                    item = receive.receive_nowait()
                except anyio.WouldBlock:
                    if (waited := await _next_item(receive)) is None:
                        return
                    item = waited
                except anyio.EndOfStream:
                    return
                batch = item.batch
                sink = progress if batch is None else batch.progress
                # The row's work in this frame, not in one more coroutine: every layer costs each of a row's resumes.
                try:
                    going = True if self.budget.stopped else await self._row(item, sink)  # stopped: left pending
                except Exception as e:  # the row is the unit of failure: nobody foresaw this, the run goes on
                    self._finish(sink, _internal_error(item, e))
                    going = True
                finally:
                    if batch is not None:
                        batch.ended()
                if not going:
                    stop()
                    return

    async def _row(self, item: WorkItem, progress: ProgressSink) -> bool:
        """Everything one row's work does, up to its finished record; False when the run must stop."""
        parts = self.parts
        record = await parts.sharing.find(item.key, item.idx, item.row_id)
        if record is not None:
            self._finish(progress, record)
            return True
        with parts.sharing.leading(item.key) as publish:
            asked = await self._ask(item)
            if asked is None:
                return True
            record, outcome = asked
            publish(record)
        if outcome.error is not None and outcome.error.abort is not None:
            # Held back: if the run aborts, this row stays pending rather than failed.
            self._held.hold(record)
            if parts.watch.tripped is not None:
                self.settle_held(progress)
                return False
            return True
        if outcome.reply is not None:
            parts.watch.on_success()
            if self._held:  # rows held back by a possible abort: errors after all
                self.release_held(progress)
        self._finish(progress, record)
        return True

    def _finish(self, progress: ProgressSink, record: RowRecord) -> None:
        """Counted first, then stored: a failure while counting ends the row as `internal` instead, stored once."""
        progress.row_done(self.status(record), record)
        self.parts.ledger.finish(record)

    def settle_held(self, progress: ProgressSink) -> None:
        """Rows held back by a possible abort: pending if the run stopped, else errors after all."""
        if self.parts.watch.tripped is None:
            self.release_held(progress)
            return
        ledger = self.parts.ledger
        self._held.withdraw(lambda held: ledger.withdraw(held.idx))

    def release_held(self, progress: ProgressSink) -> None:
        """The run goes on after all: rows held back by a possible abort are errors after all."""
        self._held.release(partial(self._finish, progress))

    def status(self, record: RowRecord) -> str:
        """The row's status as the output will have it: an answer that fails its check is an error."""
        if record.status != "ok" or self.parser is None:
            return record.status
        verdict = self.parser.judge_stored(record.response_text, record.finish_reason, record.tool_calls)
        return "ok" if verdict.ok else "error"

    async def _ask(self, item: WorkItem) -> tuple[RowRecord, Outcome] | None:
        """The row's request, and its repairs; None if the budget does not allow it."""
        parts = self.parts
        protocol = self._protocol(item.request)
        path = protocol.path(self.request_settings) if item.request.api else self._path
        cap = item.cap
        request = item.request
        try:  # images are read only now, right before the row is sent; without any, no coroutine to pass through
            if request.images:
                request = replace(request, image_inputs=await self.images.load(request.images))
            request_body: dict[str, Any] = protocol.build(request, self.request_settings)
        except (images.ImageError, CallError) as e:  # an image, or a body the protocol cannot build: nothing sent
            error = e if isinstance(e, CallError) else CallError("input", str(e), retryable=False)
            failed = Outcome(None, error, 0, 0.0)
            return _record(item, failed, self._models), failed
        decoder = self.decoders[item.request.api] if item.request.api else self._decoder
        if item.request.body is not None:  # a Batch line streams if its body (or the job) says so
            decoder = replace(decoder, stream=request_body.get("stream") is True)

        log = AttemptLog(parts.watched)

        def begin() -> Awaitable[None]:  # the ledger's own coroutine, awaited by the caller: no layer of its own
            log.start()
            return parts.ledger.begin(item.idx)

        def on_error(error: CallError) -> None:
            parts.watch.on_error(error)
            log.note(error.error_class, error.status)
            parts.observe_limits()

        async def send(body: dict[str, Any], extra_tokens: int, first: bool) -> Outcome | None:
            prompt_estimate = item.prompt_estimate + extra_tokens
            held = await self.budget.reserve(prompt_estimate, cap)
            if held is None:
                return None
            outcome = await call_with_retries(
                parts.transport,
                parts.admission,
                path,
                body,
                decoder,
                item.estimate + extra_tokens,
                self._max_attempts,
                on_error,
                before_first_send=begin if first else _nothing,
                rest=parts.rest,
                encode=protocol.encode,
            )
            reply = outcome.reply
            if reply is None:
                self.budget.settle(held, prompt_estimate, 0, 0)  # no answer: nothing paid
            else:
                log.note(OK)
                parts.observe_limits()
                self.budget.settle(
                    held,
                    prompt_estimate,
                    reply.prompt_tokens,
                    reply.completion_tokens,
                    len(reply.images) + len(reply.image_urls),
                    reply.cached_tokens,
                )
            return outcome

        async def follow_up(answer: str, message: str) -> Outcome | None:
            repairing = cast(Repairing, protocol)  # repair_attempts is refused for the others (app/checks.py)
            body = repairing.repair_body(request_body, answer, message)
            return await send(body, prompt_tokens_estimate(len(answer) + len(message)), first=False)

        outcome = await send(request_body, 0, first=True)
        if outcome is None:
            return None
        self.requested += 1
        if outcome.error is not None:
            explain_native_rejection(outcome.error, self.request_settings)
        if outcome.reply is not None and outcome.reply.image_urls:
            outcome = await self._download_images(outcome)
        repairs = 0
        if self.parser is not None and self._repair_attempts:
            outcome, repairs = await ask_with_repairs(outcome, self.parser, self._repair_attempts, follow_up)
        record = _record(item, outcome, self._models)
        record.repairs = repairs
        record.started_at, record.attempt_log = log.started_at, log.text()
        if outcome.reply is not None and outcome.reply.images:
            saved = await anyio.to_thread.run_sync(
                images.save_images, outcome.reply.images, self.job.images_dir, item.row_id
            )
            record.image_paths = orjson.dumps(saved).decode()
        return record, outcome

    async def _download_images(self, outcome: Outcome) -> Outcome:
        """Images answered as links, fetched like image inputs; one that fails ends the row as `image_download`
        (retried by --retry-failed: such links expire)."""
        reply = cast(Reply, outcome.reply)
        try:
            for url in reply.image_urls:
                mime, data = await self.images.download(url, answered=True)
                reply.images.append(ImageOut(mime, data))
        except images.ImageError as e:
            return replace(outcome, reply=None, error=CallError("image_download", str(e), retryable=False))
        return outcome

    def _protocol(self, request: Request) -> WireProtocol:
        """The job's protocol, or the one an OpenAI Batch line's url names."""
        return protocol_for(request.api) if request.api else self.protocol


def open_transport(job: Job, base_url: str, concurrency: int) -> Transport:
    """The HTTP client every engine sends a job's rows with (one per process): the job's keys in its
    protocol's headers (one set per key: flow/keys.py), its timeouts and answer caps. Closed with `aclose`."""
    spec = job.spec
    protocol = protocol_for(spec.provider.api)
    headers = [protocol.headers(key) for _, key in job.api_keys()]
    return Transport(base_url, headers, spec.run.timeout_s, concurrency, AnswerCaps.of(spec.run))


def _record(item: WorkItem, outcome: Outcome, models: dict[str, str]) -> RowRecord:
    """The row as stored; the answer's texts masked like every message (the model may echo a key in the prompt).

    `models`: model names already masked, by name as answered.
    """
    reply, error = outcome.reply, outcome.error
    calls = redact(orjson.dumps(reply.tool_calls).decode()) if reply and reply.tool_calls else None
    note = "; ".join(reply.notes) if reply and reply.notes else None  # an ok row's `error` says what was odd
    model = reply.model if reply else None
    if model and (masked := models.get(model)) is None and len(models) < MODEL_NAMES:
        masked = models[model] = redact(model)
    return RowRecord(
        idx=item.idx,
        row_id=item.row_id,
        status="ok" if reply is not None else "error",
        response_text=redact(reply.text) if reply and reply.text else None,
        tool_calls=calls,
        finish_reason=reply.finish_reason if reply else None,
        model=(masked or redact(model)) if model else None,
        prompt_tokens=reply.prompt_tokens if reply else None,
        completion_tokens=reply.completion_tokens if reply else None,
        latency_s=round(outcome.latency_s, 4),
        attempts=outcome.attempts,
        error_class=error.error_class if error else None,
        error=str(error) if error else note,
        finished_at=time.time(),
        request_hash=item.request_hash,
        answer=_kept_answer(reply),
        cached_tokens=reply.cached_tokens if reply else None,
    )


def _internal_error(item: WorkItem, e: Exception) -> RowRecord:
    """An exception nobody foresaw in this row's work, as the row's result (masked, like every message)."""
    message = redact(f"internal: {type(e).__name__}: {e}")[:2000]
    failed = RowRecord(
        item.idx, item.row_id, "error", None, None, None, None, None, None, None, 0, "internal", message, time.time()
    )
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


async def _next_item(receive: MemoryObjectReceiveStream[WorkItem]) -> WorkItem | None:
    """The next row once one comes, None at the end."""
    try:
        return await receive.receive()
    except anyio.EndOfStream:
        return None


def _input_error(idx: int, row_id: str, message: str) -> RowRecord:
    return RowRecord(idx, row_id, "error", None, None, None, None, None, None, None, 0, "input", message, time.time())

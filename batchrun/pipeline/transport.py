"""HTTP to the relay: attempts, retries with backoff, over the lean HTTP/1.1 client of pipeline/http.py.

`Transport.attempt` makes one POST, reads the answer (a JSON body or a stream,
told apart by its first byte) and turns every failure into a `CallError`;
`call_with_retries` is the per-row attempt loop of docs/protocol.md §6.
"""

from __future__ import annotations

import random
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import anyio
import orjson

from batchrun.base.redaction import excerpt
from batchrun.base.stops import StopRule
from batchrun.flow.limits import backoff_s, pushed_back
from batchrun.job.spec import RunSpec
from batchrun.pipeline import http
from batchrun.pipeline.seams import Admission
from batchrun.protocols import CallError, Decoder, Reply, StreamAnswer
from batchrun.protocols.relay_errors import from_body, from_response, quota_left
from batchrun.protocols.shared import json_body
from batchrun.protocols.sse import SSEParser, too_large


class Transport:
    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | Sequence[Mapping[str, str]],
        timeout_s: float,
        concurrency: int,
        caps: AnswerCaps | None = None,
    ) -> None:
        """`headers`: the protocol's own, sent with every request: its auth scheme (`protocol.headers(key)`);
        or one such set per key (flow/keys.py), each attempt saying which by its place."""
        self.timeout_s = timeout_s
        self.caps = caps or DEFAULT_CAPS
        base_url = base_url.rstrip("/")
        sets = [headers] if isinstance(headers, Mapping) else list(headers)
        self._key_headers = [http.header_lines(dict(h)) for h in sets]
        # docs/protocol.md §6.4: nothing may be quiet for timeout_s; a whole answer must come within timeout_s,
        # a stream within answer_timeout_s; a connection within 10 s.
        self._connections = http.Connections(base_url, concurrency, min(10.0, timeout_s), _env_proxy(base_url))

    async def attempt(
        self, path: str, body: bytes, decoder: Decoder, content_type: str | None = None, key: int = 0
    ) -> Reply:
        """One POST and its answer, with the `key`-th key; every failure becomes a CallError (key redacted).

        This is the protocol boundary: whatever the relay sends, and whatever a decoder makes of it, ends here
        as a Reply or a CallError; an exception nobody foresaw is an `internal` error of this row, not a crash.
        """
        try:
            return await self._exchange(path, body, decoder, content_type or http.JSON, key)
        except CallError:
            raise
        except http.CannotConnect as e:
            raise CallError("connection", CANNOT_CONNECT + str(e)) from None
        except http.Deadline:
            raise self._deadline_error(decoder.stream) from None
        except http.Quiet as e:
            raise CallError("timeout", f"timeout: {e} (run.timeout_s)") from None
        except http.ConnectTimeout as e:
            raise CallError("timeout", f"timeout: {e}") from None
        except http.Broken as e:
            raise CallError("connection", f"connection: {e}") from None
        except Exception as e:  # a shape no decoder foresaw: this row's error, not the run's (not retried)
            raise CallError("internal", f"internal: {type(e).__name__}: {e}", retryable=False) from None

    async def _exchange(self, path: str, body: bytes, decoder: Decoder, content_type: str, key: int) -> Reply:
        """`content_type`: the body's (JSON, or a multipart form)."""
        connections = self._connections
        head = connections.request_head(path, self._key_headers[key], content_type, len(body))
        total_s = self.caps.answer_timeout_s if decoder.stream else self.timeout_s
        answer = await connections.post(head, body, total_s, self.timeout_s)
        try:
            headers = answer.headers
            if answer.status >= 300:
                raise from_response(answer.status, await answer.read_at_most(ERROR_BODY_BYTES), headers)
            try:
                reader = AnswerReader(decoder, self.caps.max_answer_bytes)
                await answer.read_into(reader.feed)
                reply = reader.reply()
            except CallError as e:
                e.request_id = e.request_id or headers.get("x-oneapi-request-id")
                raise
            if _QUOTA_HEADERS.intersection(headers):
                reply.quota = quota_left(headers)
            if decoder.keep_answer:
                reply.request_id = headers.get("x-oneapi-request-id") or headers.get("x-request-id")
            return reply
        finally:
            answer.release()

    def _deadline_error(self, stream: bool) -> CallError:
        if stream:
            limit, knob = self.caps.answer_timeout_s, "run.answer_timeout_s"
        else:
            limit, knob = self.timeout_s, "run.timeout_s"
        return CallError("timeout", f"timeout: no complete answer within {limit:g} s ({knob})")

    async def aclose(self) -> None:
        await self._connections.aclose()


CANNOT_CONNECT = "connection: cannot connect to "  # the relay was not reached at all (runner says so at once)
FLAT_PUSHBACK_RETRIES = 2
PUSHBACKS_EXCUSED = 20  # a row's push-backs that use up no attempt (at most ~10 minutes of its growing back-off)
_QUOTA_HEADERS = {"x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"}


def _env_proxy(base_url: str) -> str | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY, read once, as urllib reads them."""
    parts = urllib.parse.urlsplit(base_url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


ERROR_BODY_BYTES = 1 << 20  # an error body is read this far: enough for any error message, and no more


@dataclass(frozen=True)
class AnswerCaps:
    """How much of one answer is read, and for how long (run.max_answer_mb, run.answer_timeout_s)."""

    max_answer_bytes: int
    answer_timeout_s: float

    @classmethod
    def of(cls, run: RunSpec) -> AnswerCaps:
        return cls(int(run.max_answer_mb * 2**20), run.answer_timeout_s)


DEFAULT_CAPS = AnswerCaps.of(RunSpec())  # the job file's defaults: they are written once, there


_BLANK = b" \t\r\n\xef\xbb\xbf"  # whitespace and a UTF-8 BOM
_SSE_STARTS = b"de:ir"  # data, event, a comment, id, retry


async def read_answer(
    chunks: AsyncIterator[bytes], decoder: Decoder, limit: int = DEFAULT_CAPS.max_answer_bytes
) -> Reply:
    """The answer in `chunks`, read by an `AnswerReader`."""
    reader = AnswerReader(decoder, limit)
    async for chunk in chunks:
        reader.feed(chunk)
    return reader.reply()


class AnswerReader:
    """An answer read as it arrives, framed by its first non-blank byte whatever the Content-Type (§4.3, §7
    item 22): `{` one whole JSON answer, `[` a JSON array of stream events, else server-sent events.

    `feed` takes each piece of the body (pipeline/http.py calls it as the bytes come in, with no pass through
    the event loop a piece), `reply` the answer once the body ended. At most `limit` bytes are held: of a JSON
    body, of one stream line, and of a stream's answer put together (a stream's keep-alives and event wrappers
    are not held, so they do not count; answer_timeout_s ends them).
    """

    def __init__(self, decoder: Decoder, limit: int = DEFAULT_CAPS.max_answer_bytes) -> None:
        self._decoder = decoder
        self._limit = limit
        self._body = bytearray()  # the leading blank space, then all of a JSON body
        self._first = b""  # the first non-blank byte, once seen
        self._stream: StreamAnswer | None = None
        self._events: SSEParser | None = None

    def feed(self, chunk: bytes) -> None:
        if self._events is not None:
            self._add(self._events.feed(chunk))
            return
        self._body += chunk
        if not self._first:
            self._first = bytes(self._body.lstrip(_BLANK)[:1])
            if not self._first:
                if len(self._body) > self._limit:
                    raise too_large(self._limit, "the answer's leading blank space")
                return
            if self._first not in b"{[" and self._first in _SSE_STARTS:
                self._stream = self._decoder.new_stream()
                self._events = SSEParser(max_line=self._limit)
                head, self._body = bytes(self._body), bytearray()
                self._add(self._events.feed(head), checked=False)
                return
        if len(self._body) > self._limit:
            raise too_large(self._limit, "the answer")

    def _add(self, events: list[str], checked: bool = True) -> None:
        stream = cast(StreamAnswer, self._stream)
        for data_text in events:
            _event(stream, data_text)
        if checked and stream.size > self._limit:
            raise too_large(self._limit, "the streamed answer")

    def reply(self) -> Reply:
        """The answer, once its body ended."""
        decoder = self._decoder
        if self._events is not None:
            self._add(self._events.close(), checked=False)
            return _streamed_reply(cast(StreamAnswer, self._stream), decoder)
        if not self._first:
            raise CallError("malformed", "malformed response: empty body", abort=StopRule.C)
        data = _json(bytes(self._body))
        if self._first == b"{":
            reply = decoder.parse(data)
            if decoder.keep_answer:
                reply.answer = data
            return reply
        if not isinstance(data, list):
            raise CallError("malformed", "malformed response: neither an object nor a stream", abort=StopRule.C)
        if (err := from_body(data)) is not None:  # a Google error wrapped in a one-element array
            raise err
        stream = decoder.new_stream()
        for event in data:
            _add_event(stream, event)
        stream.done()  # a closed array is a whole stream: its `]` is the terminator
        return _streamed_reply(stream, decoder)


def _streamed_reply(stream: StreamAnswer, decoder: Decoder) -> Reply:
    reply = stream.reply()
    if decoder.keep_answer:
        reply.answer = stream.whole()
    return reply


def _json(body: bytes) -> Any:
    """One rule for invalid UTF-8, as in a stream's lines (sse.py): each bad byte becomes U+FFFD."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return orjson.loads(body.decode("utf-8", "replace"))
    except orjson.JSONDecodeError:
        raise CallError("malformed", f"malformed response: not JSON: {excerpt(body)}", abort=StopRule.C) from None


def _event(stream: StreamAnswer, data: str) -> None:
    if data == "[DONE]":
        stream.done()
        return
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise CallError("malformed", f"malformed stream event: not JSON: {excerpt(data)}", abort=StopRule.C) from None
    _add_event(stream, event)


def _add_event(stream: StreamAnswer, event: Any) -> None:
    # An event that is {"error": ...} is that error, whatever the HTTP status said (§2.6).
    if (err := from_body(event)) is not None:
        raise err
    stream.add(event)


@dataclass
class Outcome:
    """How one row's calls ended: a reply, or the last error."""

    reply: Reply | None
    error: CallError | None
    attempts: int
    latency_s: float


def backoff_delay(retries_made: int, error: CallError) -> float:
    """docs/protocol.md §6.1: a server hint wins; else exponential with equal jitter.

    A hint-less push-back (429, 503) is mostly random upstream saturation, and the limiter
    paces everyone if it is a pattern: its first FLAT_PUSHBACK_RETRIES retries wait 0.25-0.5 s,
    not more and more (an unlucky row's growing wait was the slow tail of a whole run).
    """
    if error.retry_hint is not None:
        delay = error.retry_hint + random.uniform(0, 1)
    elif pushed_back(error):
        delay = backoff_s(retries_made - FLAT_PUSHBACK_RETRIES)
    else:
        delay = backoff_s(retries_made)
    return max(delay, error.min_delay)


def may_retry(error: CallError, attempts: int, max_attempts: int) -> bool:
    if not error.retryable or attempts >= max_attempts:
        return False
    return error.max_retries is None or attempts <= error.max_retries


async def call_with_retries(
    transport: Transport,
    limits: Admission,
    path: str,
    body: dict[str, Any],
    decoder: Decoder,
    estimate: int,
    max_attempts: int,
    on_error: Callable[[CallError], None],
    before_first_send: Callable[[], Awaitable[None]],
    rest: Callable[[float], Awaitable[None]] = anyio.sleep,
    encode: Callable[[dict[str, Any]], tuple[bytes, str | None]] = json_body,
) -> Outcome:
    """Attempt until success, a final error, or `max_attempts`.

    `before_first_send` runs once a place is granted, right before the first request
    (the checkpoint's intent record); `on_error` sees every failure (abort rules);
    `rest` waits out the back-off before a retry (the runner lends the row's worker meanwhile);
    `encode` turns the body into bytes and their content type (the protocol's `encode`).
    """
    payload, content_type = encode(body)
    attempts = excused = waited_out = pushbacks = 0
    started = time.monotonic()
    while True:
        try:
            async with limits.slot(estimate, retry=attempts > 0) as ticket:
                attempts += 1
                if attempts == 1:
                    await before_first_send()
                started = time.monotonic()
                try:
                    # With several keys the ticket says which (flow/keys.py); one key rides on the session.
                    key = getattr(ticket, "key", 0)
                    if key:
                        reply = await transport.attempt(path, payload, decoder, content_type, key)
                    else:
                        reply = await transport.attempt(path, payload, decoder, content_type)
                except CallError as e:
                    error = e
                else:
                    limits.succeeded(ticket, _total_tokens(reply), reply.quota)
                    return Outcome(reply, None, attempts, time.monotonic() - started)
        except CallError as gave_up:  # the outage breaker: the relay stayed down too long
            on_error(gave_up)
            return Outcome(None, gave_up, attempts, 0.0)
        limits.failed(ticket, error)
        on_error(error)
        # A failure while the relay looks down, or on a key retired meanwhile, uses up no attempt and starts the
        # back-off afresh. Push-back (docs/backoff.md) is the relay's pace: it uses up no attempt either, but its
        # back-off grows; a row pushed back alone again and again is not the pace: past PUSHBACKS_EXCUSED it counts.
        if limits.excuses(error):
            waited_out += 1
            excused += 1
        elif pushed_back(error):
            pushbacks += 1
            excused += pushbacks <= PUSHBACKS_EXCUSED
        if not may_retry(error, attempts - excused, max_attempts):
            return Outcome(None, error, attempts, time.monotonic() - started)
        await rest(backoff_delay(attempts - 1 - waited_out, error))


def _total_tokens(reply: Reply) -> int | None:
    if reply.prompt_tokens is None and reply.completion_tokens is None:
        return None
    return (reply.prompt_tokens or 0) + (reply.completion_tokens or 0)

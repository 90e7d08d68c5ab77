"""Streams as the relay writes them: SSE events, `: PING` keepalives, and on demand the
framing variants, cuts and stalls a client must survive (docs/protocol.md §2.6, §6.4, §7 items 9-11 and 22).

A directive in the prompt picks a variant, e.g. `[[emulator: sse-crlf]]` or
`[[emulator: stream-cut x 1]]` (see faults.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

DONE = "[DONE]"
# Failures: content without its finish and terminator; a finish-less but tidy ending; a silent pause.
STREAM_FAULTS = {"stream-cut", "stream-cut-tidy", "stall"}
FRAMINGS = {
    "sse-crlf",  # CRLF line ends, each event's first CRLF split across two writes
    "sse-cr",  # lone CR line ends
    "sse-nospace",  # `data:x` without the space
    "sse-multiline",  # each event's JSON over several `data:` lines
    "sse-split-utf8",  # each event written in two pieces, cut inside a UTF-8 character
    "sse-no-final-blank",  # the last event ends the body without its line end
    "sse-fields",  # `event:`, `id:`, `retry:` fields and comments around each event
    "sse-big",  # the first event padded past 3 MB on one line
    "json-array",  # no SSE at all: one JSON array of the events (Google's stream without alt=sse)
}
_BIG_PADDING = 3 * 1024 * 1024


@dataclass
class StreamSettings:
    ping_s: float | None = 10.0  # `: PING` interval on OpenAI-format streams (the relay's is about 10 s)
    stall_s: float = 3.0  # how long a `stall` pauses
    chunk_delay_s: float = 0.0  # between events
    text_pieces: int = 4  # content events per streamed chat answer (`batchrun bench` asks for ~20 events)


def split_text(text: str, parts: int = 4) -> list[str]:
    """Text in up to `parts` consecutive non-empty pieces; none for empty text."""
    if not text:
        return []
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


async def write_stream(
    request: web.Request,
    events: list[Any],
    request_id: str,
    settings: StreamSettings,
    variant: str | None,
    pings: bool,
) -> web.StreamResponse:
    headers = {"X-Oneapi-Request-Id": request_id}
    if variant == "json-array":
        body = orjson.dumps([e for e in events if e != DONE])
        return web.Response(body=body, content_type="application/json", headers=headers)
    events = _apply_fault(events, variant)
    response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream; charset=utf-8"})
    await response.prepare(request)
    lock = asyncio.Lock()  # a ping never lands inside an event
    pinger = asyncio.create_task(_ping(response, lock, settings.ping_s)) if pings and settings.ping_s else None
    try:
        for i, event in enumerate(events):
            if variant == "stall" and i == 1:
                await _stall(request, settings.stall_s)
            async with lock:
                for n, piece in enumerate(_encode(event, variant, first=i == 0, last=i == len(events) - 1)):
                    if n:
                        await asyncio.sleep(0.01)  # so the pieces arrive in separate reads
                    await response.write(piece)
            if settings.chunk_delay_s:
                await asyncio.sleep(settings.chunk_delay_s)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away (its idle timeout, a cancel)
    finally:
        if pinger is not None:
            pinger.cancel()
    return response


def _apply_fault(events: list[Any], variant: str | None) -> list[Any]:
    if variant == "stream-cut":
        first_finish = next((i for i, e in enumerate(events) if _has_finish(e)), len(events))
        return events[: max(1, first_finish)]  # the content so far, then the body just ends
    if variant == "stream-cut-tidy":
        return [_without_finish(e) for e in events]  # usage and [DONE] still come
    return events


def _has_finish(event: Any) -> bool:
    if not isinstance(event, dict):
        return False
    return any(
        c.get("finish_reason") or c.get("finishReason") for c in event.get("choices", event.get("candidates")) or []
    )


def _without_finish(event: Any) -> Any:
    if not isinstance(event, dict):
        return event
    event = dict(event)
    for key in ("choices", "candidates"):
        if key in event:
            event[key] = [
                {k: (None if k == "finish_reason" else v) for k, v in c.items() if k != "finishReason"}
                for c in event[key]
            ]
    return event


def _encode(event: Any, variant: str | None, first: bool, last: bool) -> list[bytes]:
    """One event as the bytes of one or more writes."""
    end = {"sse-crlf": "\r\n", "sse-cr": "\r"}.get(variant or "", "\n")
    sep = ":" if variant == "sse-nospace" else ": "
    if isinstance(event, str):
        lines = [event]
    elif variant == "sse-multiline":
        lines = orjson.dumps(event, option=orjson.OPT_INDENT_2).decode().split("\n")
    else:
        if variant == "sse-big" and first:
            event = {**event, "padding": "x" * _BIG_PADDING}
        lines = [orjson.dumps(event).decode()]
    text = "".join(f"data{sep}{line}{end}" for line in lines)
    if variant == "sse-fields":
        text = f": an SSE comment{end}event: message{end}id: 7{end}retry: 1000{end}{text}"
    if variant == "sse-no-final-blank" and last:
        data = text.rstrip(end).encode()
    else:
        data = (text + end).encode()
    cut = _cut_point(data, variant)
    return [data[:cut], data[cut:]] if cut else [data]


def _cut_point(data: bytes, variant: str | None) -> int:
    if variant == "sse-crlf":
        return data.find(b"\r") + 1
    if variant == "sse-split-utf8":
        lead = next((i for i, b in enumerate(data) if b >= 0xC0), -1)
        return lead + 1 if lead >= 0 else len(data) // 2
    return 0


async def _ping(response: web.StreamResponse, lock: asyncio.Lock, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        async with lock:
            try:
                await response.write(b": PING\n\n")
            except ConnectionResetError:
                return


async def _stall(request: web.Request, seconds: float) -> None:
    """Silence mid-stream (pings go on); ends early once the client has hung up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError
        await asyncio.sleep(0.05)

"""Server-sent events, parsed incrementally from arbitrary network reads (docs/protocol.md §2.6).

Reads may end anywhere: inside a line, between the CR and LF of a CRLF, or in
the middle of a UTF-8 character. Lines are cut on LF, CRLF or a lone CR and
decoded only once complete, so none of that matters. Only `data` is kept;
comments (`: PING`) and other fields are dropped. A line longer than `max_line`
bytes (one that never ends) stops the answer as `too_large`.
"""

from __future__ import annotations

import re

from batchrun.protocols.relay_errors import CallError

_LINE_END = re.compile(rb"[\r\n]")
_BOM = "\ufeff"


class SSEParser:
    def __init__(self, max_line: int | None = None) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already known to hold no line end
        self._skip_lf = False  # the last line ended with CR: an LF right after it belongs to it
        self._data: list[str] = []
        self._first_line = True

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event this chunk completes, in order."""
        self._buffer += chunk
        events: list[str] = []
        if not self._skip_lf and b"\r" not in chunk:  # lines end in LF alone, as nearly every relay's do
            self._feed_lf(events, len(chunk))
            return events
        start = 0
        while True:
            if self._skip_lf and start < len(self._buffer):
                self._skip_lf = False
                if self._buffer[start] == 0x0A:
                    start += 1
                    continue
            m = _LINE_END.search(self._buffer, max(start, self._scanned))
            if m is None:
                break
            self._line(bytes(self._buffer[start : m.start()]), events)
            self._skip_lf = m.group() == b"\r"
            start = m.end()
        del self._buffer[:start]
        self._scanned = len(self._buffer)
        if self._max_line is not None and self._scanned > self._max_line:
            raise too_large(self._max_line, "one line of the stream")
        return events

    def _feed_lf(self, events: list[str], new: int) -> None:
        """`feed` when the buffer holds no CR: its complete lines split and decoded at once, not one by one
        (the same text: an LF is never part of a UTF-8 character, so each line decodes as it would alone)."""
        end = self._buffer.rfind(b"\n", len(self._buffer) - new)  # the bytes before held no line end
        if end >= 0:
            text = self._buffer[:end].decode("utf-8", "replace")
            del self._buffer[: end + 1]
            if self._first_line:
                self._first_line = False
                text = text.removeprefix(_BOM)
            for line in text.split("\n"):
                if not line:
                    self._dispatch(events)
                elif line[0] != ":":  # not a comment, such as the relay's ": PING" keepalive
                    name, _, value = line.partition(":")
                    if name == "data":
                        self._data.append(value[1:] if value[:1] == " " else value)
        self._scanned = len(self._buffer)
        if self._max_line is not None and self._scanned > self._max_line:
            raise too_large(self._max_line, "one line of the stream")

    def close(self) -> list[str]:
        """At the end of the body: the last line and event, even without their blank line."""
        events: list[str] = []
        if self._buffer:
            self._line(bytes(self._buffer), events)
            self._buffer.clear()
        self._dispatch(events)
        return events

    def _line(self, raw: bytes, events: list[str]) -> None:
        line = raw.decode("utf-8", "replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            self._dispatch(events)
            return
        if line.startswith(":"):
            return  # a comment, such as the relay's ": PING" keepalive
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))

    def _dispatch(self, events: list[str]) -> None:
        if self._data:
            events.append("\n".join(self._data))
            self._data = []


def stream_cut(missing: str) -> CallError:
    """A stream that ended before it was complete: a failed attempt, retried whole (§6.4)."""
    return CallError("incomplete_stream", f"the server cut the stream before it finished ({missing})")


def too_large(limit: int, what: str) -> CallError:
    """The answer passed run.max_answer_mb: reading stops; not retried (the same request brings the same answer)."""
    return CallError(
        "too_large",
        f"too large: {what} passed {limit / 2**20:g} MB (run.max_answer_mb); stopped reading it",
        retryable=False,
    )

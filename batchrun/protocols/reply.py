"""A successful answer, in protocol-neutral terms."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from batchrun.base.redaction import excerpt
from batchrun.base.stops import StopRule
from batchrun.protocols.relay_errors import CallError, QuotaLeft

MAX_TOKEN_COUNT = 100_000_000  # far above any one answer's usage: larger is a relay's mistake, not a count


def decode_base64(text: str) -> bytes:
    """Base64 in the standard or the URL-safe alphabet (Google's SDK sends URL-safe), padding optional.

    Raises binascii.Error when it is neither."""
    text = "".join(text.split())
    if "-" in text or "_" in text:
        if "+" in text or "/" in text:
            raise binascii.Error("mixed base64 alphabets")
        text = text.translate(_URL_SAFE)
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


_URL_SAFE = str.maketrans("-_", "+/")


class ImageOut(NamedTuple):
    """A generated image as returned: its MIME type and bytes."""

    mime: str
    data: bytes


@dataclass
class Reply:
    text: str | None
    finish_reason: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of prompt_tokens, read from the provider's prompt cache (billed lower)
    tool_calls: list[dict[str, str]] = field(default_factory=list)  # each {name, arguments}
    images: list[ImageOut] = field(default_factory=list)  # in answer order; the last one is the final image
    image_urls: list[str] = field(default_factory=list)  # images answered as links: downloaded before saving
    notes: list[str] = field(default_factory=list)  # what was wrong with an answer kept anyway (odd usage)
    quota: QuotaLeft | None = None  # x-ratelimit-* of the answer, for the limiter
    # Only when the decoder keeps answers (output.openai_batch): the body as received (a stream
    # reassembled into the whole answer it stands for) and the relay's request id.
    answer: Any = None
    request_id: str | None = None


def token_count(value: Any, name: str, notes: list[str]) -> int | None:
    """A usage count as given, if it is a count; else None and a note (never a crash, a negative cost or 2^70)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    notes.append(f"usage {name} was {excerpt(repr(value), 60)}, not a token count: stored as null")
    return None


def text_field(value: Any, name: str) -> str | None:
    """A string field of the answer (model, finish reason): another type is a malformed answer."""
    if value is None or isinstance(value, str):
        return value
    raise CallError("malformed", f"malformed response: {name} is not a string", abort=StopRule.C)


class StreamAnswer(Protocol):
    """One streamed answer, put together event by event (docs/protocol.md §2.6, §4.3)."""

    size: int  # characters of text and bytes of images kept so far: what run.max_answer_mb bounds

    def add(self, event: Any) -> None:
        """One parsed JSON event; raises CallError for in-band failures (a blocked prompt)."""

    def done(self) -> None:
        """The stream's `[DONE]` marker arrived."""

    def reply(self) -> Reply:
        """At the end of the body: the answer, or CallError if the stream was cut short."""

    def whole(self) -> dict[str, Any]:
        """After `reply`: the whole answer the stream stands for, as the API would have sent it unstreamed."""


@dataclass(frozen=True)
class Decoder:
    """How one job reads answers: a whole JSON body, or a stream of events."""

    parse: Callable[[Any], Reply]
    new_stream: Callable[[], StreamAnswer]
    stream: bool  # the job asked for a stream: no whole-attempt timeout, only the idle one
    keep_answer: bool = False  # put the answer body (and request id) on the Reply, for output.openai_batch

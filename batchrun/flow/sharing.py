"""Never pay twice: identical requests within a job are sent once and the answer shared.

Within a job every body is built from the row's rendered request (system, user,
image values) and the same settings, so the rendered request identifies the body
(images are loaded at send time). While one row's request is in
flight, rows with the same body wait for it; afterwards its answer stays in a
bounded LRU, so memory does not grow with the input. Only successful answers
are shared: after an error the next identical row asks for itself.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

import anyio
import orjson

from batchrun.job.render import Request
from batchrun.ledger.checkpoint import RowRecord

RECENT_ANSWERS = 4096


def request_key(request: Request) -> bytes:
    """Identifies the request: rendered text and image values, the conversation, or a Batch line's url and body."""
    what: list[object] = [request.system, request.user, list(request.images)]
    if request.messages:
        what.append([[turn.role, turn.parts, turn.plain] for turn in request.messages])
    if request.body is not None:
        what += [request.api, request.body]
    text = orjson.dumps(what, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(text, digest_size=16).digest()


class SharedAnswers:
    def __init__(self, capacity: int = RECENT_ANSWERS) -> None:
        self._capacity = capacity
        self._answers: OrderedDict[bytes, RowRecord] = OrderedDict()
        # Keys whose request is in flight; the event is made only once a row waits for it (most never do).
        self._in_flight: dict[bytes, anyio.Event | None] = {}
        self.shared = 0  # rows answered by another row's request, this run

    async def find(self, key: bytes, idx: int, row_id: str) -> RowRecord | None:
        """This row's record from an identical request's answer, waiting while one is in flight."""
        while key in self._in_flight:
            event = self._in_flight[key]
            if event is None:
                event = self._in_flight[key] = anyio.Event()
            await event.wait()
        source = self._answers.get(key)
        if source is None:
            return None
        self._answers.move_to_end(key)
        self.shared += 1
        return replace(
            source,
            idx=idx,
            row_id=row_id,
            prompt_tokens=None,  # nothing was paid for this row
            completion_tokens=None,
            latency_s=0.0,
            attempts=0,
            repairs=0,
            shared_from=source.row_id,
            finished_at=time.time(),
            started_at=None,  # nothing was sent
            attempt_log=None,
        )

    def leading(self, key: bytes) -> Leading:
        """Marks `key` in flight (call `find` first, with no await in between); entered, gives `publish(record)`."""
        return Leading(self, key)


class Leading:
    """A row leads its key: identical rows wait for its answer. A class rather than a generator: one per row."""

    __slots__ = ("_shared", "_key")

    def __init__(self, shared: SharedAnswers, key: bytes) -> None:
        self._shared = shared
        self._key = key

    def __enter__(self) -> Callable[[RowRecord], None]:
        self._shared._in_flight[self._key] = None
        return self.publish

    def publish(self, record: RowRecord) -> None:
        if record.status == "ok":
            answers = self._shared._answers
            answers[self._key] = record
            if len(answers) > self._shared._capacity:
                answers.popitem(last=False)

    def __exit__(self, *exc_info: object) -> None:
        event = self._shared._in_flight.pop(self._key)
        if event is not None:
            event.set()

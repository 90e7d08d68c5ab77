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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import anyio
import orjson

from batchrun.checkpoint import RowRecord
from batchrun.render import Request

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
        self._in_flight: dict[bytes, anyio.Event] = {}
        self.shared = 0  # rows answered by another row's request, this run

    async def find(self, key: bytes, idx: int, row_id: str) -> RowRecord | None:
        """This row's record from an identical request's answer, waiting while one is in flight."""
        while (event := self._in_flight.get(key)) is not None:
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

    @contextmanager
    def leading(self, key: bytes) -> Iterator[Callable[[RowRecord], None]]:
        """Marks `key` in flight (call `find` first, with no await in between); yields `publish(record)`."""
        event = anyio.Event()
        self._in_flight[key] = event

        def publish(record: RowRecord) -> None:
            if record.status == "ok":
                self._answers[key] = record
                if len(self._answers) > self._capacity:
                    self._answers.popitem(last=False)

        try:
            yield publish
        finally:
            del self._in_flight[key]
            event.set()

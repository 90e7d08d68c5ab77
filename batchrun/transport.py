"""HTTP to the relay: one shared httpx client, attempts, retries with backoff.

`Transport.attempt` makes one POST and turns every network failure into a
`CallError`; `call_with_retries` is the per-row attempt loop of PROTOCOL.md §6.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import orjson

from batchrun.limits import Limits, backoff_s
from batchrun.protocols import CallError, Reply
from batchrun.protocols.relay_errors import from_response


class Transport:
    def __init__(self, base_url: str, api_key: str, timeout_s: float, concurrency: int) -> None:
        self.api_key = api_key
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            follow_redirects=False,
        )

    async def attempt(self, path: str, body: bytes, parse: Callable[[Any], Reply]) -> Reply:
        try:
            response = await self._client.post(path, content=body)
        except httpx.TimeoutException as e:
            raise self._network_error("timeout", e) from None
        except httpx.HTTPError as e:
            raise self._network_error("connection", e) from None
        if response.status_code >= 300:
            raise from_response(response.status_code, response.content, response.headers)
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            excerpt = " ".join(response.text[:200].split())
            raise CallError("malformed", f"malformed response: not JSON: {excerpt}", abort="C") from None
        try:
            return parse(data)
        except CallError as e:
            e.request_id = e.request_id or response.headers.get("x-oneapi-request-id")
            raise

    def _network_error(self, error_class: str, e: Exception) -> CallError:
        # httpx messages may echo URLs or headers: CallError masks the key in them.
        detail = str(e) or type(e).__name__
        return CallError(error_class, f"{error_class}: {detail}")

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass
class Outcome:
    """How one row's calls ended: a reply, or the last error."""

    reply: Reply | None
    error: CallError | None
    attempts: int
    latency_s: float


def backoff_delay(retries_made: int, error: CallError) -> float:
    """PROTOCOL.md §6.1: a server hint wins; else exponential with equal jitter."""
    if error.retry_hint is not None:
        delay = error.retry_hint + random.uniform(0, 1)
    else:
        delay = backoff_s(retries_made)
    return max(delay, error.min_delay)


def may_retry(error: CallError, attempts: int, max_attempts: int) -> bool:
    if not error.retryable or attempts >= max_attempts:
        return False
    return error.max_retries is None or attempts <= error.max_retries


async def call_with_retries(
    transport: Transport,
    limits: Limits,
    path: str,
    body: dict[str, Any],
    parse: Callable[[Any], Reply],
    estimate: int,
    max_attempts: int,
    on_error: Callable[[CallError], None],
    before_first_send: Callable[[], Awaitable[None]],
) -> Outcome:
    """Attempt until success, a final error, or `max_attempts`.

    `before_first_send` runs once a place is granted, right before the first request
    (the checkpoint's intent record); `on_error` sees every failure (abort rules).
    """
    payload = orjson.dumps(body)
    attempts = excused = 0
    started = time.monotonic()
    while True:
        try:
            async with limits.slot(estimate) as ticket:
                attempts += 1
                if attempts == 1:
                    await before_first_send()
                started = time.monotonic()
                try:
                    reply = await transport.attempt(path, payload, parse)
                except CallError as e:
                    error = e
                else:
                    limits.succeeded(ticket, _total_tokens(reply))
                    return Outcome(reply, None, attempts, time.monotonic() - started)
        except CallError as gave_up:  # the outage breaker: the relay stayed down too long
            on_error(gave_up)
            return Outcome(None, gave_up, attempts, 0.0)
        limits.failed(ticket, error)
        on_error(error)
        excused += limits.excuses(error)
        if not may_retry(error, attempts - excused, max_attempts):
            return Outcome(None, error, attempts, time.monotonic() - started)
        await anyio.sleep(backoff_delay(attempts - 1 - excused, error))


def _total_tokens(reply: Reply) -> int | None:
    if reply.prompt_tokens is None and reply.completion_tokens is None:
        return None
    return (reply.prompt_tokens or 0) + (reply.completion_tokens or 0)

"""HTTP to the relay: one shared aiohttp session, attempts, retries with backoff.

aiohttp rather than httpx: on `batchrun bench` a bare loop over httpx's pool
managed about 500 requests/s at concurrency 64 (and fell further as concurrency
rose), aiohttp over 11,000 on the same machine (README, Performance).

`Transport.attempt` makes one POST and turns every network failure into a
`CallError`; `call_with_retries` is the per-row attempt loop of PROTOCOL.md §6.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import orjson

from batchrun.limits import Limits
from batchrun.protocols import CallError, Reply
from batchrun.protocols.relay_errors import from_response

BACKOFF_CAP_S = 60.0


class Transport:
    def __init__(self, base_url: str, api_key: str, timeout_s: float, concurrency: int) -> None:
        self.api_key = api_key
        self._base_url = base_url.rstrip("/")
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        # PROTOCOL.md §6.4: connect within min(10 s, timeout_s); the whole attempt within timeout_s.
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=concurrency),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._proxy = _env_proxy(self._base_url)

    async def attempt(self, path: str, body: bytes, parse: Callable[[Any], Reply]) -> Reply:
        try:
            async with self._session.post(
                self._base_url + path, data=body, allow_redirects=False, proxy=self._proxy
            ) as response:
                status, content, headers = response.status, await response.read(), response.headers
        except asyncio.TimeoutError as e:  # aiohttp's timeouts, on Python 3.10 too
            raise self._network_error("timeout", e) from None
        except aiohttp.ClientError as e:
            raise self._network_error("connection", e) from None
        if status >= 300:
            raise from_response(status, content, headers).redacted(self.api_key)
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            excerpt = " ".join(content[:200].decode("utf-8", "replace").split())
            raise CallError("malformed", f"malformed response: not JSON: {excerpt}", abort="C").redacted(
                self.api_key
            ) from None
        try:
            return parse(data)
        except CallError as e:
            e.request_id = e.request_id or headers.get("x-oneapi-request-id")
            raise e.redacted(self.api_key) from None

    def _network_error(self, error_class: str, e: Exception) -> CallError:
        # aiohttp messages may echo URLs; the key is redacted all the same.
        detail = str(e) or type(e).__name__
        return CallError(error_class, f"{error_class}: {detail}").redacted(self.api_key)

    async def aclose(self) -> None:
        await self._session.close()


def _env_proxy(base_url: str) -> str | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY, read once: aiohttp's `trust_env` reads them in a thread per request."""
    parts = urllib.parse.urlsplit(base_url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


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
        d = min(BACKOFF_CAP_S, 2.0**retries_made)
        delay = d / 2 + random.uniform(0, d / 2)
    return max(delay, error.min_delay)


def may_retry(error: CallError, attempts: int, max_attempts: int) -> bool:
    if not error.retryable or attempts >= max_attempts:
        return False
    return error.max_retries is None or attempts <= error.max_retries


PUSHBACK_CLASSES = {"rate_limited"}


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
    attempts = 0
    while True:
        attempts += 1
        async with limits.slot(estimate) as charge:
            if attempts == 1:
                await before_first_send()
            started = time.monotonic()
            try:
                reply = await transport.attempt(path, payload, parse)
            except CallError as e:
                error = e
            else:
                limits.correct(charge, _total_tokens(reply))
                limits.on_success()
                return Outcome(reply, None, attempts, time.monotonic() - started)
        if error.error_class in PUSHBACK_CLASSES or error.status == 503:
            limits.on_pushback(error.retry_hint)
        on_error(error)
        if not may_retry(error, attempts, max_attempts):
            return Outcome(None, error, attempts, time.monotonic() - started)
        await anyio.sleep(backoff_delay(attempts - 1, error))


def _total_tokens(reply: Reply) -> int | None:
    if reply.prompt_tokens is None and reply.completion_tokens is None:
        return None
    return (reply.prompt_tokens or 0) + (reply.completion_tokens or 0)

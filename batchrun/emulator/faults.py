"""Faults the emulator can answer with, chosen per request.

A prompt may carry a directive `[[emulator: FAULT]]` (every request with that
prompt fails) or `[[emulator: FAULT x N]]` (its first N requests fail, later
ones succeed), so a test can make exactly the rows it wants fail. `bench` and
soak runs pick faults at a seeded random rate instead (`EmulatorConfig.fault_rates`).

Most faults are an error answer (`fault_response`); a few are behaviour
(`enact`: drop the connection, cut the body, stall). `RequestWindow` is the
relay's own per-key request limit.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from batchrun.emulator.gemini import GEMINI_FAULTS
from batchrun.emulator.streams import FRAMINGS, STREAM_FAULTS

_DIRECTIVE = re.compile(r"\[\[emulator:\s*([a-z0-9_\-]+)(?:\s*x\s*(\d+))?\s*\]\]")


@dataclass(frozen=True)
class Directive:
    fault: str
    times: int | None  # None: always


def directive_in(text: str) -> Directive | None:
    m = _DIRECTIVE.search(text)
    if m is None:
        return None
    return Directive(m.group(1), int(m.group(2)) if m.group(2) else None)


def relay_error(
    status: int, message: str, code: str | int, request_id: str, kind: str = "new_api_error"
) -> dict[str, Any]:
    return {"error": {"message": f"{message} (request id: {request_id})", "type": kind, "code": code}}


def json_response(
    status: int, body: dict[str, Any] | list[Any], request_id: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"X-Oneapi-Request-Id": request_id, **(headers or {})},
    )


# fault name -> (status, message, code, extra headers)
_ERRORS: dict[str, tuple[int, str, str | int, dict[str, str]]] = {
    "429": (429, "您的请求数限制已达到上限，请稍后再试", "", {}),
    "429-retry-after": (429, "Rate limit reached for requests", "rate_limit_exceeded", {"Retry-After": "1"}),
    "429-retry-after-ms": (429, "Rate limit reached for requests", "rate_limit_exceeded", {"retry-after-ms": "700.5"}),
    # Only the requests group is exhausted: the tokens group's long reset must be ignored.
    "429-ratelimit-headers": (
        429,
        "Rate limit reached for requests",
        "rate_limit_exceeded",
        {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "200000",
            "x-ratelimit-remaining-tokens": "15800",
            "x-ratelimit-reset-tokens": "6m0s",
        },
    ),
    "429-quota": (429, "You exceeded your current quota", "insufficient_quota", {}),
    "401": (401, "无效的令牌", "", {}),
    "403-quota": (403, "用户额度不足, 剩余额度: $0.000000", "insufficient_user_quota", {}),
    "413": (413, "request body too large", "", {}),
    "500": (500, "当前分组上游负载已饱和，请稍后再试", "", {}),
    "503": (503, "Service temporarily unavailable", "", {}),
    "504": (504, "upstream timed out", "", {}),
    "empty_response": (500, "empty response from upstream", "empty_response", {}),
    "prompt_blocked": (400, "prompt blocked by upstream safety filter", "prompt_blocked", {}),
    "sensitive_words_detected": (400, "sensitive words detected", "sensitive_words_detected", {}),
    "model_not_found": (404, "model not found", "model_not_found", {}),
}

HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)

# fault name -> (status, RPC status, message, extra fields); answered in Google's shape
_GOOGLE_ERRORS: dict[str, tuple[int, str, str, dict[str, Any]]] = {
    "google-429": (
        429,
        "RESOURCE_EXHAUSTED",
        "Resource has been exhausted (e.g. check quota).",
        {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]},
    ),
    # wrapped in a one-element list
    "google-503-list": (503, "UNAVAILABLE", "The model is overloaded. Please try again later.", {}),
}

ENACTED = {"reset", "reset-mid-body", "hang", "endless"}
# bad_json, fenced_json and prose_json: a 200 whose JSON is cut, fenced or in prose (emulator/chat.py).
ANSWERED = {"502", "malformed", "error-200", "429-date", "echo-key", "bad_json", "fenced_json", "prose_json"}
# A hostile relay's 200s (chat-shaped): what batchrun must take apart without a crash (docs/limits-and-caps.md).
_HOSTILE: dict[str, dict[str, Any]] = {
    "usage-float": {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1.5, "completion_tokens": -3},
    },
    "no-usage": {  # relays that pass on no token counts at all
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    },
    "choices-null": {"choices": None},
    "content-list": {"choices": [{"index": 0, "message": {"content": ["not", "text"]}, "finish_reason": "stop"}]},
    "deep-json": {
        "choices": [{"index": 0, "message": {"content": "[" * 5000 + "]" * 5000}, "finish_reason": "stop"}],
    },
}
ANSWERED |= set(_HOSTILE)
# The answering code enacts the rest itself: stream cuts, stalls and framing variants (streams.py);
# Gemini content outcomes (gemini.py).
FAULTS = set(_ERRORS) | set(_GOOGLE_ERRORS) | ENACTED | ANSWERED | STREAM_FAULTS | FRAMINGS | GEMINI_FAULTS
HANG_S = 600.0  # longer than any client timeout; ends early when the client hangs up


def fault_response(fault: str, request_id: str, authorization: str = "") -> web.Response | None:
    """The HTTP answer for a fault, or None for the faults `enact` plays out."""
    if fault in _ERRORS:
        status, message, code, headers = _ERRORS[fault]
        return json_response(status, relay_error(status, message, code, request_id), request_id, headers)
    if fault in _GOOGLE_ERRORS:
        status, rpc_status, message, extra = _GOOGLE_ERRORS[fault]
        error = {"error": {"code": status, "message": message, "status": rpc_status, **extra}}
        return json_response(status, [error] if fault.endswith("-list") else error, request_id)
    if fault == "429-date":
        # HTTP dates have whole seconds: 2 s ahead is a wait of 1 to 2 s.
        retry_at = email.utils.formatdate(time.time() + 2, usegmt=True)
        body = relay_error(429, "Rate limit reached for requests", "rate_limit_exceeded", request_id)
        return json_response(429, body, request_id, {"Retry-After": retry_at})
    if fault == "echo-key":
        # A badly behaved upstream that repeats the credentials it was sent.
        body = relay_error(500, f"upstream rejected credentials {authorization!r}", "", request_id, "upstream_error")
        return json_response(500, body, request_id)
    if fault in _HOSTILE:
        return json_response(200, {"id": request_id, "model": "gpt-5.4", **_HOSTILE[fault]}, request_id)
    if fault == "502":
        return web.Response(
            status=502, body=HTML_502, content_type="text/html", headers={"X-Oneapi-Request-Id": request_id}
        )
    if fault == "malformed":
        return web.Response(
            status=200,
            body=b'{"choices": [',
            content_type="application/json",
            headers={"X-Oneapi-Request-Id": request_id},
        )
    if fault == "error-200":
        return json_response(
            200,
            relay_error(
                500, "upstream error wrapped in a 200", "bad_response_status_code", request_id, "upstream_error"
            ),
            request_id,
        )
    return None


async def enact(fault: str, request: web.Request, answer: web.Response) -> web.StreamResponse:
    """Play out a fault that is behaviour: `answer` is what a healthy server would have sent."""
    assert request.transport is not None
    if fault == "reset":  # the connection drops before any answer
        request.transport.close()
        return answer
    if fault == "hang":  # stall before the headers
        await asyncio.sleep(HANG_S)
        return answer
    if fault == "endless":  # a stream of content that never ends, until the client hangs up
        endless = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await endless.prepare(request)
        event = {"choices": [{"index": 0, "delta": {"content": "z" * 4000}, "finish_reason": None}]}
        line = b"data: " + orjson.dumps(event) + b"\n\n"
        while request.transport is not None and not request.transport.is_closing():
            await endless.write(line)
        return endless
    # reset-mid-body: the headers and half the body, then the connection drops.
    body = answer.body if isinstance(answer.body, bytes) else b""
    cut = web.StreamResponse(status=answer.status, headers=answer.headers)
    cut.content_length = len(body)
    await cut.prepare(request)
    await cut.write(body[: len(body) // 2])
    request.transport.close()
    return cut


class RequestWindow:
    """The relay's per-key limit: at most `limit` requests in any `window_s`, refused ones counted too
    (as new-api's is) unless `counts_refused` is False.

    Constant work per request: each key keeps only its last `limit` arrival times.
    """

    def __init__(self, limit: int, window_s: float, counts_refused: bool = True) -> None:
        self.limit = limit
        self.window_s = window_s
        self.counts_refused = counts_refused
        self._arrivals: dict[str, deque[float]] = {}

    def admit(self, key: str, now: float) -> bool:
        arrivals = self._arrivals.get(key)
        if arrivals is None:
            arrivals = self._arrivals[key] = deque(maxlen=self.limit)
        full = len(arrivals) == self.limit and now - arrivals[0] < self.window_s
        if self.counts_refused or not full:
            arrivals.append(now)
        return not full

    def set_limit(self, limit: int, window_s: float | None = None) -> None:
        """A new limit from now on; each key keeps its latest arrivals (up to the new limit)."""
        if window_s is not None:
            self.window_s = window_s
        if limit != self.limit:
            self.limit = limit
            self._arrivals = {key: deque(times, maxlen=limit) for key, times in self._arrivals.items()}

    def clear(self) -> None:
        self._arrivals.clear()


RATE_LIMITED = "您的请求数限制已达到上限，请稍后再试"


def window_limited(request_id: str, limit: int, window_s: float) -> web.Response:
    """new-api's own 429 for a key's request limit, stating it: "您已达到请求数限制：1分钟内最多请求300次".

    new-api's windows are whole minutes; a shorter one is said in seconds the same way ("10秒内")."""
    minutes = window_s / 60
    span = f"{minutes:g}分钟" if minutes == int(minutes) else f"{window_s:g}秒"
    message = f"您已达到请求数限制：{span}内最多请求{limit}次"
    return json_response(429, relay_error(429, message, "", request_id), request_id)


QUOTA_USED_UP = "用户额度不足, 剩余额度: $0.000000"
REJECTED_CONTENT = "the content of this request was rejected by the upstream's review"


def refused_alike(request_id: str, status: int, message: str) -> web.Response:
    """Every request refused with the same words (LiteLLM without its database: 400 "No connected db.")."""
    body = {"error": {"message": message, "type": "relay_error", "code": str(status)}}
    return json_response(status, body, request_id)


def rejected_content(request_id: str) -> web.Response:
    """One row's content refused: the same rows every time (chosen by their prompt)."""
    return json_response(400, relay_error(400, REJECTED_CONTENT, "content_rejected", request_id), request_id)


def quota_used_up(request_id: str) -> web.Response:
    return json_response(403, relay_error(403, QUOTA_USED_UP, "insufficient_user_quota", request_id), request_id)


def rate_limited(request_id: str, code: str = "") -> web.Response:
    """The relay's own 429: a Chinese message and no hint headers at all."""
    return json_response(429, relay_error(429, RATE_LIMITED, code, request_id), request_id)

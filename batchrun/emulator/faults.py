"""Faults the emulator can answer with, chosen per request.

A prompt may carry a directive `[[emulator: FAULT]]` (every request with that
prompt fails) or `[[emulator: FAULT x N]]` (its first N requests fail, later
ones succeed), so a test can make exactly the rows it wants fail. `bench` and
soak runs pick faults at a seeded random rate instead (`EmulatorConfig.fault_rates`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def relay_error(status: int, message: str, code: str | int, request_id: str, kind: str = "new_api_error") -> dict:
    return {"error": {"message": f"{message} (request id: {request_id})", "type": kind, "code": code}}


def json_response(status: int, body: dict, request_id: str, headers: dict[str, str] | None = None) -> web.Response:
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

# The answering code enacts the rest itself: bad_json, fenced_json and prose_json, a 200 whose JSON
# is cut, fenced or in prose (chat.py); stream cuts, stalls and framing variants (streams.py);
# Gemini content outcomes (gemini.py).
FAULTS = (
    set(_ERRORS)
    | {"502", "malformed", "reset", "error-200", "bad_json", "fenced_json", "prose_json"}
    | STREAM_FAULTS
    | FRAMINGS
    | GEMINI_FAULTS
)


def fault_response(fault: str, request_id: str) -> web.Response | None:
    """The HTTP answer for a fault, or None for faults the handler enacts itself (reset)."""
    if fault in _ERRORS:
        status, message, code, headers = _ERRORS[fault]
        return json_response(status, relay_error(status, message, code, request_id), request_id, headers)
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

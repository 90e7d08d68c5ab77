"""Failures from the relay, normalised (docs/protocol.md §5) whatever their shape.

Any path may answer in the OpenAI shape, the Google shape (maybe wrapped in a
one-element list), HTML or plain text, often with a Chinese message. Each
becomes one `CallError` that says whether to retry and whether to stop the run.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchrun.base.redaction import excerpt, redact
from batchrun.base.stops import StopRule

MAX_MESSAGE_CHARS = 2000  # a relay's error message is kept whole up to this


@dataclass
class CallError(Exception):
    error_class: str  # the output's error_class column
    message: str
    status: int | None = None
    code: str = ""
    retryable: bool = True
    max_retries: int | None = None  # a tighter cap than run.max_attempts, for content outcomes
    abort: StopRule | None = None  # the stop rule this failure counts towards (base/stops.py)
    retry_hint: float | None = None  # seconds the server asked us to wait
    min_delay: float = 0.0
    request_id: str | None = None
    # The relay's limit as its answer stated it (a 429's message or x-ratelimit-limit-requests): this many
    # requests per this many seconds, for this key. Plain fields: the error crosses to Ray as a dict of them.
    limit_requests: int | None = None
    limit_window_s: float | None = None
    limit_source: str = ""  # "said" (the message) or "header" (x-ratelimit-limit-requests, its window a guess)
    switch_key: bool = False  # its key was retired and another takes the row over (flow/keys.py): not an attempt

    def __post_init__(self) -> None:
        if self.abort is not None:
            self.abort = StopRule(self.abort)  # "A" from a caller or a pickled copy is the rule
        # Server text and exception text may echo the key: masked before anyone can store it, then cut.
        self.message = redact(self.message)
        if len(self.message) > MAX_MESSAGE_CHARS:
            self.message = self.message[: MAX_MESSAGE_CHARS - 1] + "…"

    def __str__(self) -> str:
        text = self.message
        if self.request_id and self.request_id not in text:
            text += f" (request id: {self.request_id})"
        return redact(text)


_REQUEST_ID_SUFFIX = re.compile(r"\(request id: ([^)\s]+)\)\s*$")
_QUOTA_CODES = ("insufficient_user_quota", "pre_consume_token_quota_failed", "insufficient_quota")


@dataclass
class _ErrorFields:
    message: str
    code: str = ""
    rpc_status: str = ""  # Google's RPC status, or the OpenAI shape's `type`
    details: list[Any] = field(default_factory=list)
    param: str = ""


def from_response(status: int, body: bytes, headers: Mapping[str, str]) -> CallError:
    """A non-2xx answer (or a 2xx whose body is an error) as a CallError."""
    fields = _error_fields(body)
    if fields is None:
        fields = _ErrorFields(f"HTTP {status}: {excerpt(body)}".rstrip(": "))
    elif status < 400:  # a 200 carrying an error: its code says what the status would have been
        status = _int_or_none(fields.code) or _status_of_code(fields.code) or status
    request_id = headers.get("x-oneapi-request-id") or headers.get("x-request-id")
    if not request_id and (m := _REQUEST_ID_SUFFIX.search(fields.message)):
        request_id = m.group(1)
    err = classify(status, fields.code, fields.rpc_status, fields.message, fields.param, fields.details)
    err.request_id = request_id
    hint = retry_hint(headers, fields.details, status)
    if hint is not None:
        err.retry_hint = hint
    _apply_should_retry(err, headers)
    if err.error_class == "rate_limited":
        stated = stated_limit(fields.message, headers)
        if stated is not None:
            err.limit_requests, err.limit_window_s = stated
            err.limit_source = "said" if stated_limit(fields.message, {}) else "header"
    return err


def from_body(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> CallError | None:
    """A parsed 200 body or stream event that carries `error` is that error."""
    item = data[0] if isinstance(data, list) and data else data
    if not isinstance(item, dict) or item.get("error") is None:  # some relays send "error": null with an answer
        return None
    return from_response(status, orjson.dumps(item), headers or {})


def _error_fields(body: bytes) -> _ErrorFields | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict):
        return _ErrorFields(
            message=_text(error.get("message")),
            code=_text(error.get("code")),
            rpc_status=_text(error.get("status") or error.get("type")),
            details=error["details"] if isinstance(error.get("details"), list) else [],
            param=_text(error.get("param")),
        )
    if isinstance(error, str):
        return _ErrorFields(error)
    if isinstance(data.get("message"), str):
        return _ErrorFields(data["message"], code=_text(data.get("code")))
    return None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _int_or_none(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


# Relay and OpenAI codes that name their HTTP status, for errors that arrive inside a 200.
_CODE_STATUS = {
    "insufficient_user_quota": 403,
    "pre_consume_token_quota_failed": 403,
    "insufficient_quota": 429,
    "rate_limit_exceeded": 429,
    "token_concurrency_limit_reached": 429,
    "invalid_api_key": 401,
    "empty_response": 500,
}


def _status_of_code(code: str) -> int | None:
    return 403 if code.startswith("entitlement_") else _CODE_STATUS.get(code)


def classify(
    status: int, code: str, rpc_status: str, message: str, param: str = "", details: Sequence[Any] = ()
) -> CallError:
    """docs/protocol.md §5.2: by status, then code, then RPC status; keywords last."""
    lowered = f"{code} {rpc_status}".lower()
    # A daily quota shows in the message or in a QuotaFailure's quotaId (`...PerDay...`).
    said = f"{message} {orjson.dumps(list(details)).decode() if details else ''}".lower()
    daily = "per day" in said or "perday" in said

    def err(error_class: str, text: str | None = None, **kw: Any) -> CallError:
        return CallError(error_class, text or message or f"HTTP {status}", status=status, code=code, **kw)

    if code in ("model_not_found", "get_channel_failed"):
        return err("not_found", max_retries=2, min_delay=30.0)
    if code == "prompt_blocked":
        return err("blocked", f"prompt blocked: {message}", retryable=False)
    if status == 401:
        return err("auth", retryable=False, abort=StopRule.B)
    if status == 403:
        if any(q in lowered for q in _QUOTA_CODES) or code.startswith("entitlement_") or "额度" in message:
            return err("quota", retryable=False, abort=StopRule.A)
        return err("auth", retryable=False, abort=StopRule.B)
    if status == 429:
        if "insufficient_quota" in lowered or (rpc_status == "RESOURCE_EXHAUSTED" and daily) or "额度" in message:
            return err("quota", retryable=False, abort=StopRule.A)
        return err("rate_limited")
    if status == 413:
        return err("too_large", "request too large: use smaller images", retryable=False)
    if status == 404:
        return err("not_found", retryable=False, abort=StopRule.C)
    if status == 500 and code == "empty_response":
        return err("server", f"empty response: {message}", max_retries=2)
    if status in (408, 409, 425) or status >= 500:
        return err("timeout" if status in (408, 504) else "server")
    if status == 400 and ("unsupported_" in code or "param" in code.lower() or param):
        return err("bad_request", retryable=False, abort=StopRule.C)
    if 400 <= status < 500:  # one row's content, or (the same words for every row) the relay's state: rule D
        return err("bad_request", retryable=False, abort=StopRule.D)
    return err("server")


def _apply_should_retry(err: CallError, headers: Mapping[str, str]) -> None:
    value = (headers.get("x-should-retry") or "").lower()
    if value in ("true", "false") and err.abort != StopRule.A:
        err.retryable = value == "true"


# --- limits a 429 states (docs/backoff.md) --------------------------------------------------

_UNIT_WINDOW_S = {"秒": 1.0, "分钟": 60.0, "小时": 3600.0, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0,
                  "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}  # fmt: skip
# new-api: "您已达到请求数限制：1分钟内最多请求300次" (its window is whole minutes; "10秒内" is read the same way)
_STATED_ZH = re.compile(r"(\d+(?:\.\d+)?)\s*(秒|分钟|小时)内最多请求\s*(\d+)\s*次")
# "Limit: 300 / min", "limit 300 per minute", "300 requests per minute", "on requests per min (RPM): Limit 3"
_STATED_SLASH = re.compile(r"limit:?\s*(\d+)\s*(?:/|per)\s*(s|sec|second|m|min|minute|h|hour)\b", re.I)
_STATED_PER = re.compile(r"(\d+)\s*requests?\s*(?:/|per)\s*(s|sec|second|min|minute|h|hour)\b", re.I)
_STATED_RPM = re.compile(r"requests per min(?:ute)?\s*\(RPM\)\D{0,12}?limit:?\s*(\d+)", re.I)
STATED_WINDOW_MAX_S = 3600.0
STATED_REQUESTS_MAX = 1e9  # a limit above this would never bind: taken as not stated


def stated_limit(message: str, headers: Mapping[str, str]) -> tuple[int, float] | None:
    """(requests, window in seconds) as a 429 states them, in its message or its headers; None if it does not.

    `x-ratelimit-limit-requests` is OpenAI's requests per minute: read as a 60 s window."""
    if m := _STATED_ZH.search(message):
        window, requests = float(m.group(1)) * _UNIT_WINDOW_S[m.group(2)], _count(m.group(3))
    elif m := _STATED_SLASH.search(message) or _STATED_PER.search(message):
        requests, window = _count(m.group(1)), _UNIT_WINDOW_S[m.group(2).lower()]
    elif m := _STATED_RPM.search(message):
        requests, window = _count(m.group(1)), 60.0
    elif (requests := _count(headers.get("x-ratelimit-limit-requests"))) is not None:
        window = 60.0
    else:
        return None
    return (requests, window) if requests is not None and 0 < window <= STATED_WINDOW_MAX_S else None


def _count(text: str | None) -> int | None:
    """A stated number of requests, or None: not a number, not positive, not finite, or more than any window holds
    (float() reads any length of digits, where int() refuses over 4,300 and int(inf) raises)."""
    number = _float(text)
    return int(number) if number is not None and 0 < number <= STATED_REQUESTS_MAX else None


# --- server hints (docs/protocol.md §6.1) -------------------------------------------------

HINT_CAP_S = 120.0


def retry_hint(headers: Mapping[str, str], details: list[Any], status: int) -> float | None:
    """Seconds to wait from retry-after-ms, Retry-After, RetryInfo or x-ratelimit-reset-*."""
    for candidate in (
        _float(headers.get("retry-after-ms"), scale=0.001),
        _retry_after(headers.get("retry-after")),
        _retry_info(details),
        _ratelimit_reset(headers) if status == 429 else None,
    ):
        if candidate is not None and candidate > 0:
            return min(candidate, HINT_CAP_S)
    return None


def _float(value: str | None, scale: float = 1.0) -> float | None:
    try:
        return float(value) * scale if value is not None else None
    except ValueError:
        return None


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    seconds = _float(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are GMT all the same
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp() - time.time()


def _retry_info(details: list[Any]) -> float | None:
    for d in details:
        if isinstance(d, dict) and isinstance(d.get("retryDelay"), str):
            return go_duration(d["retryDelay"])
    return None


def _ratelimit_reset(headers: Mapping[str, str]) -> float | None:
    """docs/protocol.md §6.2: the longest reset among the groups whose `remaining` is 0.

    A group whose limit is -1, 0 or missing is unknown and ignored.
    """
    resets = [
        go_duration(headers.get(f"x-ratelimit-reset-{kind}", ""))
        for kind in ("requests", "tokens")
        if _positive(headers.get(f"x-ratelimit-limit-{kind}"))
        and _float(headers.get(f"x-ratelimit-remaining-{kind}")) == 0
    ]
    found = [r for r in resets if r is not None]
    return max(found) if found else None


@dataclass(frozen=True)
class QuotaGroup:
    """One `x-ratelimit-*` group (requests or tokens) as a successful answer reported it."""

    limit: float
    remaining: float
    reset_s: float


@dataclass(frozen=True)
class QuotaLeft:
    requests: QuotaGroup | None
    tokens: QuotaGroup | None


def quota_left(headers: Mapping[str, str]) -> QuotaLeft | None:
    """docs/protocol.md §6.2 on any answer: what the window has left; None when no group is complete and known."""
    groups = [_quota_group(headers, kind) for kind in ("requests", "tokens")]
    return QuotaLeft(*groups) if any(groups) else None


def _quota_group(headers: Mapping[str, str], kind: str) -> QuotaGroup | None:
    limit = _float(headers.get(f"x-ratelimit-limit-{kind}"))
    remaining = _float(headers.get(f"x-ratelimit-remaining-{kind}"))
    reset = go_duration(headers.get(f"x-ratelimit-reset-{kind}", ""))
    if limit is None or limit <= 0 or remaining is None or remaining < 0 or reset is None:
        return None
    return QuotaGroup(limit, remaining, min(reset, HINT_CAP_S))


def _positive(value: str | None) -> bool:
    number = _float(value)
    return number is not None and number > 0


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|h|m|s)")
_UNIT_S = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}


def go_duration(value: str) -> float | None:
    """A Go duration string (`6m0s`, `12ms`, `1m30.5s`) or bare seconds, in seconds; None if neither."""
    value = value.strip()
    if not value:
        return None
    bare = _float(value)
    if bare is not None:
        return bare if bare > 0 else None
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    return total if pos == len(value) and total > 0 else None

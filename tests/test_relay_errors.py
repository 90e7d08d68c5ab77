"""Every failure shape of docs/protocol.md §5 and the hints of §6, normalised (§7 items 12-21, 28)."""

from __future__ import annotations

import email.utils
import time

import httpx
import orjson
import pytest

from batchrun.base.redaction import register_secret
from batchrun.protocols import openai_chat
from batchrun.protocols.relay_errors import (
    CallError,
    QuotaGroup,
    from_body,
    from_response,
    go_duration,
    quota_left,
    retry_hint,
)


def answer(status: int, body: object, **headers: str) -> CallError:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return from_response(status, raw, httpx.Headers({k.replace("_", "-"): v for k, v in headers.items()}))


def relay(message: str, code: object = "", kind: str = "new_api_error", **extra: object) -> dict:
    return {"error": {"message": message, "type": kind, "code": code, **extra}}


def google(code: int, status: str, message: str = "…", details: list | None = None) -> dict:
    return {"error": {"code": code, "status": status, "message": message, "details": details or []}}


# --- item 12: HTML and plain-text bodies ---------------------------------------------


def test_an_html_proxy_page_is_classified_by_status_with_a_short_excerpt() -> None:
    page = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>" + b"x" * 5000 + b"</body></html>"
    err = answer(502, page, content_type="text/html")
    assert err.error_class == "server" and err.retryable and err.status == 502
    assert err.message.startswith("HTTP 502: <html> <head><title>502 Bad Gateway")
    assert len(err.message) <= len("HTTP 502: ") + 200 and "\n" not in err.message


@pytest.mark.parametrize(("status", "error_class"), [(504, "timeout"), (524, "server"), (408, "timeout")])
def test_plain_text_bodies_are_retried_by_status(status: int, error_class: str) -> None:
    err = answer(status, b"upstream request timeout")
    assert (err.error_class, err.retryable, err.abort) == (error_class, True, None)
    assert err.message == f"HTTP {status}: upstream request timeout"


# --- item 13: a 200 that carries an error ----------------------------------------------


def test_a_200_whose_body_is_an_error_is_that_error_never_a_success() -> None:
    with pytest.raises(CallError) as caught:
        openai_chat.parse(relay("upstream error", "bad_response_status_code", "upstream_error"))
    assert caught.value.error_class == "server" and caught.value.retryable
    with pytest.raises(CallError) as caught:
        openai_chat.parse([google(429, "RESOURCE_EXHAUSTED", "Quota exceeded per minute")])
    assert caught.value.error_class == "rate_limited" and caught.value.status == 429


# --- item 14: shapes and code types ------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        google(503, "UNAVAILABLE", "The model is overloaded."),
        [google(503, "UNAVAILABLE", "The model is overloaded.")],
        relay("The model is overloaded.", 503, "upstream_error"),
        relay("The model is overloaded.", "503", "upstream_error"),
        relay("The model is overloaded.", "", "upstream_error"),
        relay("The model is overloaded.", None, "upstream_error"),
        {"message": "The model is overloaded.", "code": 503},
        {"error": "The model is overloaded."},
    ],
)
def test_every_shape_and_code_type_is_normalised(body: object) -> None:
    err = answer(503, body)
    assert (err.error_class, err.status, err.retryable) == ("server", 503, True)
    assert err.message == "The model is overloaded."


def test_a_google_error_in_a_list_on_a_200_takes_its_code_as_the_status() -> None:
    err = from_body([google(503, "UNAVAILABLE")])
    assert err is not None and err.status == 503 and err.error_class == "server"
    assert from_body({"choices": []}) is None and from_body([]) is None


# --- item 15: Chinese messages and request ids ------------------------------------------


def test_a_chinese_message_keeps_its_text_and_gives_its_request_id() -> None:
    message = "当前分组上游负载已饱和，请稍后再试 (request id: 20260101093000123456789abcd)"
    err = answer(500, relay(message))
    assert err.message == message and err.request_id == "20260101093000123456789abcd"
    assert err.error_class == "server" and err.retryable
    assert str(err) == message  # the id is not repeated


def test_the_request_id_header_wins_and_is_appended_to_the_message() -> None:
    err = answer(429, relay("您的请求数限制已达到上限"), x_oneapi_request_id="REQ42")
    assert err.request_id == "REQ42" and str(err) == "您的请求数限制已达到上限 (request id: REQ42)"
    assert err.error_class == "rate_limited"


# --- items 16, 17: auth and quota stop the run --------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "error_class", "abort"),
    [
        (401, relay("无效的令牌"), "auth", "B"),
        (403, relay("该令牌无权访问模型", "access_denied"), "auth", "B"),
        (403, google(403, "PERMISSION_DENIED"), "auth", "B"),
        (403, relay("用户额度不足, 剩余额度: $0.000000", "insufficient_user_quota"), "quota", "A"),
        (403, relay("预扣费额度失败", "pre_consume_token_quota_failed"), "quota", "A"),
        (403, relay("no entitlement", "entitlement_missing"), "quota", "A"),
        (403, relay("令牌额度已用尽"), "quota", "A"),
        (429, relay("You exceeded your current quota", "insufficient_quota"), "quota", "A"),
        (429, google(429, "RESOURCE_EXHAUSTED", "Quota exceeded: GenerateRequestsPerDayPerProject"), "quota", "A"),
        (429, google(429, "RESOURCE_EXHAUSTED", "Quota exceeded for requests per minute"), "rate_limited", None),
        (429, relay("token concurrency", "token_concurrency_limit_reached"), "rate_limited", None),
    ],
)
def test_auth_and_quota_answers_stop_the_run(status: int, body: object, error_class: str, abort: str | None) -> None:
    err = answer(status, body)
    assert (err.error_class, err.abort) == (error_class, abort)
    assert err.retryable == (error_class == "rate_limited")


# --- the rest of the §5.2 table ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, relay("prompt blocked", "prompt_blocked"), ("blocked", False, None, None)),
        (400, relay("bad", "unsupported_parameter", param="max_tokens"), ("bad_request", False, "C", None)),
        (400, relay("bad", "invalid_value", param="temperature"), ("bad_request", False, "C", None)),
        (400, relay("sensitive words detected", "sensitive_words_detected"), ("bad_request", False, "D", None)),
        (400, google(400, "INVALID_ARGUMENT"), ("bad_request", False, "D", None)),
        (422, relay("unprocessable"), ("bad_request", False, "D", None)),
        (404, relay("Invalid URL", "not_found"), ("not_found", False, "C", None)),
        (503, relay("no channel", "model_not_found"), ("not_found", True, None, 2)),
        (500, relay("no channel", "get_channel_failed"), ("not_found", True, None, 2)),
        (500, relay("empty", "empty_response"), ("server", True, None, 2)),
        (409, relay("conflict"), ("server", True, None, None)),
        (425, relay("too early"), ("server", True, None, None)),
        (520, b"", ("server", True, None, None)),
    ],
)
def test_the_classification_table(status: int, body: object, expected: tuple) -> None:
    err = answer(status, body)
    assert (err.error_class, err.retryable, err.abort, err.max_retries) == expected


def test_model_not_found_waits_at_least_30_s_between_its_two_retries() -> None:
    assert answer(404, relay("no", "model_not_found")).min_delay == 30


@pytest.mark.parametrize(("value", "retryable"), [("true", True), ("false", False), ("TRUE", True), ("maybe", None)])
def test_x_should_retry_overrides_the_retry_column_never_the_abort_one(value: str, retryable: bool | None) -> None:
    server = answer(500, relay("boom"), x_should_retry=value)
    assert server.retryable == (True if retryable is None else retryable)
    bad = answer(400, relay("bad"), x_should_retry=value)
    assert bad.retryable == (False if retryable is None else retryable)
    key = answer(401, relay("无效的令牌"), x_should_retry=value)
    assert key.abort == "B"


# --- item 21: 413 --------------------------------------------------------------------------------------


def test_a_413_is_a_row_error_suggesting_smaller_images() -> None:
    err = answer(413, b"<html>413 Request Entity Too Large</html>")
    assert (err.error_class, err.retryable) == ("too_large", False)
    assert "smaller images" in err.message


# --- items 18, 19, 20: hints -------------------------------------------------------------------------


def test_a_relay_429_without_hints_has_no_hint() -> None:
    err = answer(429, relay("您的请求数限制已达到上限，请稍后再试"))
    assert err.error_class == "rate_limited" and err.retry_hint is None


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "details", "expected"),
    [
        ({"retry-after": "20"}, [], 20),
        ({"retry-after": "2.5"}, [], 2.5),
        ({"retry-after-ms": "1500.5"}, [], 1.5005),
        ({"retry-after-ms": "1500", "retry-after": "20"}, [], 1.5),  # -ms first
        ({"retry-after": "999"}, [], 120),  # capped
        ({"retry-after": "0"}, [], None),
        ({"retry-after": "-3"}, [], None),
        ({"retry-after": "soon"}, [], None),
        ({"retry-after": http_date(-30)}, [], None),  # in the past
        ({}, [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}], 17),
        ({}, [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.5s"}], 0.5),
        ({"retry-after": "bad"}, [{"retryDelay": "3s"}], 3),  # an unparsable hint falls through
        ({}, [], None),
    ],
)
def test_retry_hints(headers: dict[str, str], details: list, expected: float | None) -> None:
    hint = retry_hint(httpx.Headers(headers), details, 429)
    assert hint == (pytest.approx(expected) if expected is not None else None)


def test_retry_after_as_an_http_date_is_that_date_minus_now() -> None:
    hint = retry_hint(httpx.Headers({"retry-after": http_date(30)}), [], 429)
    assert hint is not None and 28 <= hint <= 31
    naive = email.utils.formatdate(time.time() + 30)  # "-0000" zone: parsed naive, still UTC
    hint = retry_hint(httpx.Headers({"retry-after": naive}), [], 429)
    assert hint is not None and 28 <= hint <= 31


def ratelimit(requests: tuple[str, str, str] | None, tokens: tuple[str, str, str] | None) -> httpx.Headers:
    headers = {}
    for kind, group in (("requests", requests), ("tokens", tokens)):
        if group is not None:
            limit, remaining, reset = group
            headers |= {
                f"x-ratelimit-limit-{kind}": limit,
                f"x-ratelimit-remaining-{kind}": remaining,
                f"x-ratelimit-reset-{kind}": reset,
            }
    return httpx.Headers(headers)


@pytest.mark.parametrize(
    ("requests", "tokens", "expected"),
    [
        (("600", "0", "1s"), ("200000", "15800", "6m0s"), 1),  # only the exhausted group counts
        (("600", "0", "1s"), ("200000", "0", "1m30.5s"), 90.5),  # the longest of the exhausted ones
        (("600", "0", "6m0s"), None, 120),  # capped
        (("600", "0", "12ms"), None, 0.012),
        (("-1", "0", "5s"), None, None),  # unknown limit: the group is ignored
        (("0", "0", "5s"), None, None),
        (("600", "0", "-1"), None, None),  # placeholder reset
        (("600", "0", ""), None, None),
        (("600", "3", "5s"), None, None),
        (None, None, None),
    ],
)
def test_ratelimit_reset_headers_on_a_429(requests, tokens, expected) -> None:
    hint = retry_hint(ratelimit(requests, tokens), [], 429)
    assert hint == (pytest.approx(expected) if expected is not None else None)
    assert retry_hint(ratelimit(requests, tokens), [], 200) is None  # only a 429 makes them a retry hint


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1),
        ("12ms", 0.012),
        ("6m0s", 360),
        ("1m30.5s", 90.5),
        ("1h2m", 3720),
        ("250µs", 0.00025),
        ("250μs", 0.00025),
        ("250us", 0.00025),
        ("100ns", 1e-7),
        ("17", 17),
        ("2.5", 2.5),
        (".5s", 0.5),
        ("-1", None),
        ("0", None),
        ("0s", None),
        ("", None),
        ("  ", None),
        ("soon", None),
        ("5 s", None),
        ("1.5.5s", None),
        ("s", None),
        ("3d", None),
        ("-5s", None),
    ],
)
def test_go_durations(text: str, seconds: float | None) -> None:
    assert go_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


# --- item 28: the key inside an error text -----------------------------------------------------------------


def test_the_key_inside_any_error_text_is_masked() -> None:
    key = "sk-unit-test-key-0123456789abcdef"
    register_secret(key)
    err = answer(401, relay(f"Incorrect API key provided: {key}. (request id: R1)"))
    assert key not in err.message and "***" in err.message and err.request_id == "R1"
    stripped = answer(401, relay(f"token {key.removeprefix('sk-')} is invalid"))
    assert key.removeprefix("sk-") not in str(stripped)
    network = CallError("connection", f"connection: Illegal header value b'Bearer {key}'")
    assert key not in str(network)
    late = CallError("server", "x")
    late.message = f"changed later: {key}"
    assert key not in str(late)


@pytest.mark.parametrize(
    ("code", "error_class", "abort"),
    [
        ("insufficient_user_quota", "quota", "A"),
        ("insufficient_quota", "quota", "A"),
        ("entitlement_expired", "quota", "A"),
        ("rate_limit_exceeded", "rate_limited", None),
        ("invalid_api_key", "auth", "B"),
    ],
)
def test_a_relay_error_inside_a_200_is_classified_by_its_code(code: str, error_class: str, abort: str | None) -> None:
    body = orjson.dumps({"error": {"message": "wrapped", "type": "new_api_error", "code": code}})
    err = from_response(200, body, {})
    assert (err.error_class, err.abort) == (error_class, abort)


def test_a_daily_quota_named_only_in_the_quota_failure_details_stops_the_run() -> None:
    body = orjson.dumps(
        {
            "error": {
                "code": 429,
                "status": "RESOURCE_EXHAUSTED",
                "message": "Quota exceeded.",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel"}],
                    }
                ],
            }
        }
    )
    err = from_response(429, body, {})
    assert (err.error_class, err.abort, err.retryable) == ("quota", "A", False)


def test_quota_left_reads_the_ratelimit_headers_of_any_answer() -> None:
    headers = {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "12",
        "x-ratelimit-reset-requests": "1m30.5s",
        "x-ratelimit-limit-tokens": "-1",  # unknown: ignored
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    quota = quota_left(headers)
    assert quota is not None
    assert quota.requests == QuotaGroup(600, 12, 90.5) and quota.tokens is None
    assert quota_left({"x-ratelimit-remaining-requests": "3"}) is None  # no limit, no reset: nothing to pace by
    long_reset = {**headers, "x-ratelimit-reset-requests": "1h"}
    capped = quota_left(long_reset)
    assert capped is not None and capped.requests is not None and capped.requests.reset_s == 120  # like any hint

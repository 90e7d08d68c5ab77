"""Every protocol, streamed and not, over loopback against the emulator; cut, stalled and oddly framed streams."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import (
    EXPECTED_LABELS,
    Emulator,
    assert_finished,
    run_here,
    start_emulator,
    stop_emulator,
    write_csv,
    write_job,
)

from batchrun.emulator.answers import text_answer

PROTOCOLS: dict[str, dict[str, Any]] = {
    "openai-chat": {"model": "gpt-5.4", "params": {"max_completion_tokens": 20}},
    "openai-completions": {"model": "gpt-3.5-turbo-instruct", "params": {"max_tokens": 20}},
    "gemini": {"model": "gemini-2.5-flash", "params": {"maxOutputTokens": 20}},
}
COMPARED = ["response_text", "tool_calls", "finish_reason", "model", "prompt_tokens", "completion_tokens", "status"]


def protocol_job(folder: Path, url: str, api: str, stream: bool, **overrides: Any) -> Path:
    """A job file of its own per protocol and stream setting (each job keeps its own checkpoint)."""
    job = write_job(
        folder,
        url,
        provider={"api": api, "base_url": url, "api_key_env": "TEST_RELAY_KEY"},
        stream=stream,
        **{"output": {"path": f"out/{api}-{stream}.parquet"}, **PROTOCOLS[api], **overrides},
    )
    return job.rename(job.with_name(f"{api}-{stream}.yaml"))


def run_ok(job: Path, *args: str) -> pl.DataFrame:
    result = run_here("run", str(job), "--quiet", *args)
    assert result.returncode in (0, 5), result.stderr
    output = job.parent / "out"
    newest = max(output.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    assert_finished(result, newest)
    return pl.read_parquet(newest)


@pytest.mark.parametrize("api", sorted(PROTOCOLS))
def test_streamed_rows_equal_unstreamed_rows(api: str, tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    plain = run_ok(protocol_job(tmp_path, emulator.url, api, stream=False))
    streamed = run_ok(protocol_job(tmp_path, emulator.url, api, stream=True))
    assert streamed.select(COMPARED).to_dicts() == plain.select(COMPARED).to_dicts()
    assert dict(zip(plain["review_id"], plain["response_text"])) == EXPECTED_LABELS
    assert set(plain["status"]) == {"ok"} and (plain["prompt_tokens"] > 0).all()
    routes = emulator.stats()["by_route"]
    if api == "gemini":
        assert routes == {
            "/v1beta/models/gemini-2.5-flash:generateContent": 6,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent": 6,
        }
    else:
        path = "/v1/chat/completions" if api == "openai-chat" else "/v1/completions"
        assert routes == {path: 6, f"{path} (stream)": 6}


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "set_label",
            "parameters": {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_stars",
            "parameters": {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}}},
        },
    },
]


def test_tool_calls_streamed_as_interleaved_fragments_equal_the_whole_answer(
    tmp_path: Path, reviews: Path, emulator: Emulator
) -> None:
    params = {"tools": TOOLS, "tool_choice": "required"}
    plain = run_ok(protocol_job(tmp_path, emulator.url, "openai-chat", stream=False, params=params))
    streamed = run_ok(protocol_job(tmp_path, emulator.url, "openai-chat", stream=True, params=params))
    assert streamed.select(COMPARED).to_dicts() == plain.select(COMPARED).to_dicts()
    assert set(plain["finish_reason"]) == {"tool_calls"} and plain["response_text"].null_count() == 6
    first = plain.filter(pl.col("review_id") == "R1")["tool_calls"].to_list()[0]
    assert [c["name"] for c in first] == ["set_label", "set_stars"]
    assert first[0]["arguments"] == '{"label":"positive"}'


def test_gemini_function_calls_land_in_tool_calls(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    params = {
        "tools": [{"functionDeclarations": [{"name": "set_label", "parameters": TOOLS[0]["function"]["parameters"]}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
    }
    for stream in (False, True):
        df = run_ok(protocol_job(tmp_path, emulator.url, "gemini", stream=stream, params=params))
        calls = dict(zip(df["review_id"], df["tool_calls"].to_list()))
        assert calls["R2"] == [{"name": "set_label", "arguments": '{"label":"negative"}'}]


FRAMINGS = [
    "sse-crlf",
    "sse-cr",
    "sse-nospace",
    "sse-multiline",
    "sse-split-utf8",
    "sse-no-final-blank",
    "sse-fields",
    "sse-big",
    "json-array",
]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("api", ["openai-chat", "gemini"])
def test_every_framing_variant_gives_the_plain_answer(
    api: str, stream: bool, tmp_path: Path, emulator: Emulator
) -> None:
    # Non-ASCII words, so that the answer has characters a read can split; unstreamed requests
    # answered as SSE anyway (§7 item 22) must be read too.
    rows = [[f"F{i}", f"夜市 poster für Ölmühle [[emulator: {name}]]"] for i, name in enumerate(FRAMINGS)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = protocol_job(tmp_path, emulator.url, api, stream, prompt={"user": "{{ text }}"}, params={})
    df = run_ok(job)
    assert df["status"].to_list() == ["ok"] * len(rows), df["error"].to_list()
    assert df["response_text"].to_list() == [text_answer(text) for _, text in rows]
    assert "夜市 poster für Ölmühle" in df["response_text"][0]
    assert df["attempts"].to_list() == [1] * len(rows)


@pytest.mark.parametrize("api", sorted(PROTOCOLS))
def test_cut_streams_are_retried_and_a_stream_always_cut_is_an_error(
    api: str, tmp_path: Path, emulator: Emulator
) -> None:
    rows = [
        ["C1", "I love it [[emulator: stream-cut x 1]]"],
        ["C2", "Terrible [[emulator: stream-cut-tidy x 2]]"],
        ["C3", "Always cut [[emulator: stream-cut]]"],
    ]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = protocol_job(tmp_path, emulator.url, api, True, run={"concurrency": 3, "max_attempts": 3, "timeout_s": 10})
    df = run_ok(job)
    assert df["status"].to_list() == ["ok", "ok", "error"]
    # A tidy ending (usage, [DONE]) without a finish reason is a cut stream too.
    assert df["attempts"].to_list() == [2, 3, 3]
    assert df["response_text"].to_list()[:2] == ["positive", "negative"]
    assert df["error_class"][2] == "incomplete_stream" and "cut the stream" in df["error"][2]
    assert df["response_text"][2] is None  # the partial text is not kept
    assert sum(emulator.stats()["by_prompt"].values()) == df["attempts"].sum()


@pytest.mark.parametrize("api", ["openai-chat", "gemini"])
def test_a_stream_that_goes_silent_is_retried(api: str, tmp_path: Path, emulator: Emulator) -> None:
    rows = [["S1", "I love it [[emulator: stall x 1]]"], ["S2", "Broken lid."]]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = protocol_job(tmp_path, emulator.url, api, True, run={"concurrency": 2, "max_attempts": 3, "timeout_s": 1})
    df = run_ok(job)
    assert df["status"].to_list() == ["ok", "ok"]
    assert df["attempts"].to_list() == [2, 1]
    assert df["response_text"].to_list() == ["positive", "negative"]


@pytest.fixture
def pinging_emulator():
    emulator = start_emulator("--ping-ms", "200", "--stall-ms", "2500")
    yield emulator
    stop_emulator(emulator)


def test_pings_keep_a_quiet_chat_stream_alive_but_gemini_streams_have_none(
    tmp_path: Path, pinging_emulator: Emulator
) -> None:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], [["P1", "I love it [[emulator: stall x 1]]"]])
    run = {"concurrency": 1, "max_attempts": 3, "timeout_s": 1}
    chat = run_ok(protocol_job(tmp_path, pinging_emulator.url, "openai-chat", True, run=run))
    assert chat["attempts"].to_list() == [1] and chat["response_text"].to_list() == ["positive"]
    pinging_emulator.reset()
    gemini = run_ok(protocol_job(tmp_path, pinging_emulator.url, "gemini", True, run=run))
    assert gemini["attempts"].to_list() == [2] and gemini["response_text"].to_list() == ["positive"]


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_blocked_prompts_and_safety_stops(stream: bool, tmp_path: Path, emulator: Emulator) -> None:
    rows = [
        ["B1", "Something forbidden [[emulator: blocked]]"],
        ["B2", "Unsafe once [[emulator: safety x 1]]"],
        ["B3", "Always unsafe [[emulator: safety]]"],
        ["B4", "Busy relay [[emulator: 500 x 1]]"],
        ["B5", "Rate limited in Google's words [[emulator: 429 x 1]]"],
    ]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = protocol_job(tmp_path, emulator.url, "gemini", stream, run={"concurrency": 5, "max_attempts": 5})
    df = run_ok(job)
    assert df["status"].to_list() == ["error", "ok", "error", "ok", "ok"]
    assert df["attempts"].to_list() == [1, 2, 2, 2, 2]  # blocked: never retried; safety: retried once
    assert df["error_class"].to_list() == ["blocked", None, "content_filter", None, None]
    assert df["error"][0].startswith("prompt blocked: PROHIBITED_CONTENT")
    assert "SAFETY" in df["error"][2]
    requests = emulator.stats()["by_prompt"]
    assert [n for prompt, n in requests.items() if rows[0][1] in prompt] == [1]


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_structured_output(stream: bool, tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    schema = {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]}}}
    output = {"path": f"out/gemini-{stream}.parquet", "parse": "json", "schema": schema}
    df = run_ok(protocol_job(tmp_path, emulator.url, "gemini", stream, output=output))
    assert dict(zip(df["review_id"], df["label"])) == EXPECTED_LABELS


def test_gemini_paths_take_google_key_forms_and_chat_only_bearer() -> None:
    emulator = start_emulator("--api-key-env", "EMULATOR_KEY", env={"EMULATOR_KEY": "the-key"})
    try:
        body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()
        path = "/v1beta/models/gemini-2.5-flash:generateContent"

        def status(url: str, headers: dict[str, str]) -> int:
            request = urllib.request.Request(emulator.url + url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert status(path, {"Authorization": "Bearer the-key"}) == 200
        assert status(path, {"x-goog-api-key": "the-key"}) == 200
        assert status(path + "?key=the-key", {}) == 200
        assert status(path, {"x-goog-api-key": "wrong"}) == 401
        assert status("/v1/chat/completions", {"x-goog-api-key": "the-key"}) == 401
    finally:
        stop_emulator(emulator)

"""Build and parse functions on the edge cases of docs/protocol.md §7 (no network: pure functions)."""

from __future__ import annotations

import ast
import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from batchrun.app.checks import job_from_dict
from batchrun.base.errors import JobError
from batchrun.job.openai_batch import URL_APIS
from batchrun.job.render import ImageInput, Request
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import JobSpec
from batchrun.pipeline.transport import read_answer
from batchrun.protocols import (
    APIS,
    CallError,
    WireProtocol,
    gemini,
    openai_chat,
    openai_completions,
    openai_images,
    protocol_for,
)
from batchrun.protocols.reply import Decoder, ImageOut, Reply

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR42mP4z8AAAAMBAQAY3Y2wAAAAAElFTkSuQmCC")
PNG_B64 = base64.b64encode(PNG).decode()


def spec(**overrides: Any) -> RequestSettings:
    """What a job of these keys asks with (the protocols build from it, not from the job file)."""
    data: dict[str, Any] = {
        "name": "t",
        "input": {"path": "x.csv"},
        "model": "gpt-5.4",
        "prompt": {"user": "u"},
        "output": {"path": "o.parquet"},
    }
    data.update(overrides)
    job = JobSpec.model_validate(data)
    return RequestSettings.of(job, protocol_for(job.provider.api))


def raises(fn: Any, *args: Any) -> CallError:
    with pytest.raises(CallError) as info:
        fn(*args)
    return info.value


# --- build ------------------------------------------------------------------------


def test_chat_body_with_images_in_both_part_styles() -> None:
    request = Request("sys", "look", ("a.png", "https://x/y.png"), (ImageInput("image/png", PNG), ImageInput(url="u")))
    body = openai_chat.build(request, spec(params={"max_completion_tokens": 5}))
    assert body["messages"][0] == {"role": "system", "content": "sys"}
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": "u"}},
    ]
    assert body["max_completion_tokens"] == 5 and "stream" not in body
    relay_style = openai_chat.build(
        request, spec(provider={"image_part_style": "responses"}, prompt={"user": "u", "images": ["{{ a }}"]})
    )
    types = [p["type"] for p in relay_style["messages"][1]["content"]]
    assert types == ["input_text", "input_image", "input_image"]
    assert relay_style["messages"][1]["content"][1]["image_url"] == {"url": f"data:image/png;base64,{PNG_B64}"}


def test_streams_ask_for_the_usage_chunk() -> None:
    for module in (openai_chat, openai_completions):
        body = module.build(Request(None, "u"), spec(stream=True))
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_completions_prompt_is_system_blank_line_user() -> None:
    body = openai_completions.build(Request("sys", "user text"), spec(params={"max_tokens": 9}))
    assert body == {"model": "gpt-5.4", "prompt": "sys\n\nuser text", "max_tokens": 9}


def test_gemini_body_splits_params_and_puts_images_first() -> None:
    params = {
        "temperature": 0.5,
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"]},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
    }
    request = Request("sys", "draw", ("a.png",), (ImageInput("image/png", PNG),))
    body = gemini.build(request, spec(model="gemini-2.5-flash-image", params=params))
    assert body["contents"] == [
        {"role": "user", "parts": [{"inlineData": {"mimeType": "image/png", "data": PNG_B64}}, {"text": "draw"}]}
    ]
    assert body["systemInstruction"] == {"parts": [{"text": "sys"}]}
    assert body["generationConfig"] == {"responseModalities": ["TEXT", "IMAGE"], "temperature": 0.5}
    assert body["safetySettings"] == params["safetySettings"] and body["toolConfig"] == params["toolConfig"]
    streamed = spec(provider={"api": "gemini"}, model="gemini-2.5-flash", stream=True)
    assert gemini.path(streamed) == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert gemini.path(spec(provider={"api": "gemini"}, model="gemini-2.5-flash")) == (
        "/v1beta/models/gemini-2.5-flash:generateContent"
    )


def test_which_gemini_jobs_expect_images() -> None:
    assert gemini.expects_images(spec(model="gemini-2.5-flash-image"))
    assert not gemini.expects_images(spec(model="gemini-2.5-flash-image", params={"responseModalities": ["TEXT"]}))
    assert gemini.expects_images(spec(model="x", params={"generationConfig": {"responseModalities": ["IMAGE"]}}))
    assert not gemini.expects_images(spec(model="gemini-2.5-flash"))


# --- chat -------------------------------------------------------------------------


def chat_body(message: dict[str, Any], finish: str | None = "stop", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "choices": [{"index": 0, "message": message, "finish_reason": finish}], **extra}


def test_chat_tool_calls_with_null_content() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "set_label", "arguments": '{"label": "x"'}}
    reply = openai_chat.parse(chat_body({"content": None, "tool_calls": [call]}, "tool_calls"))
    assert reply.text is None and reply.tool_calls == [{"name": "set_label", "arguments": '{"label": "x"'}]


def test_chat_in_band_failures() -> None:
    refused = raises(openai_chat.parse, chat_body({"content": None, "refusal": "no"}))
    assert refused.error_class == "refused" and not refused.retryable and refused.message == "refused: no"
    filtered = raises(openai_chat.parse, chat_body({"content": ""}, "content_filter"))
    assert filtered.error_class == "content_filter" and filtered.max_retries == 1
    for body in ({"choices": []}, {"object": "chat.completion"}, chat_body({"content": None}, None)):
        assert raises(openai_chat.parse, body).error_class == "malformed"
    wrapped = raises(openai_chat.parse, {"error": {"message": "boom", "type": "upstream_error", "code": 500}})
    assert wrapped.status == 500 and wrapped.retryable


def test_markdown_data_uri_images_are_taken_out_of_the_text() -> None:
    content = f"Here you go ![image](data:image/png;base64,{PNG_B64}) and ![b](data:image/png;base64,{PNG_B64})"
    reply = openai_chat.parse(chat_body({"content": content}))
    assert reply.text == "Here you go [image 1] and [image 2]"
    assert reply.images == [ImageOut("image/png", PNG)] * 2


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"model": "m", "choices": choices, **extra}


def feed(stream: Any, events: list[Any]) -> Reply:
    for event in events:
        stream.done() if event == "[DONE]" else stream.add(event)
    return stream.reply()


def test_chat_stream_merges_interleaved_tool_call_fragments() -> None:
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk(
            {"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}]}
        ),
        chunk({"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "g"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"y":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "2}"}}]}),
        chunk({}, "tool_calls"),
        "[DONE]",
    ]
    reply = feed(openai_chat.Stream(), events)
    assert reply.tool_calls == [{"name": "f", "arguments": '{"x":1}'}, {"name": "g", "arguments": '{"y":2}'}]
    assert reply.text is None and reply.finish_reason == "tool_calls" and reply.prompt_tokens is None


def test_chat_stream_skips_empty_choices_and_reasoning_and_keeps_usage() -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk(),  # a keepalive with no choices
        chunk({"reasoning_content": "thinking..."}),
        chunk({"content": "nega"}),
        chunk({"content": "tive"}),
        chunk({}, "stop"),
        chunk(usage=usage),
        "[DONE]",
    ]
    reply = feed(openai_chat.Stream(), events)
    assert (reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens) == ("negative", "stop", 4, 2)


def test_an_incomplete_chat_stream_is_a_retryable_failure() -> None:
    no_done = [chunk({"content": "neg"}), chunk({}, "stop")]
    no_finish = [chunk({"content": "neg"}), chunk(usage={"prompt_tokens": 1}), "[DONE]"]
    for events in (no_done, no_finish):
        err = raises(feed, openai_chat.Stream(), events)
        assert err.error_class == "incomplete_stream" and err.retryable and "cut the stream" in err.message


def test_completions_parse_and_stream_agree() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    whole = {"model": "i", "choices": [{"index": 0, "text": " negative", "finish_reason": "stop"}], "usage": usage}
    events = [
        {"model": "i", "choices": [{"index": 0, "text": " neg", "finish_reason": None}]},
        {"model": "i", "choices": [{"index": 0, "text": "ative", "finish_reason": None}]},
        {"model": "i", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
        {"model": "i", "choices": [], "usage": usage},
        "[DONE]",
    ]
    assert openai_completions.parse(whole) == feed(openai_completions.Stream(), events)
    assert openai_completions.parse(whole).text == " negative"


# --- gemini -----------------------------------------------------------------------


def gemini_answer(parts: list[dict[str, Any]], finish: str | None = "STOP", **extra: Any) -> dict[str, Any]:
    candidate: dict[str, Any] = {"index": 0, "content": {"role": "model", "parts": parts}}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], **extra}


def test_gemini_thoughts_skipped_images_kept_in_order_and_thinking_counted() -> None:
    draft, final = PNG + b"draft", PNG
    answer = gemini_answer(
        [
            {"text": "Sketching first.", "thought": True},
            {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(draft).decode()}, "thought": True},
            {"text": "Here is the poster."},
            {"inlineData": {"mimeType": "image/png", "data": PNG_B64}},
        ],
        usageMetadata={
            "promptTokenCount": 270,
            "toolUsePromptTokenCount": 5,
            "candidatesTokenCount": 1300,
            "thoughtsTokenCount": 220,
            "totalTokenCount": 1795,
        },
        modelVersion="gemini-3-pro-image-preview",
    )
    reply = gemini.parse(answer, image_job=True)
    assert reply.text == "Here is the poster." and reply.images == [ImageOut("image/png", final)]
    assert (reply.prompt_tokens, reply.completion_tokens) == (275, 1520)
    assert reply.model == "gemini-3-pro-image-preview" and reply.finish_reason == "STOP"


def test_gemini_snake_case_answers_are_read_like_camel_case() -> None:
    answer = {
        "candidates": [
            {
                "finish_reason": "STOP",
                "content": {"parts": [{"text": "hi"}, {"inline_data": {"mime_type": "image/png", "data": PNG_B64}}]},
            }
        ],
        "usage_metadata": {"prompt_token_count": 3, "candidates_token_count": 4},
    }
    reply = gemini.parse(answer)
    assert (reply.text, reply.images, reply.prompt_tokens, reply.completion_tokens) == (
        "hi",
        [ImageOut("image/png", PNG)],
        3,
        4,
    )


def test_gemini_function_call_args_become_a_json_string() -> None:
    reply = gemini.parse(gemini_answer([{"functionCall": {"name": "extract", "args": {"city": "Oslo", "n": 2}}}]))
    assert reply.tool_calls == [{"name": "extract", "arguments": '{"city":"Oslo","n":2}'}]
    assert reply.text is None


def test_gemini_outcomes() -> None:
    blocked = raises(gemini.parse, {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": {}})
    assert blocked.error_class == "blocked" and not blocked.retryable
    assert blocked.message == "prompt blocked: PROHIBITED_CONTENT"
    for reason in ("SAFETY", "IMAGE_SAFETY", "RECITATION", "NO_IMAGE"):
        stopped = raises(gemini.parse, gemini_answer([], reason))
        assert stopped.max_retries == 1 and reason in stopped.message
    no_image = raises(gemini.parse, gemini_answer([{"text": "only words"}]), True)
    assert no_image.error_class == "no_image" and no_image.message == "no image returned" and no_image.max_retries == 1
    cut = gemini.parse(gemini_answer([{"text": "cut o"}], "MAX_TOKENS"))
    assert cut.text == "cut o" and cut.finish_reason == "MAX_TOKENS"
    assert raises(gemini.parse, {"usageMetadata": {}}).error_class == "malformed"
    assert gemini.parse(gemini_answer([{"text": "x"}], None)).finish_reason is None  # unknown but usable
    assert raises(gemini.parse, gemini_answer([], "FINISH_REASON_UNSPECIFIED")).error_class == "malformed"


def test_gemini_stream_uses_running_usage_and_needs_a_finish_reason() -> None:
    first = gemini_answer([{"text": "Here "}], None, usageMetadata={"promptTokenCount": 9, "totalTokenCount": 9})
    last = gemini_answer(
        [{"text": "it is."}],
        usageMetadata={"promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12},
    )
    reply = feed(gemini.Answer(False), [first, last])
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == ("Here it is.", 9, 3)
    err = raises(feed, gemini.Answer(False), [first])
    assert err.error_class == "incomplete_stream" and err.retryable
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}}
    assert raises(feed, gemini.Answer(False), [blocked]).error_class == "blocked"


# --- framing: decided by the first non-blank byte (§4.3, §7 item 22) ------------------


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def read(parts: list[bytes], decoder: Decoder) -> Reply:
    return anyio.run(read_answer, _chunks(parts), decoder)


GEMINI = gemini.decoder(spec(model="gemini-2.5-flash", stream=True))
CHAT = openai_chat.decoder(spec(stream=False))


def test_framing_by_the_first_byte() -> None:
    answer = gemini_answer([{"text": "whole"}])
    assert read([b"\n  ", orjson.dumps(answer)], GEMINI).text == "whole"  # one JSON object: the whole answer
    events = [gemini_answer([{"text": "a"}], None), gemini_answer([{"text": "b"}])]
    assert read([orjson.dumps(events)], GEMINI).text == "ab"  # a JSON array of events
    sse = b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)
    assert read([sse[:7], sse[7:]], GEMINI).text == "ab"
    # SSE answering a non-stream request.
    chat_sse = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    assert read([chat_sse], CHAT).text == "hi"


def test_framing_failures() -> None:
    assert raises(read, [b"  \n"], CHAT).error_class == "malformed"
    html = raises(read, [b"<html><body>502 Bad Gateway</body></html>"], CHAT)
    assert html.error_class == "malformed" and "502 Bad Gateway" in html.message
    mid_stream_error = (
        b'data: {"choices":[{"index":0,"delta":{"content":"h"}}]}\n\n'
        b'data: {"error":{"message":"upstream overloaded","type":"upstream_error","code":"503"}}\n\n'
    )
    err = raises(read, [mid_stream_error], CHAT)
    assert err.message == "upstream overloaded" and err.retryable
    google = raises(read, [b'[{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "slow"}}]'], GEMINI)
    assert google.error_class == "rate_limited"
    assert raises(read, [b"data: {not json\n\n"], CHAT).error_class == "malformed"


def test_gemini_structured_output_in_gemini_dialect_unless_params_set_it() -> None:
    schema = {"type": "object", "properties": {"label": {"enum": ["positive", "negative"]}}, "required": ["label"]}
    json_job = {
        "provider": {"api": "gemini"},
        "model": "gemini-2.0-flash",
        "output": {"path": "o.parquet", "parse": "json", "schema": schema},
    }
    config = gemini.build(Request(None, "u"), spec(**json_job))["generationConfig"]
    assert config == {
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "OBJECT",
            "properties": {"label": {"type": "STRING", "enum": ["positive", "negative"]}},
            "required": ["label"],
        },
    }
    own = gemini.build(Request(None, "u"), spec(**json_job, params={"responseMimeType": "text/x.enum"}))
    assert own["generationConfig"] == {"responseMimeType": "text/x.enum"}
    # Gemini 2.5 and later take the schema as plain JSON Schema.
    for model in ("gemini-2.5-flash", "gemini-3-pro-preview"):
        newer = gemini.build(Request(None, "u"), spec(**{**json_job, "model": model}))["generationConfig"]
        assert newer == {"responseMimeType": "application/json", "responseJsonSchema": schema}


def test_base64_in_answers_in_both_alphabets() -> None:
    png = bytes(range(250, 256)) + b"\xfb\xff\xfe"  # bytes whose base64 differs between the alphabets
    standard, url_safe = base64.b64encode(png).decode(), base64.urlsafe_b64encode(png).decode().rstrip("=")
    assert standard != url_safe
    for data in (standard, url_safe):
        answer = {
            "candidates": [
                {
                    "content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": data}}]},
                    "finishReason": "STOP",
                }
            ]
        }
        assert gemini.parse(answer, image_job=True).images[0].data == png


# --- the registry: provider knowledge lives in protocols/ ---------------------------------

PACKAGE = Path(__file__).resolve().parent.parent / "batchrun"
# protocols/ owns the knowledge; the emulator is the relay's side, with a module per API of its own.
OWNERS = ("protocols", "emulator")


def api_name_branches(source: str, names: tuple[str, ...]) -> list[int]:
    """Lines that compare with an API name (`==`, `!=`, `in`, `match`) or key a table by one."""

    def named(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(named(item) for item in node.elts)
        return isinstance(node, ast.Constant) and node.value in names

    found: list[int] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(named(side) for side in [node.left, *node.comparators]):
            found.append(node.lineno)
        elif isinstance(node, ast.Dict) and any(key is not None and named(key) for key in node.keys):
            found.append(node.lineno)
        elif isinstance(node, ast.MatchValue) and named(node.value):
            found.append(node.lineno)
    return found


def test_no_branch_on_an_api_name_outside_protocols() -> None:
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] not in OWNERS
        for line in api_name_branches(path.read_text(encoding="utf-8"), APIS)
    ]
    assert not wrong, "branches on provider.api outside protocols/ (ask the protocol instead):\n" + "\n".join(wrong)


def test_the_scan_sees_each_kind_of_branch() -> None:
    source = 'if api == "gemini": pass\nx = api in ("openai-chat",)\nOWNED = {"gemini": 1}\n'
    source += 'match api:\n case "gemini": pass\n'
    assert api_name_branches(source, APIS) == [1, 2, 3, 5]
    assert api_name_branches('job = {"api": "gemini"}\n', APIS) == []  # naming one is not branching on it


def test_every_registered_protocol_declares_the_whole_interface() -> None:
    wanted = {name for name in WireProtocol.__annotations__} | {
        name for name in vars(WireProtocol) if not name.startswith("_")
    }
    for api in APIS:
        protocol = protocol_for(api)
        missing = sorted(name for name in wanted if not hasattr(protocol, name))
        assert not missing, f"{api} lacks {missing}"
        assert protocol.REPAIRS == hasattr(protocol, "repair_body")


def test_batch_file_urls_are_the_paths_of_their_protocols() -> None:
    for url, api in URL_APIS.items():
        protocol = protocol_for(api)
        assert protocol.OPENAI_BATCH and protocol.path(spec(provider={"api": api})) == url


def test_an_unknown_api_is_refused_in_one_line_naming_the_registry(tmp_path: Path) -> None:
    job = {
        "name": "t",
        "input": {"path": "x.csv"},
        "provider": {"api": "openai-responses"},
        "model": "m",
        "prompt": {"user": "u"},
        "output": {"path": "o.parquet"},
    }
    with pytest.raises(JobError) as info:
        job_from_dict(job, tmp_path)
    message = str(info.value)
    assert "\n" not in message and "provider.api" in message and "'openai-responses'" in message
    assert message.endswith("use one of " + ", ".join(APIS))  # the registry's names, in its order


# --- images -----------------------------------------------------------------------------


def test_image_answers_in_b64_and_url_and_their_failures() -> None:
    answer = {
        "created": 1,
        "data": [{"b64_json": PNG_B64, "revised_prompt": "r"}, {"url": "https://x/a.png", "revised_prompt": "r"}],
        "usage": {"input_tokens": 7, "output_tokens": 272, "total_tokens": 279},
    }
    reply = openai_images.parse(answer)
    assert reply.images == [ImageOut("image/png", PNG)] and reply.image_urls == ["https://x/a.png"]
    assert reply.text == "r" and (reply.prompt_tokens, reply.completion_tokens) == (7, 272)
    assert raises(openai_images.parse, {"created": 1, "data": []}).error_class == "no_image"
    assert raises(openai_images.parse, {"data": [{"b64_json": "%%"}]}).error_class == "malformed"
    assert raises(openai_images.parse, {"data": "x"}).error_class == "malformed"
    assert raises(openai_images.parse, {"error": {"message": "bad size", "code": 400}}).status == 400


def test_an_edit_body_is_a_form_with_files_and_a_generation_is_json() -> None:
    edit_settings = spec(provider={"api": "openai-images"}, prompt={"user": "u", "images": ["a", "m"]})
    request = Request(None, "paint", ("a", "m"), (ImageInput("image/png", PNG), ImageInput("image/png", b"MASK")))
    body = openai_images.build(request, replace(edit_settings, params={"mask": "last", "n": 2}))
    data, content_type = openai_images.encode(body)
    assert content_type is not None and content_type.startswith("multipart/form-data; boundary=")
    boundary = content_type.partition("boundary=")[2].encode()
    parts = data.split(b"--" + boundary)
    assert parts[-1] == b"--\r\n" and b'name="n"\r\n\r\n2\r\n' in data
    assert b'name="image"; filename="image0.png"\r\nContent-Type: image/png\r\n\r\n' + PNG in data
    assert b'name="mask"; filename="mask.png"\r\nContent-Type: image/png\r\n\r\nMASK\r\n' in data
    assert openai_images.path(edit_settings) == "/v1/images/edits"
    generation = spec(provider={"api": "openai-images"}, model="gpt-image-1", params={"size": "1024x1024"})
    assert openai_images.encode(openai_images.build(Request(None, "a cat"), generation)) == (
        orjson.dumps({"model": "gpt-image-1", "prompt": "a cat", "size": "1024x1024"}),
        None,
    )
    assert openai_images.path(generation) == "/v1/images/generations"


def test_the_capabilities_checks_ask_are_the_ones_protocols_declare() -> None:
    from batchrun.app.checks import _CAPABILITIES

    assert {capability for capability, *_ in _CAPABILITIES} <= set(WireProtocol.__annotations__)

"""OpenAI chat completions as the relay answers them, derived from the request, whole or as stream chunks."""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from batchrun.emulator import answers, pictures
from batchrun.emulator.streams import DONE, split_text

_TEXT_PARTS = ("text", "input_text")
_IMAGE_PARTS = ("image_url", "input_image")


def chat_prompt(messages: Any) -> str | None:
    """The text of the messages up to the first user message: the key for directives, counts and answers.

    Later turns (a repair's failed answer and follow-up) leave the key unchanged, so a
    `[[emulator: bad_json x 1]]` row answers badly once and well when asked again.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages) - 1)
    return _text(messages[: first_user + 1])


def _text(messages: list[dict[str, Any]]) -> str:
    texts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in _TEXT_PARTS]
    return "\n".join(texts)


def chat_images(messages: list[Any]) -> list[str]:
    """One description per image part: data URLs are decoded, other URLs are not fetched."""
    found: list[str] = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
                url = str((part.get("image_url") or {}).get("url", ""))
                found.append(pictures.describe_data_url(url) if url.startswith("data:") else f"the image at {url}")
    return found


# Answer faults the chat handler enacts itself: a 200 whose text is not the clean JSON asked for.
ANSWER_FAULTS = {"bad_json", "fenced_json", "prose_json"}


def chat_completion(body: dict[str, Any], prompt: str, request_id: str, fault: str | None = None) -> dict[str, Any]:
    seed = answers.digest(prompt)
    model = str(body.get("model", "unknown"))
    images = chat_images(body["messages"])
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    finish = "stop"
    forced = _forced_tools(body)
    if forced:
        message["tool_calls"] = [
            {
                "id": f"call_{seed % 10**8}_{i}",
                "type": "function",
                "function": {
                    "name": tool["name"],
                    "arguments": _with_fault(
                        orjson.dumps(answers.value_for(tool.get("parameters") or {}, seed, prompt)).decode(), fault
                    ),
                },
            }
            for i, tool in enumerate(forced)
        ]
        finish = "tool_calls"
        completion = sum(answers.count_tokens(c["function"]["arguments"]) for c in message["tool_calls"])
    else:
        schema = _response_schema(body)
        text = (
            _with_fault(orjson.dumps(answers.value_for(schema, seed, prompt)).decode(), fault)
            if schema is not None
            else answers.text_answer(prompt, images)
        )
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = answers.count_tokens(text)
        if isinstance(cap, int) and completion > cap:
            text, completion, finish = text[: cap * 4], cap, "length"
        if "gemini" in model and "image" in model:
            # A Gemini image model behind the chat path: the image as a Markdown data URI (§7 item 23).
            data = base64.b64encode(pictures.png(32, 32, seed)).decode()
            text += f"\n\n![image](data:image/png;base64,{data})"
            completion += 1290
        message["content"] = text
    # Every turn is billed; an image as OpenAI counts a small one at detail high (base 85 + one 512-px tile).
    prompt_tokens = answers.count_tokens(_text(body["messages"])) + 8 + (85 + 170) * len(images)
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": finish, "message": message}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


def chat_chunks(completion: dict[str, Any], include_usage: bool, text_pieces: int = 4) -> list[Any]:
    """The same answer as a stream: role chunk, content (or interleaved tool-call) chunks,
    finish chunk, the usage chunk with `choices: []` when asked for, then [DONE]."""
    head = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = completion["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    if "gemini" in completion["model"]:
        chunks.append(chunk({"reasoning_content": "Thinking it over."}))  # thoughts stay out of the answer
    chunks += [chunk({"content": piece}) for piece in split_text(message["content"] or "", text_pieces)]
    chunks += [chunk({"tool_calls": [fragment]}) for fragment in _call_fragments(message.get("tool_calls") or [])]
    chunks.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        chunks.append(head | {"choices": [], "usage": completion["usage"]})
    return [*chunks, DONE]


def _call_fragments(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each call opened by a fragment with id and name, then its arguments in pieces, calls interleaved."""
    opening = [
        {"index": i, "id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": ""}}
        for i, c in enumerate(calls)
    ]
    pieces = [split_text(c["function"]["arguments"], parts=3) for c in calls]
    rounds = [
        {"index": i, "function": {"arguments": p[n]}}
        for n in range(max((len(p) for p in pieces), default=0))
        for i, p in enumerate(pieces)
        if n < len(p)
    ]
    return opening + rounds


def _with_fault(json_text: str, fault: str | None) -> str:
    if fault == "bad_json":
        return json_text[: max(1, len(json_text) // 2)]  # cut in the middle: not JSON
    if fault == "fenced_json":
        return f"```json\n{json_text}\n```"
    if fault == "prose_json":
        return f"Here is the result: {json_text} Let me know if you need more."
    return json_text


# Models whose upstream rejects response_format json_schema (older ones do).
NO_JSON_SCHEMA_PREFIXES = ("gpt-3.5",)


def schema_rejection(body: dict[str, Any]) -> dict[str, Any] | None:
    """The 400 body OpenAI answers when the model does not support json_schema, or None."""
    fmt = body.get("response_format")
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"):
        return None
    if not str(body.get("model", "")).startswith(NO_JSON_SCHEMA_PREFIXES):
        return None
    return {
        "error": {
            "message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
            "type": "invalid_request_error",
            "param": "response_format",
            "code": None,
        }
    }


def _forced_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tools the emulator calls: the named one, every one for "required", else the first."""
    declared = [t.get("function") for t in body.get("tools") or [] if isinstance(t, dict)]
    tools: list[dict[str, Any]] = [t for t in declared if isinstance(t, dict) and "name" in t]
    choice = body.get("tool_choice", "auto" if tools else "none")
    if not tools or choice == "none":
        return []
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return [t for t in tools if t["name"] == name][:1]
    return tools if choice == "required" else tools[:1]


def _response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema") or {}
    return None

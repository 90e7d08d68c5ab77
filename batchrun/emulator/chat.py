"""OpenAI chat completions as the relay answers them, derived from the request."""

from __future__ import annotations

import time
from typing import Any

import orjson

from batchrun.emulator import answers


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
            texts += [
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", "input_text")
            ]
    return "\n".join(texts)


# Answer faults the chat handler enacts itself: a 200 whose text is not the clean JSON asked for.
ANSWER_FAULTS = {"bad_json", "fenced_json", "prose_json"}


def chat_completion(body: dict[str, Any], prompt: str, request_id: str, fault: str | None = None) -> dict[str, Any]:
    seed = answers.digest(prompt)
    model = str(body.get("model", "unknown"))
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    finish = "stop"
    forced = _forced_tool(body)
    if forced is not None:
        args = orjson.dumps(answers.value_for(forced.get("parameters") or {}, seed, prompt)).decode()
        message["tool_calls"] = [
            {
                "id": f"call_{seed % 10**8}",
                "type": "function",
                "function": {"name": forced["name"], "arguments": _with_fault(args, fault)},
            }
        ]
        finish = "tool_calls"
        completion = answers.count_tokens(message["tool_calls"][0]["function"]["arguments"])
    else:
        schema = _response_schema(body)
        text = (
            _with_fault(orjson.dumps(answers.value_for(schema, seed, prompt)).decode(), fault)
            if schema is not None
            else answers.text_answer(prompt)
        )
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = answers.count_tokens(text)
        if isinstance(cap, int) and completion > cap:
            text, completion, finish = text[: cap * 4], cap, "length"
        message["content"] = text
    prompt_tokens = answers.count_tokens(_text(body["messages"])) + 8  # every turn is billed
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


def _forced_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = [t.get("function") for t in body.get("tools") or [] if isinstance(t, dict)]
    tools = [t for t in tools if isinstance(t, dict) and "name" in t]
    choice = body.get("tool_choice", "auto" if tools else "none")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return next((t for t in tools if t["name"] == name), None)
    return tools[0]  # "auto" and "required": the emulator always calls the first tool


def _response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema") or {}
    return None

"""OpenAI chat completions as the relay answers them, derived from the request."""

from __future__ import annotations

import time
from typing import Any

import orjson

from batchrun.emulator import answers


def chat_prompt(messages: Any) -> str | None:
    """All message text joined: the key for directives, counts and deterministic answers."""
    if not isinstance(messages, list):
        return None
    texts: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            return None
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", "input_text")
            ]
    return "\n".join(texts)


def chat_completion(body: dict[str, Any], prompt: str, request_id: str) -> dict[str, Any]:
    seed = answers.digest(prompt)
    model = str(body.get("model", "unknown"))
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    finish = "stop"
    forced = _forced_tool(body)
    if forced is not None:
        args = answers.value_for(forced.get("parameters") or {}, seed, prompt)
        message["tool_calls"] = [
            {
                "id": f"call_{seed % 10**8}",
                "type": "function",
                "function": {"name": forced["name"], "arguments": orjson.dumps(args).decode()},
            }
        ]
        finish = "tool_calls"
        completion = answers.count_tokens(message["tool_calls"][0]["function"]["arguments"])
    else:
        schema = _response_schema(body)
        text = (
            orjson.dumps(answers.value_for(schema, seed, prompt)).decode()
            if schema is not None
            else answers.text_answer(prompt)
        )
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = answers.count_tokens(text)
        if isinstance(cap, int) and completion > cap:
            text, completion, finish = text[: cap * 4], cap, "length"
        message["content"] = text
    prompt_tokens = answers.count_tokens(prompt) + 8
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

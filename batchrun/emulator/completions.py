"""OpenAI legacy completions (POST /v1/completions) as the relay answers them."""

from __future__ import annotations

import time
from typing import Any

from batchrun.emulator import answers
from batchrun.emulator.streams import DONE, split_text

DEFAULT_MAX_TOKENS = 16  # the upstream's tiny default, why batchrun warns when max_tokens is unset


def completions_prompt(body: dict[str, Any]) -> str | None:
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else None


def completion(body: dict[str, Any], prompt: str, request_id: str) -> dict[str, Any]:
    text = answers.text_answer(prompt)
    cap = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    tokens, finish = answers.count_tokens(text), "stop"
    if isinstance(cap, int) and tokens > cap:
        text, tokens, finish = text[: cap * 4], cap, "length"
    prompt_tokens = answers.count_tokens(prompt)
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": str(body.get("model", "unknown")),
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens},
    }


def completion_chunks(whole: dict[str, Any], include_usage: bool) -> list[Any]:
    """Whole `text_completion` events, each with the next fragment; a finish event; usage; [DONE]."""
    head = {k: whole[k] for k in ("id", "object", "created", "model")}
    choice = whole["choices"][0]

    def event(text: str, finish: str | None = None) -> dict[str, Any]:
        return head | {"choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    events: list[Any] = [event(piece) for piece in split_text(choice["text"])]
    events.append(event("", choice["finish_reason"]))
    if include_usage:
        events.append(head | {"choices": [], "usage": whole["usage"]})
    return [*events, DONE]

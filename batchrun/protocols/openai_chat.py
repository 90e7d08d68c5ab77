"""OpenAI chat completions: POST /v1/chat/completions (PROTOCOL.md §2)."""

from __future__ import annotations

from typing import Any

import orjson

from batchrun.protocols.relay_errors import CallError, from_body
from batchrun.protocols.reply import Reply
from batchrun.render import Request
from batchrun.spec import JobSpec
from batchrun.structured import uses_native_schema

_PART_NAMES = {"standard": ("text", "image_url"), "responses": ("input_text", "input_image")}


def path(model: str, stream: bool) -> str:
    return "/v1/chat/completions"


def build(request: Request, spec: JobSpec) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": _user_content(request, spec.provider.image_part_style)})
    body: dict[str, Any] = {"model": spec.model, "messages": messages}
    if uses_native_schema(spec):
        # §2.4: no `strict` (it demands a schema few users write); params.response_format replaces this.
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": spec.output.json_schema},
        }
    # params go in as written: nothing renamed, dropped or defaulted.
    return {**body, **spec.params}


def repair_body(body: dict[str, Any], answer: str, message: str) -> dict[str, Any]:
    """The same request, continued: the failed answer, then a user message saying what is wrong with it."""
    follow_up = [{"role": "assistant", "content": answer}, {"role": "user", "content": message}]
    return {**body, "messages": [*body["messages"], *follow_up]}


def _user_content(request: Request, style: str) -> str | list[dict[str, Any]]:
    if not request.images:
        return request.user
    text_type, image_type = _PART_NAMES[style]
    parts: list[dict[str, Any]] = [{"type": text_type, "text": request.user}]
    parts += [{"type": image_type, "image_url": {"url": url}} for url in request.images]
    return parts


def parse(data: Any) -> Reply:
    if (err := from_body(data)) is not None:
        raise err
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise CallError("malformed", "malformed response: no choices", abort="C")
    choice = choices[0]
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    text = message.get("content") or None
    calls = [
        {"name": str(fn.get("name", "")), "arguments": _arguments(fn.get("arguments"))}
        for call in message.get("tool_calls") or []
        if isinstance(fn := call.get("function"), dict)
    ]
    if message.get("refusal"):
        raise CallError("refused", f"refused: {message['refusal']}", retryable=False)
    if finish == "content_filter":
        raise CallError("content_filter", "output withheld by the content filter", max_retries=1)
    if finish is None and text is None and not calls:
        raise CallError("malformed", "malformed response: no content and no finish_reason", abort="C")
    usage = data.get("usage") or {}
    return Reply(
        text=text,
        finish_reason=finish,
        model=data.get("model"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        tool_calls=calls,
    )


def _arguments(value: Any) -> str:
    # The model's JSON string is stored unchanged, even if it is not valid JSON.
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()

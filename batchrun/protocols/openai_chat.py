"""OpenAI chat completions: POST /v1/chat/completions (docs/protocol.md §2)."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import orjson

from batchrun.base.stops import StopRule
from batchrun.job.render import ImageInput, Request
from batchrun.job.settings import RequestSettings
from batchrun.protocols.relay_errors import CallError, from_body
from batchrun.protocols.reply import Decoder, ImageOut, Reply, decode_base64, text_field, token_count
from batchrun.protocols.shared import bearer, json_body, no_problems, openai_tools
from batchrun.protocols.sse import stream_cut

STREAMS = True
TOOLS = True
SCHEMA_DIALECT: str | None = "json_schema"  # response_format (§2.4)
IMAGES_IN = True
IMAGES_OUT = True  # a Gemini image model behind the chat path: Markdown data URIs (§7 item 23)
CONVERSATIONS = True
REPAIRS = True
OPENAI_BATCH = True
OWNED_PARAMS = frozenset({"model", "messages", "stream", "stream_options"})
CUT_OFF_REASONS = frozenset({"length"})
INLINE_IMAGE_URLS = False  # the upstream fetches http(s) URLs itself
INPUT_IMAGE_TOKENS = 85 + 170  # an image up to 512 px at detail high: base + one tile; for estimates
headers = bearer
encode = json_body
tool_declarations = openai_tools
job_problems = no_problems
job_warnings = no_problems
_PART_NAMES = {"standard": ("text", "image_url"), "responses": ("input_text", "input_image")}
# A Gemini image model behind the chat path returns its images as Markdown data URIs (§7 item 23).
_MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(data:(image/[\w.+-]+);base64,([A-Za-z0-9+/=_\-\s]+)\)")


def path(settings: RequestSettings) -> str:
    return "/v1/chat/completions"


def own_schema(params: dict[str, Any]) -> bool:
    """params.response_format replaces the one batchrun would derive from output.schema."""
    return "response_format" in params


def build(request: Request, settings: RequestSettings) -> dict[str, Any]:
    if request.body is not None:
        return written_body(request.body, settings, native_schema(settings))
    messages: list[dict[str, Any]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": request.system})
    style = settings.images.part_style if settings.images else "standard"
    if request.messages:
        messages += conversation_messages(request, style)
    else:
        messages.append({"role": "user", "content": _user_content(request, style)})
    body: dict[str, Any] = {"model": settings.model, "messages": messages, **native_schema(settings)}
    # params go in as written: nothing renamed, dropped or defaulted.
    return {**body, **settings.params, **stream_fields(settings)}


def native_schema(settings: RequestSettings) -> dict[str, Any]:
    """§2.4: `response_format` for output.schema; no `strict` (it demands a schema few users write)."""
    if settings.native_schema is None:
        return {}
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": settings.native_schema}}
    }


def written_body(body: dict[str, Any], settings: RequestSettings, added: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Batch line's body as written, with the job's model and params laid over it.

    `added` (a native schema) goes in only where the body has no such key. A streamed body
    asks for the usage chunk, so its tokens and cost are counted like any row's.
    """
    sent = {**{k: v for k, v in added.items() if k not in body}, **body, **settings.params}
    if settings.model is not None:
        sent["model"] = settings.model
    if settings.stream:
        sent.update(stream_fields(settings))
    elif sent.get("stream") is True and "stream_options" not in sent:
        sent["stream_options"] = {"include_usage": True}
    return sent


def conversation_messages(request: Request, style: str) -> list[dict[str, Any]]:
    """prompt.messages as chat messages, in order; image parts take the loaded images in turn."""
    text_type, image_type = _PART_NAMES[style]
    images = iter(request.image_inputs)
    messages: list[dict[str, Any]] = []
    for turn in request.messages:
        if turn.plain:
            messages.append({"role": turn.role, "content": turn.parts[0][1]})
            continue
        content = [
            {"type": text_type, "text": value}
            if kind == "text"
            else {"type": image_type, "image_url": {"url": _url(next(images))}}
            for kind, value in turn.parts
        ]
        messages.append({"role": turn.role, "content": content})
    return messages


def stream_fields(settings: RequestSettings) -> dict[str, Any]:
    """Streams always ask for the usage chunk (shared with completions)."""
    return {"stream": True, "stream_options": {"include_usage": True}} if settings.stream else {}


def repair_body(body: dict[str, Any], answer: str, message: str) -> dict[str, Any]:
    """The same request, continued: the failed answer, then a user message saying what is wrong with it."""
    follow_up = [{"role": "assistant", "content": answer}, {"role": "user", "content": message}]
    return {**body, "messages": [*body["messages"], *follow_up]}


def _user_content(request: Request, style: str) -> str | list[dict[str, Any]]:
    if not request.image_inputs:
        return request.user
    text_type, image_type = _PART_NAMES[style]
    parts: list[dict[str, Any]] = [{"type": text_type, "text": request.user}]
    parts += [{"type": image_type, "image_url": {"url": _url(image)}} for image in request.image_inputs]
    return parts


def _url(image: ImageInput) -> str:
    if image.url is not None:
        return image.url
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"


def decoder(settings: RequestSettings) -> Decoder:
    return Decoder(parse=parse, new_stream=Stream, stream=settings.stream)


def first_choice(data: Any) -> dict[str, Any]:
    """`choices[0]` of a whole answer; an error body is that error, no choices is malformed."""
    if (err := from_body(data)) is not None:
        raise err
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise CallError("malformed", "malformed response: no choices", abort=StopRule.C)
    return choices[0]


def parse(data: Any) -> Reply:
    choice = first_choice(data)
    message = choice.get("message") or {}
    if not isinstance(message, dict) or not isinstance(message.get("tool_calls") or [], list):
        raise CallError("malformed", "malformed response: the message is not an object", abort=StopRule.C)
    calls = [
        {"name": str(fn.get("name", "")), "arguments": _arguments(fn.get("arguments"))}
        for call in message.get("tool_calls") or []
        if isinstance(call, dict) and isinstance(fn := call.get("function"), dict)
    ]
    return reply_from(message.get("content"), message.get("refusal"), calls, choice.get("finish_reason"), data)


def reply_from(content: Any, refusal: Any, calls: list[dict[str, str]], finish: Any, answer: dict[str, Any]) -> Reply:
    """The row's outcome (§2.5), the same for a whole answer and a stream (`answer` gives model and usage).

    Answers are checked here, not trusted: a content or finish reason of another type is malformed;
    odd usage counts are kept as null with a note (reply.token_count).
    """
    if content is not None and not isinstance(content, str):
        raise CallError("malformed", "malformed response: the content is not a string", abort=StopRule.C)
    finish = text_field(finish, "finish_reason")
    text = content or None
    if refusal:
        raise CallError("refused", f"refused: {refusal}", retryable=False)
    if finish == "content_filter":
        raise CallError("content_filter", "output withheld by the content filter", max_retries=1)
    if finish is None and text is None and not calls:
        raise CallError("malformed", "malformed response: no content and no finish_reason", abort=StopRule.C)
    text, images = _markdown_images(text)
    usage = answer.get("usage") or {}
    notes: list[str] = []
    if not isinstance(usage, dict):
        notes.append("usage was not an object: token counts stored as null")
        usage = {}
    return Reply(
        text=text,
        finish_reason=finish,
        model=text_field(answer.get("model"), "model"),
        prompt_tokens=token_count(usage.get("prompt_tokens"), "prompt_tokens", notes),
        completion_tokens=token_count(usage.get("completion_tokens"), "completion_tokens", notes),
        cached_tokens=_cached_tokens(usage, notes),
        tool_calls=calls,
        images=images,
        notes=notes,
    )


def _cached_tokens(usage: dict[str, Any], notes: list[str]) -> int | None:
    """usage.prompt_tokens_details.cached_tokens (docs/caching.md); None when the relay does not say."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return None
    return token_count(details.get("cached_tokens"), "prompt_tokens_details.cached_tokens", notes)


def _markdown_images(text: str | None) -> tuple[str | None, list[ImageOut]]:
    """Data-URI images out of the text, each replaced by `[image N]` (N counts from 1)."""
    if text is None or "data:image/" not in text:
        return text, []
    images: list[ImageOut] = []

    def take(m: re.Match[str]) -> str:
        try:
            data = decode_base64(m.group(2))
        except binascii.Error:
            return m.group(0)  # not an image after all: leave the text as it came
        images.append(ImageOut(m.group(1), data))
        return f"[image {len(images)}]"

    return _MARKDOWN_IMAGE.sub(take, text), images


def _arguments(value: Any) -> str:
    # The model's JSON string is stored unchanged, even if it is not valid JSON.
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


class Stream:
    """A chat stream (§2.6): deltas of choice 0 concatenated, tool calls merged by index."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._refusal: list[str] = []
        self._calls: dict[int, dict[str, str]] = {}
        self._finish: str | None = None
        self._answer: dict[str, Any] = {}  # id, created, model and usage, as a whole answer would carry them
        self._call_ids: dict[int, str] = {}
        self._done = False
        self.size = 0

    def add(self, event: Any) -> None:
        if not isinstance(event, dict):
            raise CallError("malformed", "malformed stream event: not an object", abort=StopRule.C)
        for key in ("id", "created", "model", "system_fingerprint"):
            if event.get(key):
                self._answer[key] = event[key]
        if event.get("usage") is not None:
            self._answer["usage"] = event["usage"]  # checked with the rest in reply_from
        choices = event.get("choices") or []
        if not isinstance(choices, list):
            raise CallError("malformed", "malformed stream event: choices is not a list", abort=StopRule.C)
        # Usage chunks and keepalives have no choices; only choice 0 is read (n = 1).
        for choice in choices:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._add_choice(choice)
                if choice.get("finish_reason"):
                    self._finish = choice["finish_reason"]

    def _add_choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict) or not isinstance(delta.get("tool_calls") or [], list):
            raise CallError("malformed", "malformed stream event: the delta is not an object", abort=StopRule.C)
        if delta.get("content") is not None and not isinstance(delta["content"], str):
            raise CallError("malformed", "malformed response: the content is not a string", abort=StopRule.C)
        if isinstance(delta.get("content"), str):
            self._text.append(delta["content"])
            self.size += len(delta["content"])
        if isinstance(delta.get("refusal"), str):
            self._refusal.append(delta["refusal"])
            self.size += len(delta["refusal"])
        # delta.reasoning_content (a Gemini model behind the chat path) is thinking, not the answer.
        for fragment in delta.get("tool_calls") or []:
            if isinstance(fragment, dict):
                self._merge_call(fragment)

    def _merge_call(self, fragment: dict[str, Any]) -> None:
        index, function = fragment.get("index", 0), fragment.get("function") or {}
        if not isinstance(index, int) or not isinstance(function, dict):
            raise CallError("malformed", "malformed stream event: a tool call fragment is malformed", abort=StopRule.C)
        call = self._calls.setdefault(index, {"name": "", "arguments": ""})
        if isinstance(fragment.get("id"), str):
            self._call_ids.setdefault(index, fragment["id"])
        call["name"] = call["name"] or str(function.get("name") or "")
        if isinstance(function.get("arguments"), str):
            call["arguments"] += function["arguments"]
            self.size += len(function["arguments"])

    def done(self) -> None:
        self._done = True

    def reply(self) -> Reply:
        # [DONE] alone is not trusted: a relay that cut a stream may still write a tidy ending.
        if self._finish is None:
            raise stream_cut("no finish_reason")
        if not self._done:
            raise stream_cut("no [DONE]")
        calls = [self._calls[i] for i in sorted(self._calls)]
        return reply_from("".join(self._text), "".join(self._refusal), calls, self._finish, self._answer)

    def whole(self) -> dict[str, Any]:
        """The `chat.completion` this stream stands for (choice 0, the only one read)."""
        # No text (a role chunk's "" aside) is content null, as a whole answer with tool calls has it;
        # refusal and logprobs are there even when null, as the API's schema requires them.
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self._text) or None,
            "refusal": "".join(self._refusal) or None,
        }
        if self._calls:
            message["tool_calls"] = [
                {"id": self._call_ids.get(i, ""), "type": "function", "function": dict(self._calls[i])}
                for i in sorted(self._calls)
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish}
        return self._whole("chat.completion", choice)

    def _whole(self, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        head: dict[str, Any] = {
            k: self._answer[k] for k in ("id", "created", "model", "system_fingerprint") if k in self._answer
        }
        return {**head, "object": kind, "choices": [choice], "usage": self._answer.get("usage")}

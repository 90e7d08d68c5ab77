"""OpenAI legacy completions: POST /v1/completions (docs/protocol.md §3).

One `prompt` string (the system prompt, a blank line, the user prompt); the
answer is `choices[0].text`, streamed as whole `text_completion` events whose
text is the next fragment. Outcomes follow chat (§2.5).
"""

from __future__ import annotations

from typing import Any

from batchrun.base.stops import StopRule
from batchrun.job.render import Request
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import JobSpec
from batchrun.protocols import openai_chat
from batchrun.protocols.relay_errors import CallError
from batchrun.protocols.reply import Decoder, Reply
from batchrun.protocols.shared import bearer, json_body, no_problems

STREAMS = True
TOOLS = False
SCHEMA_DIALECT: str | None = None  # no structured output: answers are still checked against output.schema
IMAGES_IN = False
IMAGES_OUT = False
CONVERSATIONS = False  # one prompt string
REPAIRS = False
OPENAI_BATCH = True
OWNED_PARAMS = frozenset({"model", "prompt", "stream", "stream_options"})
CUT_OFF_REASONS = frozenset({"length"})
INLINE_IMAGE_URLS = False  # no images on this API
INPUT_IMAGE_TOKENS = 0  # no images on this API
headers = bearer
encode = json_body
job_problems = no_problems


def path(settings: RequestSettings) -> str:
    return "/v1/completions"


def tool_declarations(params: dict[str, Any]) -> list[dict[str, Any]]:
    return []  # no tools on this API


def own_schema(params: dict[str, Any]) -> bool:
    return False


def job_warnings(spec: JobSpec) -> list[tuple[str, str]]:
    if "max_tokens" not in spec.params:
        return [("params", "max_tokens is not set; the completions default is tiny (16 tokens)")]
    return []


def build(request: Request, settings: RequestSettings) -> dict[str, Any]:
    if request.body is not None:
        return openai_chat.written_body(request.body, settings, {})
    prompt = request.user if request.system is None else f"{request.system}\n\n{request.user}"
    return {"model": settings.model, "prompt": prompt, **settings.params, **openai_chat.stream_fields(settings)}


def decoder(settings: RequestSettings) -> Decoder:
    return Decoder(parse=parse, new_stream=Stream, stream=settings.stream)


def parse(data: Any) -> Reply:
    choice = openai_chat.first_choice(data)
    return openai_chat.reply_from(choice.get("text"), None, [], choice.get("finish_reason"), data)


class Stream(openai_chat.Stream):
    """Like a chat stream, with each event's `choices[0].text` as the next fragment."""

    def _add_choice(self, choice: dict[str, Any]) -> None:
        if choice.get("text") is not None and not isinstance(choice["text"], str):
            raise CallError("malformed", "malformed response: the text is not a string", abort=StopRule.C)
        if isinstance(choice.get("text"), str):
            self._text.append(choice["text"])
            self.size += len(choice["text"])

    def whole(self) -> dict[str, Any]:
        """The `text_completion` this stream stands for."""
        choice = {"index": 0, "text": "".join(self._text), "logprobs": None, "finish_reason": self._finish}
        return self._whole("text_completion", choice)

"""Gemini generateContent / streamGenerateContent?alt=sse (docs/protocol.md §4).

Answers are read in camelCase or snake_case. Thought parts (reasoning and
interim draft images) are skipped; the other images are kept in order, the last
being the final one. A blocked prompt is not retried; a safety stop, or an
image job answered without an image, is retried at most once.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from functools import cache, partial
from typing import Any

import orjson

from batchrun.base.stops import StopRule
from batchrun.job.render import ImageInput, Request
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import JobSpec
from batchrun.protocols.gemini_schema import gemini_response_schema
from batchrun.protocols.relay_errors import CallError, from_body
from batchrun.protocols.reply import Decoder, ImageOut, Reply, decode_base64, text_field, token_count
from batchrun.protocols.shared import bearer, json_body
from batchrun.protocols.sse import stream_cut

STREAMS = True
TOOLS = True
SCHEMA_DIALECT: str | None = "gemini"  # responseJsonSchema, or the OpenAPI-style responseSchema (§4.1)
IMAGES_IN = True
IMAGES_OUT = True
CONVERSATIONS = True
REPAIRS = False
OPENAI_BATCH = False
OWNED_PARAMS = frozenset({"contents", "systemInstruction", "system_instruction"})
CUT_OFF_REASONS = frozenset({"MAX_TOKENS"})
INLINE_IMAGE_URLS = True  # a Gemini-bound channel may not fetch URLs: batchrun downloads them
INPUT_IMAGE_TOKENS = 258  # an input image up to 384 px a side (larger ones: 258 a 768-px tile); for estimates
encode = json_body
TOP_LEVEL_PARAMS = ("safetySettings", "tools", "toolConfig", "cachedContent")
_CONTENT_STOPS = {
    "SAFETY",
    "RECITATION",
    "LANGUAGE",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "OTHER",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
    "IMAGE_OTHER",
}
_TOOL_STOPS = {"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS"}


_NATIVE_SCHEMA_KEYS = {"responseSchema", "responseJsonSchema", "responseMimeType"}
_MODEL_FORBIDDEN = re.compile(r"[/?#:\s]")


def headers(api_key: str) -> dict[str, str]:
    """Bearer, and Google's own key header, read by Gemini-native proxies (docs/relays.md)."""
    return {**bearer(api_key), "x-goog-api-key": api_key} if api_key else {}


def path(settings: RequestSettings) -> str:
    model = urllib.parse.quote(settings.model or "", safe="")
    # Always alt=sse: without it Google streams one JSON array and old relays answer unstreamed.
    if settings.stream:
        return f"/v1beta/models/{model}:streamGenerateContent?alt=sse"
    return f"/v1beta/models/{model}:generateContent"


def tool_declarations(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The `functionDeclarations` (or `function_declarations`) of params.tools."""
    tools = params.get("tools")
    found: list[dict[str, Any]] = []
    for tool in tools if isinstance(tools, list) else []:
        for key in ("functionDeclarations", "function_declarations"):
            if isinstance(tool, dict):
                found += [d for d in tool.get(key) or [] if isinstance(d, dict)]
    return found


def own_schema(params: dict[str, Any]) -> bool:
    """params that set responseSchema, responseJsonSchema or responseMimeType themselves (§4.1)."""
    return bool(_NATIVE_SCHEMA_KEYS & set(_config_of(params)))


def job_problems(spec: JobSpec) -> list[tuple[str, str]]:
    if spec.model is not None and _MODEL_FORBIDDEN.search(spec.model):
        return [("model", f"{spec.model!r}: a Gemini model is its bare id, without / ? # : or spaces")]
    return []


def job_warnings(spec: JobSpec) -> list[tuple[str, str]]:
    modalities = _config_of(spec.params).get("responseModalities")
    if spec.output.images_dir and isinstance(modalities, list) and "IMAGE" not in [str(m).upper() for m in modalities]:
        return [("output.images_dir", "is set but params.responseModalities lacks IMAGE: no image will come")]
    return []


def build(request: Request, settings: RequestSettings) -> dict[str, Any]:
    system = [{"text": request.system}] if request.system is not None else []
    if request.messages:
        contents, system_turns = conversation_contents(request)
        system += system_turns
    else:
        # Reference images first, then the text; every image inline (batchrun downloads URLs itself).
        parts = [_inline(image) for image in request.image_inputs] + [{"text": request.user}]
        contents = [{"role": "user", "parts": parts}]
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    body.update({key: value for key, value in settings.params.items() if key in TOP_LEVEL_PARAMS})
    if config := generation_config(settings):
        body["generationConfig"] = config
    return body


def conversation_contents(request: Request) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """prompt.messages as `contents` (assistant turns are Gemini's `model` role) and the parts of system turns,
    which Gemini takes only in `systemInstruction`; image parts take the loaded images in turn."""
    images = iter(request.image_inputs)  # fewer only in validate's preview, which downloads nothing
    contents: list[dict[str, Any]] = []
    system: list[dict[str, Any]] = []
    for turn in request.messages:
        parts: list[dict[str, Any]] = []
        for kind, value in turn.parts:
            if kind == "text":
                parts.append({"text": value})
            elif (image := next(images, None)) is not None:
                parts.append(_inline(image))
        if turn.role == "system":
            system += parts
        else:
            contents.append({"role": "model" if turn.role == "assistant" else "user", "parts": parts})
    return contents, system


def _inline(image: ImageInput) -> dict[str, Any]:
    return {"inlineData": {"mimeType": image.mime, "data": base64.b64encode(image.data).decode()}}


def generation_config(settings: RequestSettings) -> dict[str, Any]:
    """params in Gemini's names: a `generationConfig` mapping and every key not sent at the top level;
    with a schema, structured output in Gemini's dialect unless params set their own (§4.1)."""
    config = _config_of(settings.params)
    if settings.native_schema is not None:  # None too when params set their own (own_schema)
        config["responseMimeType"] = "application/json"
        if takes_json_schema(settings.model):
            config["responseJsonSchema"] = settings.native_schema
        else:
            config["responseSchema"] = gemini_response_schema(settings.native_schema)
    return config


def _config_of(params: dict[str, Any]) -> dict[str, Any]:
    """A `generationConfig` mapping in params and every key not sent at the top level, merged."""
    config = dict(params.get("generationConfig") or {})
    config.update(
        {key: value for key, value in params.items() if key not in TOP_LEVEL_PARAMS and key != "generationConfig"}
    )
    return config


_GEMINI_VERSION = re.compile(r"gemini-(\d+)(?:\.(\d+))?")


def takes_json_schema(model: str | None) -> bool:
    """Gemini 2.5 and later take plain JSON Schema as `responseJsonSchema` (docs/relays.md);
    older or unknown models get the OpenAPI-style `responseSchema` dialect, which every version reads."""
    found = _GEMINI_VERSION.search((model or "").lower())  # no model: a Batch file names one per line
    if found is None:
        return False
    return (int(found.group(1)), int(found.group(2) or 0)) >= (2, 5)


def expects_images(settings: RequestSettings) -> bool:
    """An image job: IMAGE among responseModalities, or (when unset) an image model id."""
    modalities = generation_config(settings).get("responseModalities")
    if isinstance(modalities, list):
        return any(str(m).upper() == "IMAGE" for m in modalities)
    return "image" in (settings.model or "").lower()


def decoder(settings: RequestSettings) -> Decoder:
    image_job = expects_images(settings)
    return Decoder(
        parse=partial(parse, image_job=image_job), new_stream=partial(Answer, image_job), stream=settings.stream
    )


def parse(data: Any, image_job: bool = False) -> Reply:
    if (err := from_body(data)) is not None:
        raise err
    answer = Answer(image_job, streamed=False)
    answer.add(data)
    if not answer.had_candidates:
        raise CallError("malformed", "malformed response: no candidates and no blockReason", abort=StopRule.C)
    return answer.reply()


@cache
def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _get(obj: dict[str, Any], camel: str) -> Any:
    """A field in camelCase or snake_case (`inlineData` / `inline_data`)."""
    value = obj.get(camel)
    return obj.get(_snake(camel)) if value is None else value


def _tokens(usage: dict[str, Any], camels: tuple[str, ...], notes: list[str]) -> int | None:
    """The sum of these usageMetadata counts (absent ones are 0); None, with a note, if one is not a count."""
    counts = [token_count(_get(usage, c), c, notes) if _get(usage, c) is not None else 0 for c in camels]
    return None if None in counts else sum(counts)  # type: ignore[arg-type]


def _cached_tokens(usage: dict[str, Any] | None, notes: list[str]) -> int | None:
    """usageMetadata.cachedContentTokenCount (docs/caching.md): absent is 0, as Gemini leaves out zero counts."""
    return _tokens(usage, ("cachedContentTokenCount",), notes) if usage else None


class Answer:
    """One GenerateContentResponse, or the events of a stream, each holding only new parts (§4.3)."""

    def __init__(self, image_job: bool, streamed: bool = True) -> None:
        self.image_job = image_job
        self.streamed = streamed
        self.had_candidates = False
        self._text: list[str] = []
        self._images: list[ImageOut] = []
        self._calls: list[dict[str, str]] = []
        self._finish: str | None = None
        self._usage: Any = None  # checked in reply()
        self._model: str | None = None
        self.size = 0

    def add(self, event: Any) -> None:
        if not isinstance(event, dict):
            raise CallError("malformed", "malformed response: not an object", abort=StopRule.C)
        feedback = _get(event, "promptFeedback")
        if isinstance(feedback, dict) and (reason := _get(feedback, "blockReason")):
            # The same prompt would be blocked again: not retried.
            raise CallError("blocked", f"prompt blocked: {reason}", retryable=False)
        if (usage := _get(event, "usageMetadata")) is not None:
            self._usage = usage  # running totals: the last one counts
        self._model = text_field(_get(event, "modelVersion"), "modelVersion") or self._model
        candidates = _get(event, "candidates")
        if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
            return
        self.had_candidates = True
        content = _get(candidates[0], "content")
        parts = (_get(content, "parts") if isinstance(content, dict) else None) or []
        if not isinstance(parts, list):
            raise CallError("malformed", "malformed response: content.parts is not a list", abort=StopRule.C)
        for part in parts:
            if isinstance(part, dict) and not _get(part, "thought"):
                self._add_part(part)
        self._finish = text_field(_get(candidates[0], "finishReason"), "finishReason") or self._finish

    def _add_part(self, part: dict[str, Any]) -> None:
        if isinstance(text := _get(part, "text"), str):
            self._text.append(text)
            self.size += len(text)
        inline = _get(part, "inlineData")
        if isinstance(inline, dict) and str(_get(inline, "mimeType") or "").startswith("image/"):
            try:
                data = decode_base64(_string(inline.get("data")))
            except (binascii.Error, ValueError):
                raise CallError(
                    "malformed", "malformed response: an image's base64 is invalid", abort=StopRule.C
                ) from None
            self._images.append(ImageOut(_get(inline, "mimeType"), data))
            self.size += len(data)
        call = _get(part, "functionCall")
        if isinstance(call, dict):
            args = call.get("args") or {}
            self._calls.append({"name": str(call.get("name", "")), "arguments": orjson.dumps(args).decode()})

    def done(self) -> None:
        """Gemini streams have no [DONE]; one that comes anyway proves nothing."""

    def whole(self) -> dict[str, Any]:
        """The GenerateContentResponse this stream stands for: its text, images and calls (thoughts left out)."""
        parts: list[dict[str, Any]] = [{"text": "".join(self._text)}] if self._text else []
        parts += [{"inlineData": {"mimeType": i.mime, "data": base64.b64encode(i.data).decode()}} for i in self._images]
        parts += [{"functionCall": {"name": c["name"], "args": orjson.loads(c["arguments"])}} for c in self._calls]
        candidate = {"content": {"role": "model", "parts": parts}, "finishReason": self._finish, "index": 0}
        return {"candidates": [candidate], "usageMetadata": self._usage, "modelVersion": self._model}

    def reply(self) -> Reply:
        finish = self._finish
        if self.streamed and finish is None:
            raise stream_cut("no finishReason")
        if finish in _CONTENT_STOPS or finish == "NO_IMAGE":
            raise CallError("content_filter", f"the model stopped: finishReason {finish}", max_retries=1)
        if finish in _TOOL_STOPS:
            raise CallError("tool_call", f"the model stopped: finishReason {finish}", max_retries=1)
        text = "".join(self._text) or None
        if self.image_job and not self._images and finish != "MAX_TOKENS":
            raise CallError("no_image", "no image returned", max_retries=1)
        if finish not in ("STOP", "MAX_TOKENS") and text is None and not self._images and not self._calls:
            raise CallError("malformed", f"malformed response: no output (finishReason {finish})", abort=StopRule.C)
        usage, notes = self._usage, []
        if usage is not None and not isinstance(usage, dict):
            notes.append("usageMetadata was not an object: token counts stored as null")
            usage = None
        return Reply(
            text=text,
            finish_reason=finish,
            model=self._model,
            prompt_tokens=_tokens(usage, ("promptTokenCount", "toolUsePromptTokenCount"), notes) if usage else None,
            completion_tokens=_tokens(usage, ("candidatesTokenCount", "thoughtsTokenCount"), notes) if usage else None,
            cached_tokens=_cached_tokens(usage, notes),
            tool_calls=self._calls,
            images=self._images,
            notes=notes,
        )


def _string(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    raise ValueError("not a string")

"""Gemini generateContent / streamGenerateContent as the relay answers them (docs/protocol.md §4).

Text models answer text (or a forced functionCall); image models (an id with
"image") answer a text part and a small real PNG, and "pro" models think first:
a thought text and a thought draft image that a client must not keep. Usage
comes in Gemini's own fields, the total above prompt + candidates when thinking.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

import orjson

from batchrun.emulator import answers, pictures
from batchrun.emulator.streams import split_text

# Content outcomes chosen by directive: a blocked prompt, safety stops, an image model answering text only.
GEMINI_FAULTS = {"blocked", "safety", "image-safety", "no-image", "text-only"}
_FINISH = {"safety": "SAFETY", "image-safety": "IMAGE_SAFETY", "no-image": "NO_IMAGE"}
IMAGE_TOKENS = 1290  # what Gemini counts for a generated image of about 1024 px
INPUT_IMAGE_TOKENS = 258
THOUGHT_TOKENS = 96


def _get(obj: dict[str, Any], camel: str, snake: str) -> Any:
    return obj.get(camel, obj.get(snake))


def gemini_prompt(body: dict[str, Any]) -> str | None:
    """The system instruction and every text part, joined."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not all(isinstance(c, dict) for c in contents):
        return None
    system = _get(body, "systemInstruction", "system_instruction")
    sources = ([system] if isinstance(system, dict) else []) + contents
    texts = [
        p["text"]
        for s in sources
        for p in s.get("parts") or []
        if isinstance(p, dict) and isinstance(p.get("text"), str)
    ]
    return "\n".join(texts)


def _input_images(body: dict[str, Any]) -> list[bytes]:
    found: list[bytes] = []
    for content in body["contents"]:
        for part in content.get("parts") or []:
            inline = _get(part, "inlineData", "inline_data") if isinstance(part, dict) else None
            if isinstance(inline, dict):
                try:
                    found.append(pictures.decode_base64(str(inline.get("data") or "")))
                except binascii.Error:
                    found.append(b"")
            elif isinstance(part, dict) and isinstance(file := _get(part, "fileData", "file_data"), dict):
                found.append(str(_get(file, "fileUri", "file_uri")).encode())  # not fetched: its name stands in
    return found


def gemini_events(
    body: dict[str, Any], model: str, prompt: str, fault: str | None, request_id: str, cached_tokens: int = 0
) -> list[Any]:
    """The answer as stream events: each part (text in pieces) in its own event, every image whole,
    finishReason and the final usage on the last; running-total usage on the others.
    `cached_tokens` of the prompt were read from the cache (emulator/cache.py): said as Gemini says it."""
    images_in = _input_images(body)
    prompt_tokens = answers.count_tokens(prompt) + INPUT_IMAGE_TOKENS * len(images_in)
    head: dict[str, Any] = {"modelVersion": model, "responseId": f"r-{request_id}"}
    if fault == "blocked":
        usage = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
        return [head | {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": usage}]
    parts, finish, output_tokens = _parts(body, model, prompt, fault, images_in)
    thinking = "pro" in model
    thoughts = THOUGHT_TOKENS if thinking else 0
    running = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
    if cached_tokens:
        running["cachedContentTokenCount"] = cached_tokens
    events = [
        head | {"candidates": [{"index": 0, "content": {"role": "model", "parts": [p]}}], "usageMetadata": running}
        for part in parts
        for p in ([{**part, "text": t} for t in split_text(part["text"])] if "text" in part else [part])
    ]
    final_usage = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": output_tokens,
        "totalTokenCount": prompt_tokens + output_tokens + thoughts,
    }
    if thinking:
        final_usage["thoughtsTokenCount"] = thoughts
    if cached_tokens:
        final_usage["cachedContentTokenCount"] = cached_tokens
    last = head | {"candidates": [{"index": 0, "finishReason": finish}], "usageMetadata": final_usage}
    if events:
        last["candidates"][0]["content"] = events.pop()["candidates"][0]["content"]
    return [*events, last]


def gemini_whole(events: list[Any]) -> dict[str, Any]:
    """The events merged into one GenerateContentResponse, as generateContent answers."""
    last = events[-1]
    if "candidates" not in last:
        return last
    parts: list[dict[str, Any]] = []
    for event in events:
        for part in event["candidates"][0].get("content", {}).get("parts", []):
            if "text" in part and parts and "text" in parts[-1] and part.get("thought") == parts[-1].get("thought"):
                parts[-1] = {**parts[-1], "text": parts[-1]["text"] + part["text"]}
            else:
                parts.append(part)
    candidate = {"index": 0, "finishReason": last["candidates"][0]["finishReason"]}
    if parts:
        candidate["content"] = {"role": "model", "parts": parts}
    return {k: v for k, v in last.items() if k != "candidates"} | {"candidates": [candidate]}


def _parts(
    body: dict[str, Any], model: str, prompt: str, fault: str | None, images_in: list[bytes]
) -> tuple[list[dict[str, Any]], str, int]:
    """The answer's parts, finishReason and output tokens."""
    config = _get(body, "generationConfig", "generation_config") or {}
    seed = answers.digest(prompt + "".join(hashlib.blake2b(i, digest_size=8).hexdigest() for i in images_in))
    modalities = [str(m).upper() for m in config.get("responseModalities") or ["TEXT", "IMAGE"]]
    makes_image = "image" in model and "IMAGE" in modalities and fault != "text-only"
    parts: list[dict[str, Any]] = []
    if "pro" in model:
        parts.append({"text": "Planning the layout before drawing.", "thought": True})
        if makes_image:
            parts.append({"inlineData": _png(32, 32, seed + 1), "thought": True})  # an interim draft
    if fault == "safety":
        return parts, "SAFETY", 0
    call = _forced_call(body, seed, prompt)
    if call is not None:
        return [*parts, {"functionCall": call}], "STOP", answers.count_tokens(str(call["args"]))
    schema = config.get("responseJsonSchema")  # plain JSON Schema (Gemini 2.5 and later)
    if not isinstance(schema, dict) and isinstance(config.get("responseSchema"), dict):
        schema = _lower_types(config["responseSchema"])  # the OpenAPI-style dialect
    if isinstance(schema, dict):
        text = orjson.dumps(answers.value_for(schema, seed, prompt)).decode()
    elif "image" in model:
        based_on = f", after {len(images_in)} reference image(s)" if images_in else ""
        text = f"Here is the image{based_on}: {answers.text_answer(prompt)}"
    else:
        text = answers.text_answer(prompt, [pictures.describe(i) for i in images_in])
    tokens, finish = answers.count_tokens(text), _FINISH.get(fault or "", "STOP")
    cap = config.get("maxOutputTokens")
    if isinstance(cap, int) and tokens > cap:
        text, tokens, finish = text[: cap * 4], cap, "MAX_TOKENS"
    parts.append({"text": text})
    if makes_image and finish == "STOP":
        ratio = (config.get("imageConfig") or {}).get("aspectRatio")
        # A reference image lends the result its main colour, so the link shows by eye.
        colour = next((c for c in map(pictures.main_colour, images_in) if c), None)
        background = pictures.palette_rgb(colour) if colour else None
        parts.append({"inlineData": _png(*pictures.png_size(ratio), seed, background)})
        tokens += IMAGE_TOKENS
    return parts, finish, tokens


def _png(width: int, height: int, seed: int, background: tuple[int, int, int] | None = None) -> dict[str, str]:
    data = pictures.png(width, height, seed, background)
    return {"mimeType": "image/png", "data": base64.b64encode(data).decode()}


def _forced_call(body: dict[str, Any], seed: int, prompt: str) -> dict[str, Any] | None:
    """With functionCallingConfig mode ANY, a call of the first allowed declaration."""
    calling = (_get(body, "toolConfig", "tool_config") or {}).get("functionCallingConfig") or {}
    if str(calling.get("mode", "")).upper() != "ANY":
        return None
    declarations = [
        d for t in body.get("tools") or [] for d in _get(t, "functionDeclarations", "function_declarations") or []
    ]
    allowed = calling.get("allowedFunctionNames")
    declarations = [d for d in declarations if not allowed or d.get("name") in allowed]
    if not declarations:
        return None
    schema = _lower_types(declarations[0].get("parameters") or {})
    return {"name": declarations[0].get("name", ""), "args": answers.value_for(schema, seed, prompt)}


def _lower_types(schema: Any) -> Any:
    """Gemini's OpenAPI-style schemas spell types OBJECT, STRING; the answer generator reads JSON Schema."""
    if isinstance(schema, dict):
        return {k: (v.lower() if k == "type" and isinstance(v, str) else _lower_types(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_lower_types(v) for v in schema]
    return schema

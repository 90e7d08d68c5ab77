"""OpenAI image generation and editing (POST /v1/images/generations, /v1/images/edits) as the relay answers them.

Generations take JSON, edits a multipart form (read by `read_form` into the same
shape, files as bytes). Each answer holds `n` small real PNGs drawn from the prompt,
as `b64_json` or, with `response_format: url`, as links to this emulator's own
`/_emulator/images/`. An edit's first image lends the result its main colour, and
`revised_prompt` says what came in (images, mask), so tests see it by eye and in text.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from aiohttp import web

from batchrun.emulator import answers, pictures
from batchrun.emulator.faults import json_response, relay_error

IMAGE_TOKENS = 272  # what GPT Image counts for a low-quality square image: usage looks like the API's


async def read_form(request: web.Request, request_id: str) -> dict[str, Any] | web.Response:
    """An edit's multipart form: text fields as strings, `image` / `image[]` as a list of bytes, `mask` as bytes."""
    try:
        form = await request.post()
    except (ValueError, web.HTTPException):
        return json_response(400, relay_error(400, "invalid multipart form", "invalid_request", request_id), request_id)
    body: dict[str, Any] = {"image": []}
    for name, value in form.items():
        if isinstance(value, web.FileField):
            data = value.file.read()
            if name in ("image", "image[]"):
                body["image"].append(data)
            else:
                body[name] = data
        else:
            body[name] = value
    return body


def image_prompt(body: dict[str, Any]) -> str | None:
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else None


def image_answer(body: dict[str, Any], prompt: str, base_url: str) -> dict[str, Any]:
    """`{"created", "data": [...], "usage"}`: n images, as b64_json or url."""
    images_in = body.get("image") or []
    mask = body.get("mask")
    colour = next((c for c in map(pictures.main_colour, images_in) if c), None)
    background = pictures.palette_rgb(colour) if colour else None
    width, height = _size(body.get("size"))
    seed = answers.digest(prompt)
    n = _count(body.get("n"))
    pngs = [pictures.png(width, height, seed + i, background) for i in range(n)]
    said = [pictures.describe(i) for i in images_in] + ([f"mask: {pictures.describe(mask)}"] if mask else [])
    revised = f"{prompt} ({'; '.join(said)})" if said else prompt
    if body.get("response_format") == "url":
        data = [{"url": f"{base_url}/_emulator/images/{seed + i}.png", "revised_prompt": revised} for i in range(n)]
    else:
        data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": revised} for png in pngs]
    prompt_tokens = answers.count_tokens(prompt) + 65 * len(images_in)
    usage = {"input_tokens": prompt_tokens, "output_tokens": IMAGE_TOKENS * n}
    return {"created": int(time.time()), "data": data, "usage": {**usage, "total_tokens": sum(usage.values())}}


def _size(size: Any) -> tuple[int, int]:
    """A "WxH" size scaled to at most 64 px a side (the answers stay small); square when absent or "auto"."""
    try:
        w, h = (int(n) for n in str(size).split("x"))
    except ValueError:
        return 64, 64
    return pictures.png_size(f"{w}:{h}")


def _count(n: Any) -> int:
    try:
        return max(1, min(int(n), 10))
    except (TypeError, ValueError):
        return 1

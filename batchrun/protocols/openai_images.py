"""OpenAI image generation and editing: POST /v1/images/generations and /v1/images/edits (docs/protocol.md §8).

A job without prompt.images generates: the body is JSON, `model`, `prompt` and params
as written. A job with prompt.images edits (each row needs an image): the body is a multipart form with the same
fields (params as text fields), each of the row's images as a file (`image`, or
`image[]` for several), and with `params.mask: last` the row's last image as `mask`.
The answer's `data` holds each image as `b64_json`, or as a `url` that batchrun
downloads (pipeline/rows.py) with the caps of image inputs. No streaming.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import Any

import orjson

from batchrun.base.stops import StopRule
from batchrun.job.render import ImageInput, Request
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import JobSpec
from batchrun.protocols.relay_errors import CallError, from_body
from batchrun.protocols.reply import Decoder, ImageOut, Reply, StreamAnswer, decode_base64, token_count
from batchrun.protocols.shared import bearer, no_problems

STREAMS = False
TOOLS = False
SCHEMA_DIALECT: str | None = None
IMAGES_IN = True  # edits
IMAGES_OUT = True
CONVERSATIONS = False  # one prompt
REPAIRS = False
OPENAI_BATCH = False
OWNED_PARAMS = frozenset({"model", "prompt", "image", "image[]", "stream"})
CUT_OFF_REASONS: frozenset[str] = frozenset()  # no text answer to cut
INLINE_IMAGE_URLS = True  # a form carries files: image URLs are downloaded
INPUT_IMAGE_TOKENS = 85 + 170  # GPT Image reads input images like GPT-4o: base + one 512-px tile; for estimates
MASK_LAST = "last"  # params.mask: the row's last image is the mask
headers = bearer
job_warnings = no_problems


def path(settings: RequestSettings) -> str:
    return "/v1/images/edits" if settings.images is not None else "/v1/images/generations"


def tool_declarations(params: dict[str, Any]) -> list[dict[str, Any]]:
    return []  # no tools on this API


def own_schema(params: dict[str, Any]) -> bool:
    return False


def job_problems(spec: JobSpec) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if spec.prompt.system is not None:
        found.append(("prompt.system", "openai-images takes one prompt; put its text in prompt.user"))
    if spec.output.parse != "text":
        found.append(("output.parse", "openai-images answers images, not text to parse; remove output.parse"))
    mask = spec.params.get("mask")
    if mask is not None and mask != MASK_LAST:
        found.append(("params.mask", f"{mask!r}: set mask: last to send the row's last image as the mask"))
    elif mask is not None and len(spec.prompt.images) < 2:
        found.append(("params.mask", "mask: last needs two prompt.images: the image to edit, then the mask"))
    return found


def build(request: Request, settings: RequestSettings) -> dict[str, Any]:
    params = {key: value for key, value in settings.params.items() if key != "mask"}
    body: dict[str, Any] = {"model": settings.model, "prompt": request.user}
    if settings.images is None:
        return {**body, **params}
    if not request.images:  # an empty cell adds no image: this row has none to edit
        raise CallError("input", "an edit needs an image, and this row's prompt.images are empty", retryable=False)
    images = [_data_url(image) for image in request.image_inputs]
    if settings.params.get("mask") == MASK_LAST and images:
        body["mask"] = images.pop()
    return {**body, "image": images, **params}


def _data_url(image: ImageInput) -> str:
    """An image as a data URL: the body stays JSON-shaped (validate shows it), `encode` makes the form."""
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"


def encode(body: dict[str, Any]) -> tuple[bytes, str | None]:
    """Generations as JSON; edits (a body with `image`) as multipart/form-data."""
    if "image" not in body:
        return orjson.dumps(body), None
    boundary = "batchrun-" + secrets.token_hex(16)
    parts: list[bytes] = []
    for name, value in body.items():
        if name == "image":
            field = "image" if len(value) == 1 else "image[]"
            parts += [_file_part(boundary, field, f"image{i}", url) for i, url in enumerate(value)]
        elif name == "mask":
            parts.append(_file_part(boundary, "mask", "mask", value))
        elif value is not None:
            text = value if isinstance(value, str) else orjson.dumps(value).decode()
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            parts.append(head.encode() + text.encode() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _file_part(boundary: str, field: str, stem: str, data_url: str) -> bytes:
    header, _, payload = data_url.partition(",")
    mime = header.removeprefix("data:").split(";")[0]
    name = f"{stem}.{mime.rpartition('/')[2] or 'png'}"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: {mime}\r\n\r\n"
    )
    return head.encode() + base64.b64decode(payload) + b"\r\n"


def decoder(settings: RequestSettings) -> Decoder:
    return Decoder(parse=parse, new_stream=_no_stream, stream=False)


def _no_stream() -> StreamAnswer:
    raise CallError("malformed", "malformed response: a stream answered an image request", abort=StopRule.C)


def parse(data: Any) -> Reply:
    """`{"created", "data": [{"b64_json" | "url", "revised_prompt"?}], "usage"?}` (§8.2)."""
    if (err := from_body(data)) is not None:
        raise err
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise CallError("malformed", "malformed response: data is not a list of images", abort=StopRule.C)
    images: list[ImageOut] = []
    urls: list[str] = []
    for item in items:
        if isinstance(item.get("b64_json"), str):
            images.append(_decoded(item["b64_json"]))
        elif isinstance(item.get("url"), str) and item["url"].startswith(("http://", "https://")):
            urls.append(item["url"])
    if not images and not urls:
        raise CallError("no_image", "no image returned", max_retries=1)
    # DALL·E 3 says how it rewrote the prompt: once per distinct rewrite, one a line.
    revised = dict.fromkeys(item["revised_prompt"] for item in items if isinstance(item.get("revised_prompt"), str))
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    notes: list[str] = []
    return Reply(
        text="\n".join(revised) or None,
        model=None,
        prompt_tokens=token_count(usage.get("input_tokens"), "input_tokens", notes),
        completion_tokens=token_count(usage.get("output_tokens"), "output_tokens", notes),
        images=images,
        image_urls=urls,
        notes=notes,
    )


def _decoded(text: str) -> ImageOut:
    try:
        data = decode_base64(text)
    except binascii.Error:
        raise CallError("malformed", "malformed response: an image's base64 is invalid", abort=StopRule.C) from None
    return ImageOut(_mime(data), data)


def _mime(data: bytes) -> str:
    """The type by the magic bytes: the answer names none (output_format png, jpeg or webp; png by default)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"

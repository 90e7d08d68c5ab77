"""The emulator answers Gemini clients as Google does: inline images in either base64 alphabet (the
google-genai SDK sends the URL-safe one), and the model listing in Gemini's shape on Gemini's paths."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Emulator, start_emulator, stop_emulator

from batchrun.emulator import pictures


def _call(url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _describe_inline(emulator: Emulator, data: str) -> str:
    body = {"contents": [{"role": "user", "parts": [{"inlineData": {"mimeType": "image/png", "data": data}}]}]}
    answer = _call(f"{emulator.url}/v1beta/models/gemini-2.5-flash:generateContent", body)
    return str(answer["candidates"][0]["content"]["parts"][0]["text"])


def test_inline_images_in_url_safe_base64_are_read(emulator: Emulator) -> None:
    png = pictures.png(40, 30, 3)
    jpeg = b"\xff\xd8\xff\xfe" + bytes(range(256)) * 3
    other = b"\xfb\xff\xbf" * 100
    for data, described in ((png, "A 40x30 PNG"), (jpeg, f"A JPEG of {len(jpeg)} bytes")):
        url_safe = base64.urlsafe_b64encode(data).decode()
        assert "-" in url_safe or "_" in url_safe or data is png
        assert _describe_inline(emulator, url_safe).startswith(described)
        assert _describe_inline(emulator, url_safe.rstrip("=")).startswith(described)
        assert _describe_inline(emulator, base64.b64encode(data).decode()).startswith(described)
    assert _describe_inline(emulator, base64.urlsafe_b64encode(other).decode()).startswith(
        f"An image of {len(other)} bytes"
    )


@pytest.fixture
def keyed_emulator() -> Iterator[Emulator]:
    emulator = start_emulator("--api-key-env", "TEST_RELAY_KEY")
    yield emulator
    stop_emulator(emulator)


def test_models_are_listed_in_geminis_shape_on_geminis_paths(keyed_emulator: Emulator) -> None:
    from conftest import TEST_KEY

    url = keyed_emulator.url
    google = {"x-goog-api-key": TEST_KEY}
    for listing in (
        _call(f"{url}/v1beta/models", headers=google),
        _call(f"{url}/v1beta/models?key={TEST_KEY}&pageSize=50"),
        _call(f"{url}/v1/models", headers=google),  # google-genai with api_version="v1"
    ):
        assert set(listing) == {"models"}
        assert listing["models"] and all(m["name"].startswith("models/gemini") for m in listing["models"])
    openai = _call(f"{url}/v1/models", headers={"Authorization": f"Bearer {TEST_KEY}"})
    assert openai["object"] == "list" and {"id": "gpt-5.4", "object": "model"} in openai["data"]

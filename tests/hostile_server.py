"""A hostile relay for tests: answers each row with the shape its prompt names (`[[shape: NAME]]`).

Run as a real server process on loopback (`python tests/hostile_server.py`); it prints
`listening on URL`. Rows without a shape get a normal chat answer. `GET /_stats` counts
requests, in total and per shape, so a test can prove a rerun sends nothing.
"""

from __future__ import annotations

import asyncio
import base64
import re
import sys
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

KEY = "sk-batchrun-test-key-5f0c2e9a71"  # tests/conftest.py TEST_KEY: some shapes echo it
# The key with some of its characters encoded as JSON `\u`, an HTML entity or %-escape, in any case: no run of
# 11 plain characters is left, so only masking after decoding finds it (issue 25).
ESCAPED_KEY = "".join(f"\\u{ord(c):04X}" if i % 9 == 4 else c for i, c in enumerate(KEY))
ENTITY_KEY = "".join(f"&#x{ord(c):x};" if i % 8 == 3 else c for i, c in enumerate(KEY))
PERCENT_KEY = "".join(f"%{ord(c):02x}" if i % 7 == 5 else c for i, c in enumerate(KEY.upper()))
TERMINAL_TRICKS = "\x1b]0;pwned\x07\x1b[2J\x1b[31mFAKE ok\x1b[0m\rback\x9b1m"  # title, clear, colour, CR, C1 CSI
_SHAPE = re.compile(r"\[\[shape: ([a-z0-9_]+)\]\]")
counts: Counter[str] = Counter()


def answer(content: Any = '"fine"', usage: Any = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "x",
        "model": "gpt-5.4",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2} if usage is None else usage,
    }
    body.update(extra)
    return body


WHOLE: dict[str, Any] = {
    "usage_float": answer(usage={"prompt_tokens": 1.5, "completion_tokens": 2}),
    "usage_string": answer(usage={"prompt_tokens": "10", "completion_tokens": [2]}),
    "usage_negative": answer(usage={"prompt_tokens": -(10**6), "completion_tokens": 2}),
    "usage_huge": answer(usage={"prompt_tokens": 2**63, "completion_tokens": True}),
    "usage_not_object": answer(usage="lots"),
    "choices_null": {"id": "x", "choices": None},
    "choices_object": {"id": "x", "choices": {"0": {"message": {"content": "hi"}}}},
    "content_list": answer(content=["not", "a", "string"]),
    "message_string": {"id": "x", "choices": [{"message": "hello", "finish_reason": "stop"}]},
    "finish_list": {"id": "x", "choices": [{"message": {"content": "hi"}, "finish_reason": ["stop"]}]},
    "model_object": answer(model={"name": "m"}),
    "no_fields": {},
    "deep_json": answer(content="[" * 5000 + "]" * 5000),
    "key_in_answer": answer(content=f"the key is {KEY.upper()} and {KEY[5:25]}", model=KEY),
    "encoded_key_in_answer": answer(content=f"{ESCAPED_KEY} {ENTITY_KEY} {PERCENT_KEY}", model=ESCAPED_KEY),
}
MODELS = [KEY, ESCAPED_KEY, ENTITY_KEY, PERCENT_KEY, f"gpt-{TERMINAL_TRICKS}", "gpt-5.4"]


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    prompt = body["messages"][-1]["content"]
    shape = m.group(1) if (m := _SHAPE.search(str(prompt))) else "normal"
    counts["total"] += 1
    counts[shape] += 1
    if shape in WHOLE:
        return web.Response(body=orjson.dumps(WHOLE[shape]), content_type="application/json")
    if shape == "bad_utf8":
        raw = b'{"model":"m","choices":[{"message":{"content":"caf\xc3 ok \xff"},"finish_reason":"stop"}]}'
        if body.get("stream"):
            return await _sse(request, [_chunk("caf\xc3 ok \xff".encode("latin-1"))])
        return web.Response(body=raw, content_type="application/json")
    if shape == "error_with_key":  # the key sits across the 200-character excerpt's cut
        return web.Response(status=500, text="x" * 190 + f" token {KEY} rejected", content_type="text/plain")
    if shape == "error_with_escaped_key":  # JSON escapes left as they are on the wire, as a relay sends them
        text = f'{{"error":{{"message":"token {ESCAPED_KEY} rejected {TERMINAL_TRICKS}"}}}}'
        return web.Response(status=404, text=text, content_type="application/json")
    if shape == "markdown_image":
        png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
        return web.Response(
            body=orjson.dumps(answer(f"![a](data:image/png;base64,{png})")), content_type="application/json"
        )
    if shape == "huge_json":  # larger than the test's run.max_answer_mb
        return web.Response(body=orjson.dumps(answer("y" * (3 << 20))), content_type="application/json")
    if shape == "chatty_stream":  # 2 MB on the wire, 30 KB of text: one character an event, between pings
        return await _sse(request, [_chunk(b"z") + b"\n\n: PING" for _ in range(30_000)])
    if shape in ("endless_data", "endless_pings", "endless_line"):
        return await _endless(request, shape)
    if body.get("stream"):
        return await _sse(request, [_chunk(b'\\"fine\\"')])
    return web.Response(body=orjson.dumps(answer()), content_type="application/json")


def _chunk(content: bytes) -> bytes:
    head = b'{"model":"m","choices":[{"index":0,"delta":{"content":"'
    return head + content + b'"},"finish_reason":null}]}'


async def _sse(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(b"data: " + event + b"\n\n")
    end = b'{"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}'
    await response.write(b"data: " + end + b"\n\ndata: [DONE]\n\n")
    return response


async def _endless(request: web.Request, shape: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    piece = {
        "endless_data": b"data: " + _chunk(b"z" * 4000) + b"\n\n",
        "endless_pings": b": PING\n\n",
        "endless_line": b"z" * 65536,  # after one "data: ", a line that never ends
    }[shape]
    if shape == "endless_line":
        await response.write(b"data: ")
    try:
        while True:
            await response.write(piece)
            if shape == "endless_pings":
                await asyncio.sleep(0.2)
    except (ConnectionError, asyncio.CancelledError):
        pass
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": name} for name in MODELS], "models": [{"name": KEY}]})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(dict(counts))


def main() -> None:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_stats", stats)

    async def serve() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()

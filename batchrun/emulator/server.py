"""The local relay: an aiohttp server that answers like https://ai.szkmjb.com.

Run it with `batchrun emulator`, or let `provider.base_url: emulator` start it
in a thread for one run. Tests read what it saw from `GET /_emulator/stats`;
`POST /_emulator/limits` changes its own limits mid-run (the bench halves one).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from batchrun.emulator import answers, images, pictures
from batchrun.emulator.cache import PromptCache
from batchrun.emulator.chat import ANSWER_FAULTS, chat_chunks, chat_completion, chat_prompt, schema_rejection
from batchrun.emulator.completions import completion, completion_chunks, completions_prompt
from batchrun.emulator.faults import (
    ENACTED,
    FAULTS,
    RequestWindow,
    directive_in,
    enact,
    fault_response,
    json_response,
    quota_used_up,
    rate_limited,
    refused_alike,
    rejected_content,
    relay_error,
    window_limited,
)
from batchrun.emulator.gemini import gemini_events, gemini_prompt, gemini_whole
from batchrun.emulator.streams import FRAMINGS, StreamSettings, write_stream


@dataclass
class EmulatorConfig:
    api_key: str | None = None  # None: any key (or none) is accepted
    latency_s: float = 0.0
    jitter_s: float = 0.0
    fault_rates: dict[str, float] = field(default_factory=dict)  # fault name -> probability per request
    seed: int = 0
    max_body_bytes: int = 64 * 1024 * 1024
    streams: StreamSettings = field(default_factory=StreamSettings)
    rpm_limit: int | None = None  # per key, failed requests counted, like the relay's own window
    rpm_window_s: float = 60.0  # tests shorten the window to see a whole cycle in seconds
    max_concurrency: int | None = None  # more in flight at once: 429 token_concurrency_limit_reached
    rpm_counts_refused: bool = True  # the --rpm-limit window counts refused requests (new-api's does)
    more_keys: tuple[str, ...] = ()  # accepted besides api_key, each with its own window
    key_quota: dict[str, int] = field(default_factory=dict)  # key -> requests it can pay for, then 403 quota
    refuse_all: tuple[int, str] | None = None  # every request answered with this status and message
    refuse_share: float = 0.0  # this share of prompts (the same ones every time) refused for their content
    cache_prefixes: int = 0  # a provider prompt cache of this many prefixes (emulator/cache.py); 0: none


class Stats:
    """What the emulator saw, for tests to check the client's promises from the server's side."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_status: Counter[int] = Counter()
        self.by_prompt: Counter[str] = Counter()
        self.by_route: Counter[str] = Counter()  # path, marked " (stream)" when a stream was asked for
        self.answered_at: dict[str, float] = {}  # prompt -> when its last 200 answer was sent (resume tests)
        self.turns: dict[str, list[list[str]]] = {}  # prompt -> [role, text] per message of its last request
        self.in_flight = 0
        self.peak_in_flight = 0
        self.per_second: defaultdict[int, int] = defaultdict(int)
        self.limited_per_second: defaultdict[int, int] = defaultdict(int)  # 429s, by second of arrival

    def started(self, second: int) -> None:
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.per_second[second] += 1

    def max_in_window(self, seconds: int) -> int:
        if not self.per_second:
            return 0
        ticks = sorted(self.per_second)
        best = 0
        for start in ticks:
            best = max(best, sum(self.per_second.get(t, 0) for t in range(start, start + seconds)))
        return best

    def timeline(self) -> list[list[int]]:
        """[second, requests, 429s] for each second that saw a request."""
        return [[t, n, self.limited_per_second.get(t, 0)] for t, n in sorted(self.per_second.items())]

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "by_prompt": dict(self.by_prompt),
            "by_route": dict(self.by_route),
            "answered_at": self.answered_at,
            "turns": self.turns,
            "peak_in_flight": self.peak_in_flight,
            "max_per_second": self.max_in_window(1),
            "max_per_minute": self.max_in_window(60),
        }


class Emulator:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self._random = random.Random(config.seed)
        self._seen: Counter[str] = Counter()  # requests per prompt key, for "x N" directives
        self._ids = 0
        self._window = (
            RequestWindow(config.rpm_limit, config.rpm_window_s, config.rpm_counts_refused)
            if config.rpm_limit
            else None
        )
        self._paid: Counter[str] = Counter()  # requests answered per key, against key_quota
        self.cache = PromptCache(config.cache_prefixes)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._count])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1beta/models/{target}", self.gemini)
        app.router.add_post("/v1/models/{target}", self.gemini)
        app.router.add_post("/v1/images/{action}", self.openai_images)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1beta/models", self.models)
        app.router.add_get("/_emulator/stats", self.get_stats)
        app.router.add_get("/_emulator/images/{name}", self.image)
        app.router.add_get("/_emulator/timeline", self.get_timeline)
        app.router.add_post("/_emulator/reset", self.reset_stats)
        app.router.add_post("/_emulator/limits", self.set_limits)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    def _request_id(self) -> str:
        self._ids += 1
        return f"emu{os.getpid()}{self._ids:012d}"

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_emulator/"):
            return await handler(request)
        arrived = int(time.time())
        self.stats.started(arrived)
        status = 0  # stays 0 if the client hangs up first
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            self.stats.in_flight -= 1
            self.stats.by_status[status] += 1
            if status == 429:
                self.stats.limited_per_second[arrived] += 1
            elif status == 200 and "prompt" in request:
                self.stats.answered_at[request["prompt"]] = time.time()

    async def _auth(self, request: web.Request, request_id: str) -> web.Response | None:
        if self.config.api_key is None:
            return None
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if _gemini_path(request):  # Google's own ways, on Gemini paths only
            given = given or request.headers.get("x-goog-api-key", "") or request.query.get("key", "")
        if given == self.config.api_key or given in self.config.more_keys:
            return None
        return json_response(401, relay_error(401, "无效的令牌", "", request_id), request_id)

    async def _body(self, request: web.Request, request_id: str) -> dict[str, Any] | web.Response:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return fault_response("413", request_id)  # type: ignore[return-value]
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json_response(400, relay_error(400, "invalid JSON body", "invalid_request", request_id), request_id)
        if not isinstance(body, dict):
            return json_response(
                400, relay_error(400, "body must be an object", "invalid_request", request_id), request_id
            )
        return body

    def _fault(self, prompt_key: str, prompt: str) -> str | None:
        """The fault for this request: a directive in the prompt, else the random rates."""
        seen = self._seen[prompt_key]
        self._seen[prompt_key] += 1
        d = directive_in(prompt)
        if d is not None and d.fault in FAULTS and (d.times is None or seen < d.times):
            return d.fault
        if self.config.fault_rates:
            draw = self._random.random()  # one draw: each fault gets exactly its own rate
            for fault, rate in self.config.fault_rates.items():
                if draw < rate:
                    return fault
                draw -= rate
        return None

    def _over_limits(self, request: web.Request, request_id: str) -> web.Response | None:
        """The relay's own limits, checked on arrival: a 429 without any hint."""
        config = self.config
        if config.refuse_all is not None:
            return refused_alike(request_id, *config.refuse_all)
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if key in config.key_quota and self._paid[key] >= config.key_quota[key]:
            return quota_used_up(request_id)
        if self._window is not None and not self._window.admit(key, time.time()):
            return window_limited(request_id, self._window.limit, self._window.window_s)
        if config.refuse_share and zlib.crc32(request["prompt"].encode()) % 10_000 < config.refuse_share * 10_000:
            return rejected_content(request_id)
        self._paid[key] += 1
        if self.config.max_concurrency is not None and self.stats.in_flight > self.config.max_concurrency:
            return rate_limited(request_id, "token_concurrency_limit_reached")
        return None

    async def _delay(self) -> None:
        delay = self.config.latency_s + (self._random.uniform(0, self.config.jitter_s) if self.config.jitter_s else 0)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _serve(
        self,
        request: web.Request,
        prompt_of: Callable[[dict[str, Any]], str | None],
        what: str,
        answer: Callable[[web.Request, dict[str, Any], str, str, str | None], Awaitable[web.StreamResponse]],
        read: Callable[[web.Request, str], Awaitable[dict[str, Any] | web.Response]] | None = None,
    ) -> web.StreamResponse:
        """The steps every route shares: auth, body (JSON unless `read` reads another kind), counting by prompt,
        latency, faults; then `answer`."""
        request_id = self._request_id()
        if (denied := await self._auth(request, request_id)) is not None:
            return denied
        body = await (read or self._body)(request, request_id)
        if isinstance(body, web.Response):
            return body
        prompt = prompt_of(body)
        if prompt is None:
            return json_response(400, relay_error(400, what, "invalid_request", request_id), request_id)
        self.stats.by_prompt[prompt] += 1
        self.stats.turns[prompt] = turns_of(body)
        self.stats.by_route[request.path + (" (stream)" if body.get("stream") is True else "")] += 1
        request["prompt"] = prompt
        request["cached_tokens"] = self.cache.cached_tokens(prompt)  # on arrival: a prefix still answered misses
        limited = self._over_limits(request, request_id)  # counted on arrival, answered after the latency
        await self._delay()
        if limited is not None:
            return limited
        fault = self._fault(prompt, prompt)
        authorization = request.headers.get("Authorization", "")
        if fault is not None and (answer_now := fault_response(fault, request_id, authorization)) is not None:
            return answer_now
        if fault in ENACTED:
            # A healthy answer to cut short; a stream cut mid-body is the `stream-cut` fault's job.
            healthy = await answer(request, {**body, "stream": False}, prompt, request_id, None)
            assert isinstance(healthy, web.Response)
            return await enact(fault, request, healthy)
        answered = await answer(request, body, prompt, request_id, fault)
        if answered.status == 200:
            self.cache.answered(prompt)
        return answered

    async def chat(self, request: web.Request) -> web.StreamResponse:
        async def answer(
            request: web.Request, body: dict[str, Any], prompt: str, rid: str, fault: str | None
        ) -> web.StreamResponse:
            if (rejection := schema_rejection(body)) is not None:
                return json_response(400, rejection, rid)
            whole = chat_completion(body, prompt, rid, fault if fault in ANSWER_FAULTS else None)
            whole["usage"]["prompt_tokens_details"]["cached_tokens"] = request["cached_tokens"]
            if not (body.get("stream") or fault in FRAMINGS):
                return json_response(200, whole, rid)
            events = chat_chunks(whole, _include_usage(body), self.config.streams.text_pieces)
            return await write_stream(request, events, rid, self.config.streams, fault, pings=True)

        return await self._serve(request, lambda b: chat_prompt(b.get("messages")), "messages must be a list", answer)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        async def answer(
            request: web.Request, body: dict[str, Any], prompt: str, rid: str, fault: str | None
        ) -> web.StreamResponse:
            whole = completion(body, prompt, rid)
            if not (body.get("stream") or fault in FRAMINGS):
                return json_response(200, whole, rid)
            events = completion_chunks(whole, _include_usage(body))
            return await write_stream(request, events, rid, self.config.streams, fault, pings=True)

        return await self._serve(request, completions_prompt, "prompt must be a string", answer)

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["target"].rpartition(":")
        if action not in ("generateContent", "streamGenerateContent") or not model:
            return await self.not_found(request)

        async def answer(
            request: web.Request, body: dict[str, Any], prompt: str, rid: str, fault: str | None
        ) -> web.StreamResponse:
            events = gemini_events(body, model, prompt, fault, rid, request["cached_tokens"])
            # streamGenerateContent without alt=sse: one JSON object, as old relay builds answer.
            sse = action == "streamGenerateContent" and request.query.get("alt") == "sse"
            if not (sse or fault in FRAMINGS):
                return json_response(200, gemini_whole(events), rid)
            return await write_stream(request, events, rid, self.config.streams, fault, pings=False)

        return await self._serve(request, gemini_prompt, "contents must be a list of contents", answer)

    async def openai_images(self, request: web.Request) -> web.StreamResponse:
        action = request.match_info["action"]
        if action not in ("generations", "edits"):
            return await self.not_found(request)
        base_url = f"{request.scheme}://{request.host}"

        async def answer(
            request: web.Request, body: dict[str, Any], prompt: str, rid: str, fault: str | None
        ) -> web.StreamResponse:
            return json_response(200, images.image_answer(body, prompt, base_url), rid)

        read = images.read_form if action == "edits" else None
        return await self._serve(request, images.image_prompt, "prompt must be a string", answer, read)

    async def image(self, request: web.Request) -> web.Response:
        """A small PNG drawn from its name, for image-URL trials (not counted in the stats)."""
        png = pictures.png(48, 48, answers.digest(request.match_info["name"]))
        return web.Response(body=png, content_type="image/png")

    async def models(self, request: web.Request) -> web.Response:
        ids = [
            "gpt-5.4",
            "gpt-4o-mini",
            "gpt-3.5-turbo-instruct",
            "gemini-2.5-flash",
            "gemini-2.5-flash-image",
            "gemini-3-pro-image-preview",
        ]
        listing: dict[str, Any]
        if _gemini_path(request):
            listing = {"models": [{"name": f"models/{i}", "displayName": i} for i in ids if i.startswith("gemini")]}
        else:
            listing = {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}
        return json_response(200, listing, self._request_id())

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.as_json()), content_type="application/json")

    async def get_timeline(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.timeline()), content_type="application/json")

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        self._seen.clear()
        self.cache = PromptCache(self.config.cache_prefixes)
        if self._window is not None:
            self._window.clear()
        return web.Response(body=b"{}", content_type="application/json")

    async def set_limits(self, request: web.Request) -> web.Response:
        """{"rpm_limit": N or null, "rpm_window_s": S, "max_concurrency": M or null}: any of them, from now on."""
        try:
            body = orjson.loads(await request.read())
            changes = _limit_changes(body)
        except (orjson.JSONDecodeError, ValueError) as e:
            return web.Response(status=400, text=f"bad limits: {e}")
        config = self.config
        for name, value in changes.items():
            setattr(config, name, value)
        if config.rpm_limit is None:
            self._window = None
        elif self._window is None:
            self._window = RequestWindow(config.rpm_limit, config.rpm_window_s, config.rpm_counts_refused)
        else:
            self._window.set_limit(config.rpm_limit, config.rpm_window_s)
        current = {name: getattr(config, name) for name in _LIMITS}
        return web.Response(body=orjson.dumps(current), content_type="application/json")

    async def not_found(self, request: web.Request) -> web.Response:
        request_id = self._request_id()
        return json_response(
            404,
            relay_error(
                404, f"Invalid URL ({request.method} {request.path})", "not_found", request_id, "invalid_request_error"
            ),
            request_id,
        )


_LIMITS = {"rpm_limit": int, "rpm_window_s": float, "max_concurrency": int}


def _limit_changes(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not set(body) <= set(_LIMITS):
        raise ValueError(f"an object with any of {', '.join(_LIMITS)}")
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if value is None and name != "rpm_window_s":
            changes[name] = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            changes[name] = _LIMITS[name](value)
        else:
            raise ValueError(f"{name} must be a positive number" + ("" if name == "rpm_window_s" else " or null"))
    return changes


def turns_of(body: dict[str, Any]) -> list[list[str]]:
    """[role, text] per message as the request carried them, in order: chat `messages`, Gemini
    `systemInstruction` (as "system") and `contents`, or a completions `prompt` (as "user").
    Each image part adds "[image]" to its message's text, so tests see where images went."""
    if isinstance(body.get("prompt"), str):
        return [["user", body["prompt"]]]
    if isinstance(body.get("messages"), list):
        return [[str(m.get("role")), _message_text(m.get("content"))] for m in body["messages"] if isinstance(m, dict)]
    system = body.get("systemInstruction") or body.get("system_instruction")
    contents = [{"role": "system", **system}] if isinstance(system, dict) else []
    contents += [c for c in body.get("contents") or [] if isinstance(c, dict)]
    return [[str(c.get("role")), _gemini_text(c.get("parts") or [])] for c in contents]


def _message_text(content: Any) -> str:
    if not isinstance(content, list):
        return str(content)
    return " ".join(p["text"] if isinstance(p.get("text"), str) else "[image]" for p in content if isinstance(p, dict))


def _gemini_text(parts: list[Any]) -> str:
    return " ".join(p["text"] if isinstance(p.get("text"), str) else "[image]" for p in parts if isinstance(p, dict))


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# --- running it ----------------------------------------------------------------------


async def serve(config: EmulatorConfig, host: str, port: int) -> tuple[web.AppRunner, int]:
    # handler_cancellation: a client that hangs up (a timeout) ends its handler, as with a real server.
    runner = web.AppRunner(Emulator(config).app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    sockets = site._server.sockets  # type: ignore[union-attr]
    return runner, sockets[0].getsockname()[1]


def serve_forever(config: EmulatorConfig, host: str, port: int) -> None:
    async def main() -> None:
        runner, bound = await serve(config, host, port)
        print(f"emulator listening on http://{host}:{bound}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        import uvloop  # optional: faster when installed

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


@contextmanager
def running_in_thread(config: EmulatorConfig, host: str = "127.0.0.1") -> Iterator[str]:
    """An emulator on a free loopback port for the length of the block."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        state["runner"], state["port"] = loop.run_until_complete(serve(config, host, 0))
        ready.set()
        loop.run_forever()
        loop.run_until_complete(state["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="batchrun-emulator", daemon=True)
    thread.start()
    ready.wait()
    try:
        yield f"http://{host}:{state['port']}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


def _gemini_path(request: web.Request) -> bool:
    """A request on Gemini's paths: /v1beta/..., /v1/models/..., or /v1/models (shared with OpenAI's listing)
    asked Google's way (an x-goog-api-key header or a key= query, as google-genai with api_version v1 does)."""
    if request.path.startswith(("/v1beta/", "/v1/models/")):
        return True
    google_auth = "x-goog-api-key" in request.headers or "key" in request.query
    return request.path.rstrip("/") == "/v1/models" and google_auth

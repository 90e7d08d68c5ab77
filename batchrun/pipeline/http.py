"""A lean HTTP/1.1 client for the relay: a pool of keep-alive connections, one POST and its answer at a time each.

Why not aiohttp's ClientSession: at zero latency a row's CPU is what limits a run, and a session's request
(its request and response objects, payload lookup, a task to write each body, timers, tracing hooks) cost
about 75 µs of CPU where this costs about 25 (docs/performance.md, "The HTTP client"). What it does: HTTP/1.1
over asyncio, TLS, HTTP(S)_PROXY (CONNECT for https), keep-alive, Content-Length, chunked and read-until-close
bodies (parsed by httptools: Node's llhttp), flow control, and three timers: connect, quiet, whole answer.
What it does not: follow redirects (a relay's answer is taken as it is), compression (it asks for none),
HTTP/2. Failures are this module's `HTTPFailure`s; pipeline/transport.py says them as a row's errors.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httptools

from batchrun.base.version import __version__

MAX_HEAD_BYTES = 1 << 20  # an answer's status line and headers together, at most
PAUSE_AT = 1 << 20  # answer bytes received but not yet read: reading from the socket pauses here ...
RESUME_AT = 256 << 10  # ... and resumes here
JSON = "application/json"
# A connection idle this long is not used again: a relay (or a NAT or firewall on the way) may have dropped it
# without a word, and a request sent on it would wait for the quiet timeout. aiohttp's default, kept.
KEEP_IDLE_S = 15.0


class HTTPFailure(Exception):
    """One exchange failed; the message says how, in words for the row's `error` column."""


class CannotConnect(HTTPFailure):
    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"{host}:{port}: {reason}")
        self.where, self.reason = f"{host}:{port}", reason


class ConnectTimeout(HTTPFailure):
    """No connection within the connect timeout."""


class Quiet(HTTPFailure):
    """Nothing received for the quiet timeout."""


class Deadline(HTTPFailure):
    """The whole answer did not come within its time."""


class Broken(HTTPFailure):
    """The connection closed early, or what came was not HTTP."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    tls: bool
    authorization: bytes  # a `proxy-authorization` header line, or b""

    @classmethod
    def parse(cls, url: str) -> Proxy:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        tls = parts.scheme == "https"
        auth = b""
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username) + ":" + urllib.parse.unquote(parts.password or "")
            auth = b"proxy-authorization: Basic " + base64.b64encode(user.encode()) + b"\r\n"
        return cls(parts.hostname or "", parts.port or (443 if tls else 80), tls, auth)


class Connections:
    """Keep-alive connections to one origin, at most `limit` open at once.

    `post` sends a request and returns the connection once the answer's headers came; the caller reads the
    body from it and then calls its `release` (a connection whose answer was read whole is kept for the next).
    """

    def __init__(
        self,
        base_url: str,
        limit: int,
        connect_timeout_s: float,
        proxy: str | None = None,
        keep_idle_s: float = KEEP_IDLE_S,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.proxy = Proxy.parse(proxy) if proxy else None
        self.connect_timeout_s = connect_timeout_s
        self.keep_idle_s = keep_idle_s
        self._limit = limit
        self._open = 0
        self._idle: list[_Connection] = []
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._closed = False
        netloc = self.host if parts.port is None else f"{self.host}:{parts.port}"
        if ":" in self.host:  # an IPv6 address
            netloc = f"[{self.host}]" + (f":{parts.port}" if parts.port else "")
        # Through a proxy, plain HTTP names the whole URL in the request line; https goes through a tunnel.
        # A base URL's own path (a relay under a prefix) leads every request's path.
        origin = f"http://{netloc}" if self.proxy and not self.tls else ""
        self._target = (origin + urllib.parse.quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=~-._")).encode()
        self._fixed = (
            f"host: {netloc}\r\nuser-agent: batchrun/{__version__}\r\naccept: */*\r\naccept-encoding: identity\r\n"
        ).encode() + (self.proxy.authorization if self.proxy and not self.tls else b"")

    def request_head(self, path: str, headers: bytes, content_type: str, length: int) -> bytes:
        """The request line and headers; `headers`: more header lines, each ending in CRLF (header_lines)."""
        return b"".join(
            (
                b"POST ",
                self._target,
                path.encode(),
                b" HTTP/1.1\r\n",
                self._fixed,
                headers,
                b"content-type: ",
                content_type.encode("latin-1"),
                b"\r\ncontent-length: ",
                str(length).encode(),
                b"\r\n\r\n",
            )
        )

    async def post(self, head: bytes, body: bytes, total_s: float, quiet_s: float) -> _Connection:
        """Send `head` and `body`; the connection once the answer's status and headers came.

        The answer must end within `total_s` of now, and nothing may be quiet for longer than `quiet_s`.
        A connection closed before it answered is not tried again here: the relay may have read the request
        (the retry loop counts what was sent).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total_s
        conn = await self._acquire(deadline)
        try:
            conn.send(head, body, deadline, quiet_s)
            await conn.headers_arrived()
        except BaseException:
            conn.release()
            raise
        return conn

    async def _acquire(self, deadline: float) -> _Connection:
        while True:
            if self._closed:
                raise Broken("the client was closed")
            if self._idle:
                conn = self._idle.pop()
                if conn.idle_since + self.keep_idle_s > asyncio.get_running_loop().time():
                    return conn
                conn.close()  # its place is free once it is gone
                continue
            if self._open < self._limit:
                self._open += 1
                try:
                    return await self._connect(deadline)
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            await self._wait_for_place(deadline)

    async def _wait_for_place(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        place = loop.create_future()
        self._waiting.append(place)
        try:
            await asyncio.wait_for(place, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise Deadline("no connection free in time") from None
        finally:
            if place in self._waiting:
                self._waiting.remove(place)

    def _wake_one(self) -> None:
        while self._waiting:
            place = self._waiting.popleft()
            if not place.done():
                place.set_result(None)
                return

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self, loop)
        host, port = (self.proxy.host, self.proxy.port) if self.proxy else (self.host, self.port)
        timeout = min(self.connect_timeout_s, max(0.0, deadline - loop.time()))
        try:
            await asyncio.wait_for(self._open_to(conn, loop), timeout)
        except BaseException as e:
            conn.discard()
            if isinstance(e, asyncio.TimeoutError):
                raise ConnectTimeout(f"no connection to {host}:{port} within {timeout:g} s") from None
            if isinstance(e, OSError) and not isinstance(e, CannotConnect):
                raise CannotConnect(host, port, _reason(e)) from None
            raise
        return conn

    async def _open_to(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        if self.proxy is None:
            await loop.create_connection(lambda: conn, self.host, self.port, ssl=self.tls)
            return
        proxy_tls = ssl.create_default_context() if self.proxy.tls else None
        if self.tls is None:
            await loop.create_connection(lambda: conn, self.proxy.host, self.proxy.port, ssl=proxy_tls)
            return
        target = f"{self.host}:{self.port}"
        tunnel = _Tunnel(loop, f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n".encode() + self.proxy.authorization)
        raw, _ = await loop.create_connection(lambda: tunnel, self.proxy.host, self.proxy.port, ssl=proxy_tls)
        try:
            answer = await tunnel.answer
        except ConnectionError:
            raise CannotConnect(self.proxy.host, self.proxy.port, "the proxy closed the tunnel unanswered") from None
        if answer.split(b" ", 2)[1:2] != [b"200"]:
            raw.abort()
            said = answer.split(b"\r\n", 1)[0].decode("latin-1")[:200]
            raise CannotConnect(self.proxy.host, self.proxy.port, f"the proxy refused the tunnel to {target}: {said}")
        raw.set_protocol(conn)
        tls = await loop.start_tls(raw, conn, self.tls, server_hostname=self.host)
        if tls is None:
            raise CannotConnect(self.host, self.port, "TLS could not be started through the proxy")
        conn.connection_made(tls)

    def put_back(self, conn: _Connection) -> None:
        """A connection whose answer was read whole: the next request may use it."""
        if self._closed:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)
        self._wake_one()

    def gone(self, conn: _Connection) -> None:
        """A connection closed: its place is free."""
        if conn in self._idle:
            self._idle.remove(conn)
        self._open -= 1
        self._wake_one()

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()
        for place in self._waiting:
            if not place.done():
                place.set_result(None)
        await asyncio.sleep(0)  # the closed connections' ends are run before the loop may stop


class _Tunnel(asyncio.Protocol):
    """A CONNECT request to a proxy; `answer` is its answer's status line and headers."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes) -> None:
        self.answer: asyncio.Future[bytes] = loop.create_future()
        self._request = request + b"\r\n"
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._head += data
        if b"\r\n\r\n" in self._head or len(self._head) > MAX_HEAD_BYTES:
            if not self.answer.done():
                self.answer.set_result(self._head)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError())


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: the answer to its current request, as httptools parses it."""

    def __init__(self, pool: Connections, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._open = True
        self._closing = False  # aborted: connection_lost is on its way
        self._counted = False  # the pool was told it is gone
        self._timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # when its last answer was read (Connections.put_back)
        self._waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.got_any = False
        self._head_bytes = 0
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._headers_done = False
        self._complete = False
        self._keep_alive = False  # as the answer said (read when it ends: the parser forgets it after)
        self._until_close = False
        self._failure: HTTPFailure | None = None
        self._feed: Callable[[bytes], None] | None = None  # takes the body as it comes (read_into)
        self._fed_error: Exception | None = None  # what it raised: the answer is not read further
        self._busy = False
        self._deadline = 0.0
        self._quiet_s = 0.0
        self._last_read = 0.0

    # --- the exchange, as the caller sees it ---------------------------------------------------

    def send(self, head: bytes, body: bytes, deadline: float, quiet_s: float) -> None:
        if not self._open or self._transport is None:
            raise Broken("the relay closed the connection")
        self._busy = True
        self._deadline, self._quiet_s = deadline, quiet_s
        self._last_read = now = self._loop.time()
        self._timer = self._loop.call_at(min(deadline, now + quiet_s), self._on_timer)
        self._transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self._transport.write(body)  # a large body is not copied once more

    async def headers_arrived(self) -> None:
        while not self._headers_done:
            if self._failure is not None:
                raise self._failure
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer's body as it comes; raises the exchange's failure, if it fails before the body ends."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= RESUME_AT and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                yield chunk
            elif self._complete:
                return
            elif self._failure is not None:
                raise self._failure
            else:
                await self._wait()

    async def read_into(self, feed: Callable[[bytes], None]) -> None:
        """Every piece of the body to `feed`, as it comes in (called from the socket's own callback: no pass
        through the event loop a piece); returns once the body ended. Raises what `feed` raised, or the
        exchange's failure."""
        while self._chunks:
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            feed(chunk)
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        self._feed = feed
        try:
            while not self._complete and self._fed_error is None:
                if self._failure is not None:
                    raise self._failure
                await self._wait()
        finally:
            self._feed = None
        if self._fed_error is not None:
            raise self._fed_error

    async def read_at_most(self, limit: int) -> bytes:
        """The body's first `limit` bytes (what is left unread is dropped with the connection)."""
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) >= limit:
                break
        return bytes(body[:limit])

    def release(self) -> None:
        """The caller is done: kept for the next request if its answer was read whole, else closed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reusable = self._complete and not self._chunks and self._open and not self._closing
        reusable = reusable and self._failure is None and self._fed_error is None
        if reusable and self._keep_alive:
            self._reset()
            self._pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        self._busy = False
        self._abort()

    def discard(self) -> None:
        """A connection that never reached the pool (its connect failed): closed, and not counted again."""
        self._counted = True
        self._abort()

    def _abort(self) -> None:
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.abort()  # connection_lost tells the pool

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, failure: HTTPFailure) -> None:
        if self._failure is None and not self._complete:
            self._failure = failure
        self._abort()
        self._wake()

    def _on_timer(self) -> None:
        now = self._loop.time()
        if now >= self._deadline:
            self._fail(Deadline("the whole answer did not come in time"))
        elif now - self._last_read >= self._quiet_s:
            self._fail(Quiet(f"nothing received for {self._quiet_s:g} s"))
        else:
            self._timer = self._loop.call_at(min(self._deadline, self._last_read + self._quiet_s), self._on_timer)

    # --- asyncio's side ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._complete:  # bytes nobody asked for: the connection cannot be trusted again
            self._fail(Broken("the relay sent bytes after its answer ended"))
            return
        self._last_read = self._loop.time()
        self.got_any = True
        if not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(Broken(f"the answer's headers exceed {MAX_HEAD_BYTES >> 20} MB"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Broken("the relay switched protocols"))
        except httptools.HttpParserError as e:
            self._fail(Broken(f"not an HTTP answer: {e}"))

    def eof_received(self) -> bool:
        return False  # close: HTTP/1.1 has no half-closed connections

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        if self._busy and not self._complete and self._failure is None:
            if self._headers_done and self._until_close:
                self._complete = True  # a body without a length ends with the connection
            else:
                said = "before its answer ended" if self.got_any else "without answering"
                self._failure = Broken(f"the relay closed the connection {said}")
        if not self._counted:
            self._counted = True
            self._pool.gone(self)
        self._wake()

    # --- httptools' callbacks -------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._headers_done:  # trailers after a chunked body are dropped: nothing bounds them there
            self.headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue and the like: the answer is still to come
            self.headers = {}
            return
        self.status = status
        self._headers_done = True
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self._until_close = not chunked and "content-length" not in self.headers
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._feed is not None:
            try:
                self._feed(body)
            except Exception as e:  # the answer is refused (too large, malformed): read no further
                self._feed, self._fed_error = None, e
                self._abort()
                self._wake()
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > PAUSE_AT and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._headers_done:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()
            self._wake()


def header_lines(headers: dict[str, str]) -> bytes:
    """Header lines for `request_head`; a name or value that would break the request is refused here."""
    lines = []
    for name, value in headers.items():
        if any(c in f"{name}{value}" for c in "\r\n\0") or not name or ":" in name:
            raise ValueError(f"header {name!r} cannot be sent: it holds a line break or a colon")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(lines)


def _reason(e: OSError) -> str:
    """`name not resolved` (DNS), or the system's reason (`connection refused`), or the TLS failure."""
    if isinstance(e, socket.gaierror):
        return "name not resolved"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message or e.reason}"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    return os.strerror(e.errno).lower() if e.errno else str(e).lower() or type(e).__name__

"""pipeline/http.py against real sockets: a loopback server that answers each request with scripted bytes.

Every answer shape a relay (or what stands in front of it) may send ends as a Reply or as one row's
CallError, and connections are kept only when their answer was read whole.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from batchrun.job.settings import RequestSettings
from batchrun.pipeline import http
from batchrun.pipeline.transport import Transport
from batchrun.protocols import CallError, Reply, openai_chat

ANSWER = orjson.dumps(
    {
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
)
DECODER = openai_chat.decoder(RequestSettings("m", "openai-chat", {}, False, None, None))
STREAM_DECODER = openai_chat.decoder(RequestSettings("m", "openai-chat", {}, True, None, None))


def whole(body: bytes = ANSWER, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
        % (
            len(body),
            extra,
        )
        + body
    )


def chunked(body: bytes, pieces: int = 3) -> bytes:
    step = max(1, len(body) // pieces)
    parts = [body[i : i + step] for i in range(0, len(body), step)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + framed


@dataclass
class Scripted:
    """A loopback server: each request is read whole, then `answer(n)` says what to send for the n-th one.

    An answer is bytes to send and keep the connection, or (bytes, "close") to send and close it,
    or (bytes, "hang") to send and then say nothing more."""

    answer: Callable[[int], bytes | tuple[bytes, str]]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    url: str = ""

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-length")),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answer(len(self.requests) - 1)
                data, then = answer if isinstance(answer, tuple) else (answer, "keep")
                writer.write(data)
                await writer.drain()
                if then == "close":
                    break
                if then == "hang":
                    await asyncio.sleep(30)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def ask(url: str, stream: bool = False, timeout_s: float = 5, **kwargs: object) -> Reply:
    transport = Transport(url, {"authorization": "Bearer k"}, timeout_s, 4, **kwargs)  # type: ignore[arg-type]
    try:
        return await transport.attempt("/v1/chat/completions", b"{}", STREAM_DECODER if stream else DECODER)
    finally:
        await transport.aclose()


async def error_of(url: str, timeout_s: float = 5) -> CallError:
    with pytest.raises(CallError) as caught:
        await ask(url, timeout_s=timeout_s)
    return caught.value


def test_answers_with_a_length_chunked_or_until_the_connection_closes_are_read_alike() -> None:
    async def scenario() -> None:
        for answer in (whole(), chunked(ANSWER), (b"HTTP/1.0 200 OK\r\n\r\n" + ANSWER, "close")):
            async with Scripted(lambda n, a=answer: a) as server:
                reply = await ask(server.url)
                assert reply.text == "fine" and reply.prompt_tokens == 3

    run(scenario)


def test_trailers_after_a_chunked_body_are_not_kept() -> None:
    trailers = b"".join(b"x-trailer-%d: %s\r\n" % (i, b"t" * 1000) for i in range(3000))  # 3 MB, after the body
    answer = chunked(ANSWER)[: -len(b"0\r\n\r\n")] + b"0\r\n" + trailers + b"\r\n"

    async def scenario() -> None:
        async with Scripted(lambda n: answer) as server:
            connections = http.Connections(server.url, 2, 5)
            conn = await connections.post(connections.request_head("/v1/x", b"", http.JSON, 2), b"{}", 5, 5)
            assert orjson.loads(await conn.read_at_most(1 << 20))["model"] == "m"
            assert not any(name.startswith("x-trailer") for name in conn.headers)
            conn.release()
            await connections.aclose()

    run(scenario)


def test_a_stream_in_chunks_is_read_event_by_event() -> None:
    events = b"".join(
        b"data: " + orjson.dumps({"model": "m", "choices": [{"index": 0, "delta": {"content": w}}]}) + b"\n\n"
        for w in ("a", "b", "c")
    )
    end = b'data: {"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'

    async def scenario() -> None:
        async with Scripted(lambda n: chunked(events + end, pieces=7)) as server:
            reply = await ask(server.url, stream=True)
            assert reply.text == "abc" and reply.finish_reason == "stop"

    run(scenario)


def test_connections_are_kept_and_reused_unless_the_answer_says_close() -> None:
    async def scenario() -> None:
        async with Scripted(lambda n: whole()) as server:
            transport = Transport(server.url, {"authorization": "Bearer k"}, 5, 2)
            for _ in range(10):
                await transport.attempt("/v1/chat/completions", b"{}", DECODER)
            await transport.aclose()
            assert len(server.requests) == 10 and server.connections == 1
        async with Scripted(lambda n: whole(extra=b"connection: close\r\n")) as server:
            transport = Transport(server.url, {"authorization": "Bearer k"}, 5, 2)
            for _ in range(3):
                await transport.attempt("/v1/chat/completions", b"{}", DECODER)
            await transport.aclose()
            assert server.connections == 3

    run(scenario)


def test_a_connection_idle_too_long_is_not_used_again() -> None:
    async def scenario() -> None:
        async with Scripted(lambda n: whole()) as server:
            connections = http.Connections(server.url, 2, 5, keep_idle_s=0.2)
            for pause in (0, 0.05, 0.3):
                await asyncio.sleep(pause)
                answer = await connections.post(connections.request_head("/v1/x", b"", http.JSON, 2), b"{}", 5, 5)
                await answer.read_at_most(1 << 20)
                answer.release()
            await connections.aclose()
            assert server.connections == 2  # the second request reused the first's, the third did not

    run(scenario)


def test_the_request_names_the_base_urls_path_the_key_header_and_the_body_length() -> None:
    async def scenario() -> None:
        async with Scripted(lambda n: whole()) as server:
            await ask(server.url + "/relay/prefix/")
            request = server.requests[0]
            assert request.startswith(b"POST /relay/prefix/v1/chat/completions HTTP/1.1\r\n")
            assert b"\r\nauthorization: Bearer k\r\n" in request and b"\r\ncontent-length: 2\r\n" in request
            assert request.endswith(b"\r\n\r\n{}")

    run(scenario)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ((b"", "close"), "closed the connection without answering"),
        ((whole()[:-5], "close"), "closed the connection before its answer ended"),
        ((b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "keep"), "not an HTTP answer"),
        ((b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"z" * (2 << 20) + b"\r\n\r\n", "keep"), "headers exceed 1 MB"),
    ],
)
def test_broken_answers_are_the_rows_connection_errors(answer: tuple[bytes, str], words: str) -> None:
    async def scenario() -> None:
        async with Scripted(lambda n: answer) as server:
            error = await error_of(server.url)
            assert error.error_class == "connection" and words in error.message, error.message
            assert error.retryable

    run(scenario)


def test_a_stream_that_goes_quiet_is_a_timeout_and_its_connection_is_not_kept() -> None:
    async def scenario() -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100\r\n\r\n:"
        async with Scripted(lambda n: (head, "hang") if n == 0 else whole()) as server:
            transport = Transport(server.url, {"authorization": "Bearer k"}, 0.3, 2)  # a stream's whole: 30 min
            with pytest.raises(CallError) as caught:
                await transport.attempt("/v1/chat/completions", b"{}", STREAM_DECODER)
            assert caught.value.error_class == "timeout"
            assert "nothing received for 0.3 s" in caught.value.message
            reply = await transport.attempt("/v1/chat/completions", b"{}", DECODER)
            await transport.aclose()
            assert reply.text == "fine" and server.connections == 2

    run(scenario)


def test_a_relay_that_is_not_listening_cannot_be_connected_to() -> None:
    async def scenario() -> None:
        async with Scripted(lambda n: whole()) as server:
            url = server.url
        error = await error_of(url)
        assert error.error_class == "connection"
        assert error.message == f"connection: cannot connect to {url.removeprefix('http://')}: connection refused"

    run(scenario)


def test_error_answers_are_read_up_to_a_bound_and_classified() -> None:
    body = orjson.dumps({"error": {"message": "slow down", "type": "rate_limit"}})
    answer = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def scenario() -> None:
        async with Scripted(lambda n: answer) as server:
            error = await error_of(server.url)
            assert error.status == 429 and "slow down" in error.message and error.retry_hint == 7

    run(scenario)


def test_plain_http_through_a_proxy_names_the_whole_url() -> None:
    async def scenario() -> None:
        async with Scripted(lambda n: whole()) as proxy:
            connections = http.Connections(
                "http://relay.invalid:8080/base", 2, 5, proxy="http://u:p%40ss@" + proxy.url[7:]
            )
            head = connections.request_head("/v1/x", b"", http.JSON, 2)
            answer = await connections.post(head, b"{}", 5, 5)
            body = await answer.read_at_most(1 << 20)
            answer.release()
            await connections.aclose()
            assert orjson.loads(body)["model"] == "m"
            request = proxy.requests[0]
            assert request.startswith(b"POST http://relay.invalid:8080/base/v1/x HTTP/1.1\r\n")
            assert b"\r\nhost: relay.invalid:8080\r\n" in request
            assert b"\r\nproxy-authorization: Basic dTpwQHNz\r\n" in request  # u:p@ss

    run(scenario)


# --- TLS, directly and through a CONNECT tunnel ---------------------------------------------------------


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the test's own authority)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "batchrun test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def _tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[bytes]) -> None:
    """A CONNECT proxy: says yes, then pipes bytes both ways."""
    head = await reader.readuntil(b"\r\n\r\n")
    seen.append(head)
    host, port = head.split(b" ")[1].decode().rsplit(":", 1)
    up_reader, up_writer = await asyncio.open_connection(host, int(port))
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
        dst.close()

    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)


def test_https_directly_and_through_a_connect_tunnel(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)

    async def relay_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n{}")
        writer.write(whole())
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        relay = await asyncio.start_server(relay_answers, "127.0.0.1", 0, ssl=server_tls)
        seen: list[bytes] = []
        proxy = await asyncio.start_server(lambda r, w: _tunnel(r, w, seen), "127.0.0.1", 0)
        url = f"https://127.0.0.1:{relay.sockets[0].getsockname()[1]}"
        proxy_url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
        for through in (None, proxy_url):
            connections = http.Connections(url, 2, 5, proxy=through)
            assert connections.tls is not None
            connections.tls.load_verify_locations(cert)  # the test's own authority
            answer = await connections.post(connections.request_head("/v1/x", b"", http.JSON, 2), b"{}", 5, 5)
            assert answer.status == 200 and orjson.loads(await answer.read_at_most(1 << 20))["model"] == "m"
            answer.release()
            await connections.aclose()
        assert seen and seen[0].startswith(f"CONNECT {url[8:]} HTTP/1.1\r\n".encode())
        untrusted = http.Connections(url, 2, 5)  # the system's authorities do not know this certificate
        with pytest.raises(http.CannotConnect, match="TLS: .*certificate"):
            await untrusted.post(untrusted.request_head("/v1/x", b"", http.JSON, 2), b"{}", 5, 5)
        relay.close()
        proxy.close()

    run(scenario)


def test_a_proxy_that_refuses_the_tunnel_says_so() -> None:
    async def scenario() -> None:
        async with Scripted(lambda n: (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", "close")) as proxy:
            connections = http.Connections("https://relay.invalid", 2, 5, proxy=proxy.url)
            with pytest.raises(http.CannotConnect, match="refused the tunnel to relay.invalid:443: HTTP/1.1 407"):
                await connections.post(connections.request_head("/v1/x", b"", http.JSON, 2), b"{}", 5, 5)

    run(scenario)

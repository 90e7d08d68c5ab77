"""The SSE parser (docs/protocol.md §2.6): any split of a stream into reads gives the same events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.protocols.sse import SSEParser

# Event data: any text, including newlines (multi-line data) and non-ASCII characters.
data_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), min_size=0, max_size=40
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A valid stream with comments, extra fields and mixed line ends, and the data of its events."""
    events = draw(st.lists(data_text, max_size=6))
    lines: list[str] = []
    for data in events:
        if draw(st.booleans()):
            lines.append(": PING")
        if draw(st.booleans()):
            lines += ["event: message", "id: 5"]
        for line in data.split("\n"):
            # Without the space, a value starting with a space would lose it; keep those with ": ".
            sep = ": " if line.startswith(" ") else draw(st.sampled_from([": ", ":"]))
            lines.append(f"data{sep}{line}")
        lines.append("")
    body, previous = "", ""
    for line in lines:
        ends = ["\n", "\r\n", "\r"]
        if previous == "\r" and not line:
            ends.remove("\n")  # CR then a bare LF would be one CRLF, not a blank line
        previous = draw(st.sampled_from(ends))
        body += line + previous
    if events and draw(st.booleans()):
        body = body[: -len(previous)]  # the last event without its blank line
    return body.encode(), events


def parse_in_pieces(body: bytes, cuts: list[int]) -> list[str]:
    parser = SSEParser()
    events: list[str] = []
    points = sorted({c % (len(body) + 1) for c in cuts})
    start = 0
    for point in [*points, len(body)]:
        events += parser.feed(body[start:point])
        start = point
    return events + parser.close()


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_gives_the_same_events(stream: tuple[bytes, list[str]], cuts: list[int]) -> None:
    body, expected = stream
    assert parse_in_pieces(body, []) == expected
    assert parse_in_pieces(body, cuts) == expected


@settings(max_examples=100, deadline=None)
@given(streams())
def test_byte_by_byte_gives_the_same_events(stream: tuple[bytes, list[str]]) -> None:
    body, expected = stream
    assert parse_in_pieces(body, list(range(len(body)))) == expected


def test_edge_cases_of_the_framing() -> None:
    parser = SSEParser()
    # A CR ending one read, its LF starting the next: one line end, not two (no empty event).
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n\r\n") == ["a\nb"]
    # A UTF-8 character split across reads.
    snowman = "data: ☃\n\n".encode()
    assert parser.feed(snowman[:8]) == []
    assert parser.feed(snowman[8:]) == ["☃"]
    # Comments and other fields are ignored; a field without a colon is a field with an empty value.
    assert parser.feed(b": PING\n\nevent: x\nid: 1\nretry: 10\ndata\ndata:y\n\n") == ["\ny"]
    # The last event needs no blank line, nor even a line end.
    assert parser.feed(b"data: [DONE]") == []
    assert parser.close() == ["[DONE]"]


def test_a_line_of_many_megabytes_in_small_reads_is_one_event() -> None:
    payload = "x" * (8 * 1024 * 1024)
    body = f"data: {payload}\n\n".encode()
    parser = SSEParser()
    events: list[str] = []
    for i in range(0, len(body), 65536):
        events += parser.feed(body[i : i + 65536])
    assert events == [payload]

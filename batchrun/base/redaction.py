"""Keeping the API key out of every message batchrun writes.

The key is registered once, where it is read from the environment; every path
that turns an exception or a server's text into a message (CallError, the CLI's
handlers, the answers stored in the checkpoint) passes it through `redact`, so
no caller has to remember.

Not only the whole key is masked: any run of FRAGMENT_CHARS or more characters
of it (a relay may echo a cut or partly masked key), in any letter case, and
the same for its base64 forms (a key inside a Basic header or an encoded blob).
Texts are also read as what they may encode (JSON and backslash escapes, HTML
entities, %-encoding, nested up to DECODE_PASSES deep), and a key found there is
masked where its encoded characters stand. Text is masked before it is cut for an
excerpt (`excerpt`), so a cut cannot split the key past recognition. Details:
docs/limits-and-caps.md.
"""

from __future__ import annotations

import base64
import functools
import html.entities
import re
from urllib.parse import quote

MASK = "***"
MIN_KEY_CHARS = 12  # shorter keys cannot be masked without masking ordinary text
FRAGMENT_CHARS = 11  # runs of the key this long or longer are masked
_BLOCK = (FRAGMENT_CHARS + 1) // 2  # every fragment contains one block-aligned piece this long: a cheap pre-check

_forms: set[str] = set()
_blocks: set[str] = set()  # lower-case pieces of the forms; a text holding none of them holds no fragment
_fragments: re.Pattern[str] | None = None

DECODE_PASSES = 3  # an escape inside an escape (`%5Cu0041`, `&amp;#65;`) is read this many layers deep
LONGEST_ESCAPE = 10  # characters one encoded character may take (`&#x00041;`): how far an excerpt reads ahead
_ESCAPE = re.compile(
    r"\\[uU]([0-9a-fA-F]{4})|\\[xX]([0-9a-fA-F]{2})|\\([\\/])"
    r"|&#[xX]0*([0-9a-fA-F]{1,6});?|&#0*([0-9]{1,7});?|&([A-Za-z][A-Za-z0-9]{1,31};)|%([0-9a-fA-F]{2})"
)


def register_secret(secret: str) -> None:
    """Mask `secret` from now on, with the forms a server or a library may echo."""
    global _fragments
    if not secret:
        return
    encoded = secret.encode()
    forms = {secret, quote(secret, safe="")}
    for skip in range(3):  # base64 of the key at each alignment within a longer text; the last group varies
        b64 = base64.b64encode(encoded[skip:]).decode().rstrip("=")[:-2]
        forms |= {b64, b64.replace("+", "-").replace("/", "_")}
    _forms.update(f for f in forms if len(f) >= FRAGMENT_CHARS)
    for form in _forms:
        low = form.lower()
        _blocks.update(low[i : i + _BLOCK] for i in range(0, len(low) - _BLOCK + 1, _BLOCK))
    pieces = {form[i : i + FRAGMENT_CHARS].lower() for form in _forms for i in range(len(form) - FRAGMENT_CHARS + 1)}
    _fragments = re.compile("|".join(map(re.escape, sorted(pieces))), re.IGNORECASE) if pieces else None


def redact(text: str) -> str:
    if _fragments is None:
        return text
    spans = _spans(text)
    # A text without these marks encodes nothing: the common case, decided in C (measured: docs/limits-and-caps.md).
    if _may_encode(text) and _ESCAPE.search(text) and _spans(_decoded_text(text)):
        decoded, starts = _decoded(text)  # where the key's characters stand: slower, so only once one is found
        spans += [(starts[start], starts[end]) for start, end in _spans(decoded)]
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for start, end in sorted(spans):
        if start >= pos:
            out += (text[pos:start], MASK)
            pos = end
        elif end > pos:
            pos = end
    out.append(text[pos:])
    return "".join(out)


def _may_encode(text: str) -> bool:
    return "\\" in text or "&" in text or "%" in text


def _decoded_text(text: str) -> str:
    for _ in range(DECODE_PASSES):
        text, found = _ESCAPE.subn(_escaped_character, text)
        if not found or not _may_encode(text):
            break
    return text


def _decoded(text: str) -> tuple[str, list[int]]:
    """`text` with its escapes read, and where each character of it starts in `text` (one more: the end)."""
    starts = list(range(len(text) + 1))
    for _ in range(DECODE_PASSES):
        pieces: list[str] = []
        layer: list[int] = []
        pos = 0
        for m in _ESCAPE.finditer(text):
            pieces.append(text[pos : m.start()])
            layer += starts[pos : m.start()]
            pieces.append(_character(m.group()))
            layer += [starts[m.start()]] * len(pieces[-1])
            pos = m.end()
        if not pieces:
            break  # nothing (more) encoded
        pieces.append(text[pos:])
        layer += starts[pos:]
        text, starts = "".join(pieces), layer
    return text, starts


def _escaped_character(m: re.Match[str]) -> str:
    return _character(m.group())


@functools.lru_cache(maxsize=4096)  # texts repeat the same few escapes
def _character(escape: str) -> str:
    """What one escape stands for; itself when it stands for nothing (an unknown entity, a code point past Unicode)."""
    m = _ESCAPE.fullmatch(escape)
    assert m is not None
    json_hex, backslash_hex, backslashed, entity_hex, entity_decimal, entity_name, percent = m.groups()
    if backslashed is not None:
        return backslashed
    if entity_name is not None:
        return html.entities.html5.get(entity_name, m.group())
    code = (
        int(json_hex or backslash_hex or entity_hex or percent or "0", 16)
        if entity_decimal is None
        else int(entity_decimal)
    )
    return chr(code) if code <= 0x10FFFF else m.group()


def _spans(text: str) -> list[tuple[int, int]]:
    """Each run of a key form in `text`, extended as far as it keeps matching the form."""
    assert _fragments is not None
    low = text.lower()
    if not any(block in low for block in _blocks):
        return []  # the common case, decided in C
    spans = []
    for m in _fragments.finditer(text):
        piece = m.group().lower()
        end = m.end()
        for form in _forms:
            form_low = form.lower()
            at = form_low.find(piece)
            while at != -1:
                n = FRAGMENT_CHARS
                while at + n < len(form_low) and m.start() + n < len(low) and low[m.start() + n] == form_low[at + n]:
                    n += 1
                end = max(end, m.start() + n)
                at = form_low.find(piece, at + 1)
        spans.append((m.start(), end))
    return spans


# What a terminal obeys rather than shows: escape sequences (CSI colours and screen clears, OSC titles, DCS and
# the like, in their 7-bit and C1 forms) go whole; other C0/C1 controls (\r, BEL, backspace) and bidi overrides,
# which reorder what is shown, become a space. Newline and tab stay.
_TERMINAL_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI: colours, cursor, clear
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, ...: to BEL or ST
    r"|\x1b.?"
)
_TERMINAL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def for_terminal(text: str) -> str:
    """`text` as batchrun prints it: the key masked, and nothing a terminal would act on (a relay's text may
    retitle, clear or recolour the screen, or overwrite a line with \r)."""
    return _TERMINAL_CONTROL.sub(" ", _TERMINAL_SEQUENCE.sub("", redact(text)))


def excerpt(raw: bytes | str, chars: int = 200) -> str:
    """The start of a server's text, masked first and then cut, on one line."""
    longest = max((len(f) for f in _forms), default=0)
    head = raw[: 2 * chars + 2 * LONGEST_ESCAPE * longest]
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    return " ".join(redact(text).split())[:chars]


def too_short(secret: str) -> bool:
    return 0 < len(secret) < MIN_KEY_CHARS

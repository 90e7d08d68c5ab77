"""Keeping the API key out of every message batchrun writes.

The key is registered once, where it is read from the environment; every path
that turns an exception or a server's text into a message (CallError, the CLI's
handlers, the answers stored in the checkpoint) passes it through `redact`, so
no caller has to remember.

Not only the whole key is masked: any run of FRAGMENT_CHARS or more characters
of it (a relay may echo a cut or partly masked key), in any letter case, and
the same for its base64 forms (a key inside a Basic header or an encoded blob).
Text is masked before it is cut for an excerpt (`excerpt`), so a cut cannot
split the key past recognition. Details: docs/limits-and-caps.md.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import quote

MASK = "***"
MIN_KEY_CHARS = 12  # shorter keys cannot be masked without masking ordinary text
FRAGMENT_CHARS = 11  # runs of the key this long or longer are masked
_BLOCK = (FRAGMENT_CHARS + 1) // 2  # every fragment contains one block-aligned piece this long: a cheap pre-check

_forms: set[str] = set()
_blocks: set[str] = set()  # lower-case pieces of the forms; a text holding none of them holds no fragment
_fragments: re.Pattern[str] | None = None


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
    low = text.lower()
    if not any(block in low for block in _blocks):
        return text  # the common case, decided in C
    out: list[str] = []
    pos = 0
    for start, end in _spans(text, low):
        if start >= pos:
            out += (text[pos:start], MASK)
            pos = end
        elif end > pos:
            pos = end
    out.append(text[pos:])
    return "".join(out)


def _spans(text: str, low: str) -> list[tuple[int, int]]:
    """Each run of a key form in `text`, extended as far as it keeps matching the form."""
    assert _fragments is not None
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


def excerpt(raw: bytes | str, chars: int = 200) -> str:
    """The start of a server's text, masked first and then cut, on one line."""
    longest = max((len(f) for f in _forms), default=0)
    head = raw[: 2 * chars + 2 * longest]
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    return " ".join(redact(text).split())[:chars]


def too_short(secret: str) -> bool:
    return 0 < len(secret) < MIN_KEY_CHARS

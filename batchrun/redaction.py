"""Keeping the API key out of every message batchrun writes.

The key is registered once, where it is read from the environment; every path
that turns an exception or a server's text into a message (CallError, the CLI's
last-resort handler) passes it through `redact`, so no caller has to remember.
"""

from __future__ import annotations

from urllib.parse import quote

MASK = "***"
_secrets: set[str] = set()


def register_secret(secret: str) -> None:
    """Mask `secret` from now on, with the forms a server or a library may echo."""
    if not secret:
        return
    # The relay strips a leading "sk-" and may echo what is left; a URL shows it percent-encoded.
    for form in (secret, secret.removeprefix("sk-"), quote(secret, safe="")):
        if form:
            _secrets.add(form)


def redact(text: str) -> str:
    # Longest first, so a form that contains another is masked whole.
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text

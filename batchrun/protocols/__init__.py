"""Wire protocols: one module per API, looked up by `provider.api` when a job needs it.

A protocol module provides:
  path(model, stream) -> str               the URL path (with query) to POST to
  build(request, settings) -> dict         the JSON body for one rendered request (images already loaded)
  repair_body(body, answer, message)       (chat only) the request continued with a follow-up message
  decoder(settings) -> Decoder             how to read a whole JSON answer (parse) and a stream (new_stream);
                                           both raise CallError for in-band failures
  INLINE_IMAGE_URLS                        True if image URLs must be downloaded and sent as bytes
  INPUT_IMAGE_TOKENS                       what a small input image counts as input tokens (validate's estimate)
  KEY_HEADER                               a header that carries the key besides `Authorization: Bearer`, or None

The registry imports a protocol module only when asked for it, so importing this
package (for CallError, Reply, ...) loads no protocol and nothing above it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol, cast

from batchrun.protocols.relay_errors import CallError
from batchrun.protocols.reply import Decoder, Reply, StreamAnswer

if TYPE_CHECKING:
    from batchrun.job.render import Request
    from batchrun.job.settings import RequestSettings


class WireProtocol(Protocol):
    """What every protocol module provides (see above); `repair_body` only where repair is supported."""

    INLINE_IMAGE_URLS: bool
    INPUT_IMAGE_TOKENS: int
    KEY_HEADER: str | None

    def path(self, model: str, stream: bool) -> str: ...
    def build(self, request: Request, settings: RequestSettings) -> dict[str, Any]: ...
    def decoder(self, settings: RequestSettings) -> Decoder: ...


class Repairing(WireProtocol, Protocol):
    """A protocol that can continue a request with a follow-up (app/checks.py allows repair only for these)."""

    def repair_body(self, body: dict[str, Any], answer: str, message: str) -> dict[str, Any]: ...


_MODULES = {
    "openai-chat": "batchrun.protocols.openai_chat",
    "openai-completions": "batchrun.protocols.openai_completions",
    "gemini": "batchrun.protocols.gemini",
}
APIS = tuple(_MODULES)


def protocol_for(api: str) -> WireProtocol:
    """The protocol module of `provider.api` (validated by job/spec.py, so always known)."""
    return cast(WireProtocol, importlib.import_module(_MODULES[api]))


if TYPE_CHECKING:  # mypy checks that each module has what WireProtocol says
    from batchrun.protocols import gemini, openai_chat, openai_completions

    _MODULES_FIT: tuple[WireProtocol, ...] = (gemini, openai_chat, openai_completions)
    _REPAIRING_FIT: Repairing = openai_chat


__all__ = ["APIS", "CallError", "Decoder", "Repairing", "Reply", "StreamAnswer", "WireProtocol", "protocol_for"]

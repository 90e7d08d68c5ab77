"""Wire protocols: one module per API, looked up by `provider.api` when a job needs it.

A protocol module provides:
  path(model, stream) -> str               the URL path (with query) to POST to
  build(request, settings) -> dict         the JSON body for one rendered request (images already loaded)
  repair_body(body, answer, message)       (chat only) the request continued with a follow-up message
  decoder(settings) -> Decoder             how to read a whole JSON answer (parse) and a stream (new_stream);
                                           both raise CallError for in-band failures
  INLINE_IMAGE_URLS                        True if image URLs must be downloaded and sent as bytes

The registry imports a protocol module only when asked for it, so importing this
package (for CallError, Reply, ...) loads no protocol and nothing above it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from batchrun.protocols.relay_errors import CallError
from batchrun.protocols.reply import Decoder, Reply, StreamAnswer

_MODULES = {
    "openai-chat": "batchrun.protocols.openai_chat",
    "openai-completions": "batchrun.protocols.openai_completions",
    "gemini": "batchrun.protocols.gemini",
}
APIS = tuple(_MODULES)


def protocol_for(api: str) -> ModuleType:
    """The protocol module of `provider.api` (validated by spec.py, so always known)."""
    return importlib.import_module(_MODULES[api])


__all__ = ["APIS", "CallError", "Decoder", "Reply", "StreamAnswer", "protocol_for"]

"""Wire protocols: one module per API.

A protocol module provides:
  path(model, stream) -> str          the URL path (with query) to POST to
  build(request, spec) -> dict        the JSON body for one rendered request (images already loaded)
  decoder(spec) -> Decoder            how to read a whole JSON answer (parse) and a stream (new_stream);
                                      both raise CallError for in-band failures
  INLINE_IMAGE_URLS                   True if image URLs must be downloaded and sent as bytes
  INPUT_IMAGE_TOKENS                  what a small input image counts as input tokens (validate's estimate)
  KEY_HEADER                          a header that carries the key besides `Authorization: Bearer`, or None
"""

from __future__ import annotations

from types import ModuleType

from batchrun.protocols import gemini, openai_chat, openai_completions
from batchrun.protocols.relay_errors import CallError
from batchrun.protocols.reply import Decoder, Reply, StreamAnswer

PROTOCOLS: dict[str, ModuleType] = {
    "openai-chat": openai_chat,
    "openai-completions": openai_completions,
    "gemini": gemini,
}

__all__ = ["PROTOCOLS", "CallError", "Decoder", "Reply", "StreamAnswer"]

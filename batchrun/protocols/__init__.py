"""Wire protocols: one module per API, each with build/parse functions.

A protocol module provides:
  path(model, stream) -> str          the URL path (with query) to POST to
  build(request, spec) -> dict        the JSON body for one rendered request
  parse(data) -> Reply                a 200 JSON body; raises CallError for in-band failures
"""

from __future__ import annotations

from types import ModuleType

from batchrun.protocols import openai_chat
from batchrun.protocols.relay_errors import CallError
from batchrun.protocols.reply import Reply

PROTOCOLS: dict[str, ModuleType] = {"openai-chat": openai_chat}

__all__ = ["PROTOCOLS", "CallError", "Reply"]

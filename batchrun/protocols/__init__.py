"""Wire protocols: one module per API, looked up by `provider.api` when a job needs it.

A protocol module owns everything batchrun knows of its API, as the `WireProtocol`
below says: how to send (path, body, headers), how to read answers, what it can do
(capabilities, in the spirit of simonw/llm's `supports_schema`), which params it sets
itself, and what a job must not ask of it. Code outside this package asks these,
never the API's name. A new API is one module and one line in `_MODULES`.

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
    from batchrun.job.spec import JobSpec


class WireProtocol(Protocol):
    """What every protocol module provides; `repair_body` only where REPAIRS is True."""

    # Capabilities: what a job may ask of this API (app/checks.py refuses the rest in one line).
    STREAMS: bool  # `stream: true` is sent as a stream
    TOOLS: bool  # params.tools (and output.parse: tool)
    SCHEMA_DIALECT: str | None  # how output.schema is asked for natively ("json_schema", "gemini"), None: not at all
    IMAGES_IN: bool  # prompt.images
    IMAGES_OUT: bool  # answers may carry images (saved under output.images_dir)
    CONVERSATIONS: bool  # prompt.messages
    REPAIRS: bool  # output.repair_attempts: a request can be continued with a follow-up (`repair_body`)
    OPENAI_BATCH: bool  # its answers are OpenAI Batch API answers (output.openai_batch, input Batch files)
    OWNED_PARAMS: frozenset[str]  # body keys batchrun sets itself: refused in params
    CUT_OFF_REASONS: frozenset[str]  # finish reasons that say the answer stopped at the output cap
    INLINE_IMAGE_URLS: bool  # image URLs are downloaded and sent as bytes
    INPUT_IMAGE_TOKENS: int  # what a small input image counts as input tokens (validate's estimate)

    def headers(self, api_key: str) -> dict[str, str]:
        """The headers of every request: the key in the API's auth scheme (none without a key)."""

    def path(self, settings: RequestSettings) -> str:
        """The URL path (with query) to POST to."""

    def build(self, request: Request, settings: RequestSettings) -> dict[str, Any]:
        """The body for one rendered request (images already loaded)."""

    def encode(self, body: dict[str, Any]) -> tuple[bytes, str | None]:
        """The body's bytes and their content type (None: JSON, the transport's default)."""

    def decoder(self, settings: RequestSettings) -> Decoder:
        """How to read a whole answer (parse) and a stream (new_stream); both raise CallError for in-band failures."""

    def tool_declarations(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The function declarations in params.tools, in this API's shape."""

    def own_schema(self, params: dict[str, Any]) -> bool:
        """Whether params already ask the API for structured output in its own terms (batchrun adds none then)."""

    def job_problems(self, spec: JobSpec) -> list[tuple[str, str]]:
        """(dotted key, problem) for what this API cannot send, beyond what the capabilities say."""

    def job_warnings(self, spec: JobSpec) -> list[tuple[str, str]]:
        """(dotted key, warning) for what is legal here but probably not what the user wants."""


class Repairing(WireProtocol, Protocol):
    """A protocol that can continue a request with a follow-up (app/checks.py allows repair only for these)."""

    def repair_body(self, body: dict[str, Any], answer: str, message: str) -> dict[str, Any]: ...


_MODULES = {
    "openai-chat": "batchrun.protocols.openai_chat",
    "openai-completions": "batchrun.protocols.openai_completions",
    "gemini": "batchrun.protocols.gemini",
    "openai-images": "batchrun.protocols.openai_images",
}
APIS = tuple(_MODULES)


def protocol_for(api: str) -> WireProtocol:
    """The protocol module of `provider.api` (app/checks.py refuses other names when the job is loaded)."""
    return cast(WireProtocol, importlib.import_module(_MODULES[api]))


def able(capability: str) -> list[str]:
    """The APIs that have a capability (a WireProtocol flag), for messages that say what to use instead."""
    return [api for api in APIS if getattr(protocol_for(api), capability)]


if TYPE_CHECKING:  # mypy checks that each module has what WireProtocol says
    from batchrun.protocols import gemini, openai_chat, openai_completions, openai_images

    _MODULES_FIT: tuple[WireProtocol, ...] = (gemini, openai_chat, openai_completions, openai_images)
    _REPAIRING_FIT: Repairing = openai_chat


__all__ = [
    "APIS",
    "CallError",
    "Decoder",
    "Repairing",
    "Reply",
    "StreamAnswer",
    "WireProtocol",
    "able",
    "protocol_for",
]

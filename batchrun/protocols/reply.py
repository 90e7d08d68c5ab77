"""A successful answer, in protocol-neutral terms."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Reply:
    text: str | None
    finish_reason: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: list[dict[str, str]] = field(default_factory=list)  # each {name, arguments}

"""What several wire protocols share: JSON bodies, OpenAI's Bearer scheme and its tool shape."""

from __future__ import annotations

from typing import Any

import orjson


def json_body(body: dict[str, Any]) -> tuple[bytes, str | None]:
    """`encode` for the APIs whose bodies are JSON (the transport's default content type)."""
    return orjson.dumps(body), None


def bearer(api_key: str) -> dict[str, str]:
    """`headers` for OpenAI's scheme: `Authorization: Bearer <key>`."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def openai_tools(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The functions of params.tools in OpenAI's shape: `{"type": "function", "function": {...}}`."""
    tools = params.get("tools")
    if not isinstance(tools, list):
        return []
    return [tool["function"] for tool in tools if isinstance(tool, dict) and isinstance(tool.get("function"), dict)]


def no_problems(spec: Any) -> list[tuple[str, str]]:
    """`job_problems` / `job_warnings` for a protocol with nothing to add."""
    return []

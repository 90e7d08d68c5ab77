"""Gemini's schema dialect (docs/protocol.md §4.1): a JSON Schema as the OpenAPI-style `responseSchema`."""

from __future__ import annotations

from typing import Any

import polars as pl

from batchrun.job.structured import literal_dtype, resolve_refs

# The keywords of Gemini's OpenAPI-style `Schema`; anything else is dropped.
GEMINI_KEYWORDS = {
    "type", "format", "title", "description", "nullable", "enum", "items", "minItems", "maxItems",
    "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern",
    "minimum", "maximum", "anyOf", "propertyOrdering", "default", "example",
}  # fmt: skip
_GEMINI_FORMATS = {"date-time", "enum", "int32", "int64", "float", "double"}


def gemini_response_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema as Gemini's `responseSchema`: upper-case types, typed enums, local refs inlined.

    Gemini's enums are strings only: an untyped string enum gets type STRING, and an
    enum of numbers keeps only its type. Unsupported keywords are dropped; the full
    schema is still checked on the client.
    """
    return _to_gemini(schema, schema, ())


def _to_gemini(schema: Any, root: dict[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    resolved = resolve_refs(schema, root, seen) if isinstance(schema, dict) else None
    if resolved is None:
        return {}
    schema, seen = resolved
    out: dict[str, Any] = {}
    kind = schema.get("type")
    if isinstance(kind, list):
        if "null" in kind:
            out["nullable"] = True
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    enum = schema.get("enum") if isinstance(schema.get("enum"), list) else None
    if enum is None and "const" in schema:
        enum = [schema["const"]]
    if enum is not None:
        if None in enum:
            out["nullable"] = True
        values = [v for v in enum if v is not None]
        if all(isinstance(v, str) for v in values):
            kind, out["enum"] = "string", values
        elif kind is None:
            literal = literal_dtype(values)
            kind = {pl.Int64(): "integer", pl.Float64(): "number", pl.Boolean(): "boolean"}.get(literal, "string")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    if isinstance(kind, str):
        out["type"] = kind.upper()
    for key, value in schema.items():
        if key not in GEMINI_KEYWORDS or key in ("type", "enum", "nullable"):
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: _to_gemini(sub, root, seen) for name, sub in value.items()}
        elif key == "items":
            out[key] = _to_gemini(value, root, seen)
        elif key == "anyOf" and isinstance(value, list):
            branches = [b for b in value if not (isinstance(b, dict) and b.get("type") == "null")]
            if len(branches) < len(value):
                out["nullable"] = True
            converted = [_to_gemini(b, root, seen) for b in branches]
            if len(converted) == 1:
                out.update({k: v for k, v in converted[0].items() if k not in out})
            else:
                out[key] = converted
        elif key == "format":
            if value in _GEMINI_FORMATS:
                out[key] = value
        else:
            out[key] = value
    if schema.get("nullable") is True:
        out["nullable"] = True
    return out

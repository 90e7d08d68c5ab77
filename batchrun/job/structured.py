"""Structured output: answers parsed as JSON, checked against a JSON Schema, spread into typed columns.

* `parse: json` reads the answer text as JSON. An answer wrapped in a ```json fence,
  or JSON with prose around it, is accepted and the output's `parse_note` says so.
* `parse: tool` reads the arguments of the first tool call (the job has one tool).
* The schema (`output.schema`, or the tool's `parameters`) is checked with `jsonschema`,
  and its properties become typed columns (`output_columns`).
* A row whose answer fails is an output error: `schema_invalid` (with the reason), or
  `length` when the answer was cut off at the output cap.

Parsing happens when the output is written, from the stored answers, so a changed
schema re-parses without a request. It also runs in the row path when
`output.repair_attempts` asks for a follow-up on a failed answer (pipeline/repair.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol, cast

import jsonschema
import polars as pl
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from batchrun.job.spec import JobSpec

SCHEMA_INVALID = "schema_invalid"
TRUNCATED = "length"
PARSE_NOTE = "parse_note"
WHOLE_VALUE = "parsed"  # the column for a value that is not an object with properties
JSON_TEXT = pl.String()  # values with no single column type are kept as JSON text
MAX_REASON_CHARS = 300
MAX_JSON_DEPTH = 100  # deeper answers are refused: the schema check and the columns recurse (Python's limit is 1000)
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n?(.*?)```", re.DOTALL)
_EXTRACT_TRIES = 20  # start positions tried when looking for JSON inside prose


# --- the job file --------------------------------------------------------------------


class WireFormats(Protocol):
    """What this module asks of the job's wire protocol: protocols/ fill it (job/ may not import them)."""

    SCHEMA_DIALECT: str | None  # None: the API has no native structured output
    CUT_OFF_REASONS: frozenset[str]  # finish reasons that say the answer stopped at the output cap

    def tool_declarations(self, params: dict[str, Any]) -> list[dict[str, Any]]: ...
    def own_schema(self, params: dict[str, Any]) -> bool: ...


def output_problems(spec: JobSpec, wire: WireFormats) -> list[tuple[str, str]]:
    """(dotted key, problem) for structured-output settings that cannot work together.

    What the API cannot do at all (tools, repair) app/checks.py says from the protocol's capabilities."""
    out = spec.output
    found: list[tuple[str, str]] = []
    if out.json_schema is not None and out.parse == "text":
        found.append(("output.schema", "a schema needs output.parse: json (or tool)"))
    schema = answer_schema(spec, wire) if out.parse != "text" else None
    if schema is not None:
        try:
            validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            key = "output.schema" if out.json_schema is not None else "params.tools"
            where = "/".join(map(str, e.path))
            found.append((key, f"not a valid JSON Schema{f' at {where}' if where else ''}: {e.message}"))
    if out.parse == "tool" and (n := len(wire.tool_declarations(spec.params))) != 1:
        found.append(("output.parse", f"parse: tool needs exactly one tool in params.tools (found {n})"))
    if out.repair_attempts:
        if out.parse == "text":
            found.append(("output.repair_attempts", "repair needs output.parse: json"))
        elif out.parse == "tool":
            found.append(("output.repair_attempts", "repair is not supported yet for parse: tool (use parse: json)"))
    return found


def answer_schema(spec: JobSpec, wire: WireFormats) -> dict[str, Any] | None:
    """The schema answers are checked against: output.schema, else (parse: tool) the tool's parameters."""
    if spec.output.json_schema is not None:
        return spec.output.json_schema
    if spec.output.parse == "tool":
        tools = wire.tool_declarations(spec.params)
        params = tools[0].get("parameters") if tools else None
        return params if isinstance(params, dict) else None
    return None


def uses_native_schema(spec: JobSpec, wire: WireFormats) -> bool:
    """Whether batchrun asks the API itself for the schema (docs/protocol.md §2.4, §4.1)."""
    return (
        spec.output.parse == "json"
        and spec.output.json_schema is not None
        and spec.output.native_schema
        and wire.SCHEMA_DIALECT is not None
        and not wire.own_schema(spec.params)
    )


# --- answers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What one answer parsed to, or why it did not."""

    value: Any = None
    note: str | None = None  # "fenced" | "extracted" | None (the answer was JSON alone)
    error_class: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_class is None


class AnswerParser:
    """Parses and checks answers for one job; `columns` are the typed output columns."""

    def __init__(self, mode: str, schema: dict[str, Any] | None, cut_off: Collection[str]) -> None:
        """`cut_off`: the finish reasons that mean the answer stopped at the output cap (the protocol's)."""
        self.mode = mode
        self._cut_off = cut_off
        self._validator = validator_for(schema)(schema) if schema is not None else None
        self.columns = output_columns(schema)
        self._whole_value = object_properties(schema) is None  # one `parsed` column

    @classmethod
    def for_spec(cls, spec: JobSpec, wire: WireFormats) -> AnswerParser | None:
        if spec.output.parse == "text":
            return None
        return cls(spec.output.parse, answer_schema(spec, wire), wire.CUT_OFF_REASONS)

    def judge(self, text: str | None, finish_reason: str | None, tool_calls: list[dict[str, Any]] | None) -> Verdict:
        try:
            return self._judge(text, finish_reason, tool_calls)
        except RecursionError:  # the parser itself, on text nested thousands deep
            return _invalid(f"the answer's JSON is nested deeper than {MAX_JSON_DEPTH} levels")

    def _judge(self, text: str | None, finish_reason: str | None, tool_calls: list[dict[str, Any]] | None) -> Verdict:
        if finish_reason in self._cut_off:
            return Verdict(
                error_class=TRUNCATED,
                error="the answer was cut off at the output cap, so its JSON is incomplete; raise the cap in params",
            )
        if self.mode == "tool":
            if not tool_calls:
                return _invalid("the model did not call the tool (it answered with text)")
            try:
                value, note = json.loads(tool_calls[0]["arguments"]), None
            except ValueError as e:
                return _invalid(f"the tool call's arguments are not JSON: {e}")
            if _deeper_than(value, MAX_JSON_DEPTH):
                return _invalid(f"the answer's JSON is nested deeper than {MAX_JSON_DEPTH} levels")
        else:
            if text is None or not text.strip():
                return _invalid("the answer has no text to parse as JSON")
            try:
                value, note = extract_json(text)
            except ValueError as e:
                return _invalid(f"the answer is not JSON: {e}")
            if _deeper_than(value, MAX_JSON_DEPTH):  # before the schema check, which recurses
                return _invalid(f"the answer's JSON is nested deeper than {MAX_JSON_DEPTH} levels")
        if self._validator is not None:
            error = best_match(self._validator.iter_errors(value))
            if error is not None:
                where = "/".join(map(str, error.absolute_path))
                return _invalid(f"the answer does not match the schema at {where or 'the top level'}: {error.message}")
        return Verdict(value=value, note=note)

    def judge_stored(self, text: str | None, finish_reason: str | None, tool_calls_json: str | None) -> Verdict:
        """`judge` for an answer as the checkpoint stores it (tool calls as JSON text)."""
        return self.judge(text, finish_reason, json.loads(tool_calls_json) if tool_calls_json else None)

    def row_values(self, verdict: Verdict) -> dict[str, Any]:
        """The typed column values of one answer (all null when it failed)."""
        if not verdict.ok:
            return dict.fromkeys(self.columns)
        value = verdict.value
        if self._whole_value:
            return {WHOLE_VALUE: conform(value, self.columns[WHOLE_VALUE])}
        obj = value if isinstance(value, dict) else {}
        return {name: conform(obj.get(name), dtype) for name, dtype in self.columns.items()}

    def apply(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Result columns + typed columns and `parse_note`; failed answers turn the row into an error."""
        values: dict[str, list[Any]] = {name: [] for name in self.columns}
        notes: list[str | None] = []
        status, error_class, error = (frame[c].to_list() for c in ("status", "error_class", "error"))
        rows = frame.select("status", "response_text", "finish_reason", "tool_calls").iter_rows()
        for i, (row_status, text, finish, calls) in enumerate(rows):
            verdict = self.judge(text, finish, calls) if row_status == "ok" else None
            row = self.row_values(verdict) if verdict is not None else dict.fromkeys(self.columns)
            for name, value in row.items():
                values[name].append(value)
            notes.append(verdict.note if verdict is not None else None)
            if verdict is not None and not verdict.ok:
                status[i], error_class[i], error[i] = "error", verdict.error_class, verdict.error
        typed = [pl.Series(name, values[name], dtype=dtype) for name, dtype in self.columns.items()]
        frame = frame.with_columns(
            *typed,
            pl.Series(PARSE_NOTE, notes, dtype=pl.String()),
            pl.Series("status", status, dtype=pl.String()),
            pl.Series("error_class", error_class, dtype=pl.String()),
            pl.Series("error", error, dtype=pl.String()),
        )
        order = list(frame.columns[: frame.columns.index("response_text") + 1])
        order += [*self.columns, PARSE_NOTE]
        order += [c for c in frame.columns if c not in order]
        return frame.select(order)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than `limit` (without recursion: the point is to avoid it)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _invalid(reason: str) -> Verdict:
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "…"
    return Verdict(error_class=SCHEMA_INVALID, error=reason)


def extract_json(text: str) -> tuple[Any, str | None]:
    """The JSON value in an answer, and a note when it had to be dug out; ValueError if none."""
    try:
        return json.loads(text), None
    except ValueError as e:
        first_error = e
    fence = _FENCE.search(text)
    if fence is not None:
        try:
            return json.loads(fence.group(1)), "fenced"
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch in "{["][:_EXTRACT_TRIES]
    for start in starts:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        return value, "extracted"
    raise first_error


# --- repair ----------------------------------------------------------------------------


def repair_request(problem: str) -> str:
    """The follow-up message that quotes why the last answer failed."""
    return f"Your answer could not be used: {problem}. Reply again with only the corrected JSON, with no other text."


# --- schema → column types ----------------------------------------------------------


def output_columns(schema: dict[str, Any] | None) -> dict[str, pl.DataType]:
    """Column name → polars type: one column per property of an object schema, else one `parsed` column."""
    if schema is None:
        return {WHOLE_VALUE: JSON_TEXT}
    found = object_properties(schema)
    if found is None:
        return {WHOLE_VALUE: dtype_for(schema, schema)}
    properties, seen = found
    return {name: dtype_for(sub, schema, seen) for name, sub in properties.items()}


def object_properties(schema: dict[str, Any] | None) -> tuple[dict[str, Any], tuple[str, ...]] | None:
    """The top-level properties of an object schema (and the refs followed to them); None if it has none."""
    resolved = resolve_refs(schema, schema, ()) if schema is not None else None
    if resolved is None:
        return None
    root, seen = resolved
    properties = root.get("properties")
    return (properties, seen) if isinstance(properties, dict) and properties else None


def dtype_for(schema: Any, root: dict[str, Any], seen: tuple[str, ...] = ()) -> pl.DataType:
    """The polars type of the values a (sub)schema allows; JSON text when no one type fits."""
    resolved = resolve_refs(schema, root, seen) if isinstance(schema, dict) else None
    if resolved is None:
        return JSON_TEXT
    schema, seen = resolved
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            branches = [b for b in schema[key] if not (isinstance(b, dict) and b.get("type") == "null")]
            kinds = {dtype_for(b, root, seen) for b in branches}
            return kinds.pop() if len(kinds) == 1 else JSON_TEXT
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema.get("const")]
        return literal_dtype(values)
    kind = schema.get("type")
    if isinstance(kind, list):
        named = [k for k in kind if k != "null"]
        if set(named) == {"integer", "number"}:
            kind = "number"
        elif len(named) == 1:
            kind = named[0]
        else:
            return JSON_TEXT
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    if kind == "array":
        return pl.List(dtype_for(schema.get("items"), root, seen))
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            return JSON_TEXT
        return pl.Struct({name: dtype_for(sub, root, seen) for name, sub in props.items()})
    return _SCALARS.get(kind, JSON_TEXT)


_SCALARS: dict[Any, pl.DataType] = {
    "string": pl.String(),
    "integer": pl.Int64(),
    "number": pl.Float64(),
    "boolean": pl.Boolean(),
}


def literal_dtype(values: list[Any]) -> pl.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, str) for v in present):
        return pl.String()
    if present and all(isinstance(v, bool) for v in present):
        return pl.Boolean()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pl.Int64()
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pl.Float64()
    return JSON_TEXT


def resolve_refs(
    schema: dict[str, Any], root: dict[str, Any], seen: tuple[str, ...]
) -> tuple[dict[str, Any], tuple[str, ...]] | None:
    """Follow local `$ref`s (`#/$defs/...`); None for remote or recursive ones."""
    while isinstance(schema.get("$ref"), str):
        ref = schema["$ref"]
        if not ref.startswith("#") or ref in seen:
            return None
        seen = (*seen, ref)
        target: Any = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            return None
        schema = target
    return schema, seen


INT64_RANGE = (-(2**63), 2**63 - 1)


def conform(value: Any, dtype: pl.DataType) -> Any:
    """A parsed JSON value shaped for a column of `dtype` (JSON text where the column is text)."""
    if value is None:
        return None
    if isinstance(dtype, pl.String):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if isinstance(dtype, pl.Boolean):
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if isinstance(dtype, pl.Int64):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return value if isinstance(value, int) and INT64_RANGE[0] <= value <= INT64_RANGE[1] else None
    if isinstance(dtype, pl.Float64):
        return float(value) if isinstance(value, (int, float)) else None
    if isinstance(dtype, pl.List):
        inner = cast(pl.DataType, dtype.inner)  # an instance since polars 1.0; typed as either
        return [conform(v, inner) for v in value] if isinstance(value, list) else None
    if isinstance(dtype, pl.Struct):
        if not isinstance(value, dict):
            return None
        return {f.name: conform(value.get(f.name), cast(pl.DataType, f.dtype)) for f in dtype.fields}
    return None

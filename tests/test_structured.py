"""Parsing, schema checks, column types and the Gemini schema conversion, as pure functions."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

from batchrun.flow import spend
from batchrun.job.spec import PricingSpec
from batchrun.job.structured import (
    SCHEMA_INVALID,
    AnswerParser,
    Verdict,
    dtype_for,
    extract_json,
    output_columns,
)
from batchrun.protocols import gemini, openai_chat
from batchrun.protocols.gemini_schema import gemini_response_schema

EVERY_TYPE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "count": {"type": "integer"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "flag": {"type": "boolean"},
        "label": {"enum": ["positive", "negative", "neutral"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "author": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "handle": {"type": ["string", "null"]}},
            "required": ["id"],
        },
        "maybe": {"type": ["integer", "null"]},
    },
    "required": ["name", "count", "label"],
}

CUT_OFF = openai_chat.CUT_OFF_REASONS | gemini.CUT_OFF_REASONS


def test_every_json_type_has_a_column_type() -> None:
    assert output_columns(EVERY_TYPE) == {
        "name": pl.String(),
        "count": pl.Int64(),
        "score": pl.Float64(),
        "flag": pl.Boolean(),
        "label": pl.String(),
        "tags": pl.List(pl.String()),
        "author": pl.Struct({"id": pl.Int64(), "handle": pl.String()}),
        "maybe": pl.Int64(),
    }


@pytest.mark.parametrize(
    ("schema", "dtype"),
    [
        ({"enum": [1, 2, 3]}, pl.Int64()),
        ({"enum": [1, 2.5]}, pl.Float64()),
        ({"enum": ["a", 1]}, pl.String()),  # mixed: kept as JSON text
        ({"type": ["integer", "number"]}, pl.Float64()),
        ({"type": ["string", "integer"]}, pl.String()),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, pl.Int64()),
        ({"type": "object"}, pl.String()),  # no properties: JSON text
        ({"type": "array", "items": {"type": "array", "items": {"type": "number"}}}, pl.List(pl.List(pl.Float64()))),
        ({"$ref": "#/$defs/n", "$defs": {"n": {"type": "integer"}}}, pl.Int64()),
        ({"const": True}, pl.Boolean()),
        ({}, pl.String()),
    ],
)
def test_dtype_for(schema: dict[str, Any], dtype: pl.DataType) -> None:
    assert dtype_for(schema, schema) == dtype


def test_recursive_refs_become_json_text() -> None:
    tree = {
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/node"}},
        "$defs": {
            "node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
        },
    }
    assert output_columns(tree) == {"root": pl.Struct({"kids": pl.List(pl.String())})}


def test_non_object_schema_and_no_schema_use_one_parsed_column() -> None:
    assert output_columns({"type": "array", "items": {"type": "integer"}}) == {"parsed": pl.List(pl.Int64())}
    assert output_columns(None) == {"parsed": pl.String()}


@pytest.mark.parametrize(
    ("text", "value", "note"),
    [
        ('{"a": 1}', {"a": 1}, None),
        ("  [1, 2]\n", [1, 2], None),
        ('```json\n{"a": 1}\n```', {"a": 1}, "fenced"),
        ('Sure:\n```\n{"a": 1}\n```\nAnything else?', {"a": 1}, "fenced"),
        ('The result is {"a": {"b": [1]}} as asked.', {"a": {"b": [1]}}, "extracted"),
        ('Note {not json} but {"a": 2}', {"a": 2}, "extracted"),
    ],
)
def test_extract_json(text: str, value: Any, note: str | None) -> None:
    assert extract_json(text) == (value, note)


def test_extract_json_fails_on_no_json() -> None:
    with pytest.raises(ValueError):
        extract_json("positive")
    with pytest.raises(ValueError):
        extract_json('{"label": "pos')


def test_judge_checks_the_schema_and_says_where() -> None:
    parser = AnswerParser("json", EVERY_TYPE, CUT_OFF)
    good = {"name": "a", "count": 3, "label": "neutral", "author": {"id": 1, "handle": None}}
    import json

    assert parser.judge(json.dumps(good), "stop", None) == Verdict(value=good)
    bad = parser.judge(json.dumps({**good, "count": "three"}), "stop", None)
    assert bad.error_class == SCHEMA_INVALID
    assert "at count" in (bad.error or "") and "'three' is not of type 'integer'" in (bad.error or "")
    missing = parser.judge('{"name": "a"}', "stop", None)
    assert "at the top level" in (missing.error or "") and "required" in (missing.error or "")
    assert parser.judge("not json", "stop", None).error_class == SCHEMA_INVALID
    assert parser.judge(None, "stop", None).error_class == SCHEMA_INVALID


def test_cut_off_answers_are_length_errors() -> None:
    parser = AnswerParser("json", None, CUT_OFF)
    assert parser.judge('{"a": 1}', "length", None).error_class == "length"
    assert parser.judge('{"a": 1}', "MAX_TOKENS", None).error_class == "length"


def test_tool_mode_reads_the_first_calls_arguments() -> None:
    parser = AnswerParser(
        "tool", {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}, CUT_OFF
    )
    calls = [{"name": "set_label", "arguments": '{"label": "x"}'}, {"name": "other", "arguments": "{}"}]
    assert parser.judge(None, "tool_calls", calls).value == {"label": "x"}
    assert "did not call" in (parser.judge("text", "stop", []).error or "")
    assert "not JSON" in (parser.judge(None, "tool_calls", [{"name": "s", "arguments": "{"}]).error or "")
    assert "required" in (parser.judge(None, "tool_calls", [{"name": "s", "arguments": "{}"}]).error or "")


def test_apply_turns_failed_answers_into_error_rows_with_typed_columns() -> None:
    parser = AnswerParser("json", EVERY_TYPE, CUT_OFF)
    frame = pl.DataFrame(
        {
            "response_text": [
                '{"name": "a", "count": 2.0, "score": 0.5, "flag": true, "label": "positive", "tags": ["x"],'
                ' "author": {"id": 7}, "maybe": null}',
                'Here: {"name": "b", "count": 1, "label": "neutral"}',
                '{"name": "c"}',
                None,
            ],
            "tool_calls": [None, None, None, None],
            "finish_reason": ["stop", "stop", "stop", None],
            "status": ["ok", "ok", "ok", "error"],
            "error_class": [None, None, None, "server"],
            "error": [None, None, None, "HTTP 500"],
        },
        schema_overrides={"tool_calls": pl.List(pl.Struct({"name": pl.String, "arguments": pl.String}))},
    )
    out = parser.apply(frame)
    assert out.columns[:10] == ["response_text", *output_columns(EVERY_TYPE), "parse_note"]
    assert out["count"].to_list() == [2, 1, None, None]
    assert out["author"][0] == {"id": 7, "handle": None}
    assert out["tags"].to_list() == [["x"], None, None, None]
    assert out["parse_note"].to_list() == [None, "extracted", None, None]
    assert out["status"].to_list() == ["ok", "ok", "error", "error"]
    assert out["error_class"].to_list() == [None, None, SCHEMA_INVALID, "server"]


def test_gemini_schema_upper_cases_types_and_drops_what_gemini_lacks() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "label": {"enum": ["positive", "negative"]},
            "stars": {"enum": [1, 2, 3]},
            "note": {"type": ["string", "null"], "maxLength": 40},
            "when": {"type": "string", "format": "date-time"},
            "email": {"type": "string", "format": "email"},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "uniqueItems": True},
            "either": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
        "required": ["label"],
        "$defs": {"tag": {"type": "string", "const": "x"}},
    }
    assert gemini_response_schema(schema) == {
        "type": "OBJECT",
        "properties": {
            "label": {"type": "STRING", "enum": ["positive", "negative"]},
            "stars": {"type": "INTEGER"},
            "note": {"type": "STRING", "nullable": True, "maxLength": 40},
            "when": {"type": "STRING", "format": "date-time"},
            "email": {"type": "STRING"},
            "tags": {"type": "ARRAY", "items": {"type": "STRING", "enum": ["x"]}},
            "either": {"type": "INTEGER", "nullable": True},
        },
        "required": ["label"],
    }


def test_gemini_schema_keeps_any_of_branches_and_survives_recursion() -> None:
    schema = {
        "anyOf": [{"type": "string"}, {"type": "number"}],
        "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
    }
    assert gemini_response_schema(schema) == {"anyOf": [{"type": "STRING"}, {"type": "NUMBER"}]}
    recursive = {"$ref": "#/$defs/n", "$defs": schema["$defs"]}
    assert gemini_response_schema(recursive) == {"type": "OBJECT", "properties": {"next": {}}}


def test_typical_value_has_the_shape_and_size_of_an_answer() -> None:
    value = spend.typical_value(EVERY_TYPE, EVERY_TYPE)
    assert set(value) == set(EVERY_TYPE["properties"])
    assert len(value["label"]) == 8  # the average length of the options
    assert len(value["tags"]) == 2 and set(value["author"]) == {"id", "handle"}
    assert isinstance(value["count"], int) and isinstance(value["flag"], bool)


def test_cost_expression_counts_images_and_shared_rows_cost_nothing() -> None:
    pricing = PricingSpec(input_per_million=1_000_000, output_per_million=2_000_000, per_image=0.5)
    frame = pl.DataFrame(
        {
            "prompt_tokens": [1, 1, None],
            "completion_tokens": [1, 1, None],
            "image_paths": [["a.png", "b.png"], None, ["c.png"]],
            "shared_from": [None, "R1", None],
        }
    )
    assert frame.select(spend.cost_expr(pricing, frame.columns))["cost"].to_list() == [4.0, 0.0, None]
    assert spend.cost(pricing, 1, 1, images=2) == 4.0

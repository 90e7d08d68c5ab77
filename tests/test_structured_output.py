"""parse: json / tool against the emulator: typed columns, error rows, repair, native schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import polars as pl
import pytest
from conftest import EXPECTED_LABELS, Emulator, assert_finished, run_here, write_csv, write_job
from test_structured import EVERY_TYPE

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["label"],
}


def _json_job(folder: Path, url: str, schema: dict[str, Any] = LABEL_SCHEMA, cap: int = 20, **output: Any) -> Path:
    spec = {"path": "out/result.parquet", "parse": "json", "schema": schema, **output}
    return write_job(folder, url, output=spec, params={"max_completion_tokens": cap})


def _run(job: Path, *args: str) -> pl.DataFrame:
    result = run_here("run", str(job), "--quiet", *args)
    assert_finished(result, job.parent / "out" / "result.parquet")
    return pl.read_parquet(job.parent / "out" / "result.parquet")


def test_schema_properties_become_typed_columns(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    df = _run(_json_job(tmp_path, emulator.url, EVERY_TYPE, cap=200))
    assert set(df["status"]) == {"ok"}
    schema = df.schema
    assert schema["name"] == pl.String and schema["count"] == pl.Int64 and schema["score"] == pl.Float64
    assert schema["flag"] == pl.Boolean and schema["label"] == pl.String and schema["tags"] == pl.List(pl.String)
    assert schema["author"] == pl.Struct({"id": pl.Int64, "handle": pl.String}) and schema["maybe"] == pl.Int64
    assert df.columns.index("name") == df.columns.index("response_text") + 1
    for row in df.iter_rows(named=True):
        answer = json.loads(row["response_text"])
        jsonschema.validate(answer, EVERY_TYPE)
        assert row["count"] == answer["count"] and row["tags"] == answer["tags"]
        assert row["author"]["id"] == answer["author"]["id"]
    assert df["parse_note"].null_count() == df.height


def test_native_schema_is_sent_unless_switched_off(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    # The emulator answers JSON only when the request carries response_format json_schema.
    df = _run(_json_job(tmp_path, emulator.url))
    assert dict(zip(df["review_id"], df["label"])) == EXPECTED_LABELS
    validate = run_here("validate", str(tmp_path / "job.yaml"), "--show", "1")
    assert '"type": "json_schema"' in validate.stdout and '"name": "output"' in validate.stdout

    off = _run(_json_job(tmp_path, emulator.url, native_schema=False), "--restart")
    assert set(off["status"]) == {"error"} and set(off["error_class"]) == {"schema_invalid"}
    assert off["response_text"].to_list() == list(EXPECTED_LABELS.values())  # plain words, not JSON
    assert "the answer is not JSON" in off["error"][0]


def test_params_response_format_replaces_the_derived_one(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    loose = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"label": {"type": "string"}}}},
    }
    job = write_job(
        tmp_path,
        emulator.url,
        params={"max_completion_tokens": 20, "response_format": loose},
        output={"path": "out/result.parquet", "parse": "json", "schema": LABEL_SCHEMA},
    )
    df = _run(job)
    # The server followed the loose schema ("value-…"); batchrun still checks the job's own.
    assert set(df["error_class"]) == {"schema_invalid"}
    assert "is not one of ['positive', 'negative', 'neutral']" in df["error"][0]


def test_bad_fenced_and_prose_answers(tmp_path: Path, emulator: Emulator) -> None:
    rows = [
        ["B1", "I love it. [[emulator: bad_json]]"],
        ["B2", "I love it too. [[emulator: fenced_json]]"],
        ["B3", "It broke. [[emulator: prose_json]]"],
        ["B4", "It is a box."],
    ]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = _json_job(tmp_path, emulator.url)
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 5, result.stderr  # one row failed the schema
    assert "1 answers did not parse or match output.schema" in result.stdout
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["status"].to_list() == ["error", "ok", "ok", "ok"]
    assert df["error_class"].to_list() == ["schema_invalid", None, None, None]
    assert df["error"][0].startswith("the answer is not JSON")
    assert df["label"].to_list() == [None, "positive", "negative", "neutral"]
    assert df["parse_note"].to_list() == [None, "fenced", "extracted", None]
    assert df["attempts"].to_list() == [1, 1, 1, 1]  # a bad answer is not a transport retry
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert (summary["ok"], summary["error"], summary["schema_invalid"]) == (3, 1, 1)
    status = run_here("status", str(job))
    assert "4 of 4 rows done: 3 ok, 1 failed; 0 pending" in status.stdout and "1 of the failed rows" in status.stdout


def test_repair_succeeds_on_the_second_ask(tmp_path: Path, emulator: Emulator) -> None:
    rows = [["P1", "Great kettle, love it. [[emulator: bad_json x 1]]"], ["P2", "Terrible kettle."]]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    df = _run(_json_job(tmp_path, emulator.url, repair_attempts=2))
    assert df["status"].to_list() == ["ok", "ok"]
    assert df["label"].to_list() == ["positive", "negative"]
    assert df["repairs"].to_list() == [1, 0]
    assert df["attempts"].to_list() == [2, 1]
    # Both asks are paid: the repaired row's tokens hold the first answer and the follow-up too.
    assert df["prompt_tokens"][0] > 2 * df["prompt_tokens"][1]
    by_prompt = emulator.stats()["by_prompt"]
    assert sorted(by_prompt.values()) == [1, 2]


def test_repair_gives_up_after_its_attempts(tmp_path: Path, emulator: Emulator) -> None:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], [["P1", "Never valid. [[emulator: bad_json]]"]])
    df = _run(_json_job(tmp_path, emulator.url, repair_attempts=2))
    assert df["status"].to_list() == ["error"] and df["error_class"].to_list() == ["schema_invalid"]
    assert df["repairs"].to_list() == [2] and df["attempts"].to_list() == [3]
    assert emulator.stats()["requests"] == 3


def test_cut_off_json_is_a_length_error(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(
        tmp_path,
        emulator.url,
        params={"max_completion_tokens": 2},
        output={"path": "out/result.parquet", "parse": "json", "schema": LABEL_SCHEMA, "repair_attempts": 1},
    )
    df = _run(job)
    assert set(df["error_class"]) == {"length"} and set(df["finish_reason"]) == {"length"}
    assert "raise the cap" in df["error"][0]
    assert emulator.stats()["requests"] == 6  # no repair: a shorter cap would not help


def test_a_model_that_rejects_the_native_schema_points_to_the_switch(
    tmp_path: Path, reviews: Path, emulator: Emulator
) -> None:
    job = write_job(
        tmp_path,
        emulator.url,
        model="gpt-3.5-turbo",
        output={"path": "out/result.parquet", "parse": "json", "schema": LABEL_SCHEMA},
    )
    # A 400 naming a parameter stops the run after three alike (docs/protocol.md §5.2 rule C).
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 3
    assert "'json_schema' is not supported with this model" in result.stderr
    assert "set output.native_schema: false" in result.stderr
    assert set(emulator.stats()["by_status"]) == {"400"}


def test_a_changed_schema_reparses_stored_answers_without_requests(
    tmp_path: Path, reviews: Path, emulator: Emulator
) -> None:
    # The request's format is set in params, so output.schema only checks the answers: changing it sends nothing.
    sent = {"type": "json_schema", "json_schema": {"name": "output", "schema": LABEL_SCHEMA}}
    params = {"max_completion_tokens": 20, "response_format": sent}

    def job(output: dict[str, Any]) -> Path:
        return write_job(tmp_path, emulator.url, params=params, output={"path": "out/result.parquet", **output})

    _run(job({"parse": "json", "schema": LABEL_SCHEMA}))
    emulator.reset()
    narrower = {**LABEL_SCHEMA, "properties": {"label": {"enum": ["positive", "negative"]}}}
    df = _run(job({"parse": "json", "schema": narrower}))
    assert emulator.stats()["requests"] == 0
    neutral = df.filter(pl.col("response_text").str.contains("neutral"))
    assert neutral.height == 2 and set(neutral["error_class"]) == {"schema_invalid"}
    text = _run(job({}))  # back to parse: text: the same answers, as text
    assert emulator.stats()["requests"] == 0
    assert "label" not in text.columns and set(text["status"]) == {"ok"}


def test_a_changed_native_schema_changes_the_requests(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    _run(_json_job(tmp_path, emulator.url))
    emulator.reset()
    narrower = {**LABEL_SCHEMA, "properties": {"label": {"enum": ["positive", "negative"]}}}
    refused = run_here("run", str(_json_job(tmp_path, emulator.url, narrower)), "--quiet")
    assert refused.returncode == 2
    assert "output.schema: " in refused.stderr and "6 of 6 finished rows" in refused.stderr
    assert emulator.stats()["requests"] == 0


def test_retry_failed_asks_again_for_answers_that_failed_the_schema(tmp_path: Path, emulator: Emulator) -> None:
    rows = [["R1", "Great. [[emulator: bad_json x 1]]"], ["R2", "Awful."]]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = _json_job(tmp_path, emulator.url)
    assert _run(job)["status"].to_list() == ["error", "ok"]
    assert _run(job)["status"].to_list() == ["error", "ok"]  # a plain rerun keeps the answer
    assert _run(job, "--retry-failed")["status"].to_list() == ["ok", "ok"]
    assert emulator.stats()["requests"] == 3


TOOL = {
    "type": "function",
    "function": {
        "name": "set_label",
        "description": "Record the review's label",
        "parameters": {
            "type": "object",
            "properties": {
                "label": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["label", "confidence"],
        },
    },
}


def test_parse_tool_reads_the_calls_arguments(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(
        tmp_path,
        emulator.url,
        params={
            "max_completion_tokens": 50,
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "set_label"}},
        },
        output={"path": "out/result.parquet", "parse": "tool"},
    )
    df = _run(job)
    assert set(df["status"]) == {"ok"} and set(df["finish_reason"]) == {"tool_calls"}
    assert df.schema["label"] == pl.String and df.schema["confidence"] == pl.Float64
    assert dict(zip(df["review_id"], df["label"])) == EXPECTED_LABELS
    assert df["response_text"].null_count() == df.height
    assert df["tool_calls"][0][0]["name"] == "set_label"
    assert ((df["confidence"] >= 0) & (df["confidence"] <= 1)).all()


def test_parse_tool_without_a_call_is_an_error(tmp_path: Path, reviews: Path, emulator: Emulator) -> None:
    job = write_job(
        tmp_path,
        emulator.url,
        params={"max_completion_tokens": 50, "tools": [TOOL], "tool_choice": "none"},
        output={"path": "out/result.parquet", "parse": "tool"},
    )
    df = _run(job)
    assert set(df["error_class"]) == {"schema_invalid"} and "did not call the tool" in df["error"][0]


@pytest.mark.parametrize(
    ("output", "params", "expected"),
    [
        ({"schema": LABEL_SCHEMA}, {}, "output.schema: a schema needs output.parse: json"),
        ({"parse": "json", "schema": {"type": "objekt"}}, {}, "output.schema: not a valid JSON Schema at type"),
        ({"parse": "json", "repair_attempts": 1, "schema": LABEL_SCHEMA}, {}, None),
        ({"repair_attempts": 1}, {}, "output.repair_attempts: repair needs output.parse: json"),
        ({"parse": "tool"}, {}, "output.parse: parse: tool needs exactly one tool in params.tools (found 0)"),
        ({"parse": "tool"}, {"tools": [TOOL, TOOL]}, "exactly one tool in params.tools (found 2)"),
        ({"parse": "tool", "repair_attempts": 1}, {"tools": [TOOL]}, "repair is not supported yet for parse: tool"),
        (
            {"parse": "json", "schema": {"type": "object", "properties": {"status": {"type": "string"}}}},
            {},
            "output.schema: the property 'status' would become a column",
        ),
        (
            {"parse": "json", "schema": {"type": "object", "properties": {"stars": {"type": "integer"}}}},
            {},
            "the property 'stars' would become a column",
        ),
    ],
)
def test_structured_settings_are_checked_before_anything_is_sent(
    tmp_path: Path,
    reviews: Path,
    emulator: Emulator,
    output: dict[str, Any],
    params: dict[str, Any],
    expected: str | None,
) -> None:
    job = write_job(tmp_path, emulator.url, params=params, output={"path": "out/result.parquet", **output})
    result = run_here("validate", str(job))
    if expected is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "job.yaml" in result.stderr
    assert run_here("run", str(job)).returncode == 2
    assert emulator.stats()["requests"] == 0

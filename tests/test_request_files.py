"""Bring your own requests: OpenAI Batch files in and out, whole conversations from a column.

Real CLI processes against the emulator; what was sent is checked at the emulator, what
came out against the Batch API's output format (docs/openai-batch.md) and the Parquet.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from conftest import REPO, Emulator, assert_key_nowhere, cli_env, run_cli, run_here, start_emulator, stop_emulator

SYSTEM = "You label product reviews. Answer positive, negative or neutral."


def chat_line(custom_id: str, review: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Review: {review}"}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-5.4", "messages": messages, "max_completion_tokens": 20, **body},
    }


def completions_line(custom_id: str, review: str) -> dict[str, Any]:
    prompt = f"{SYSTEM}\n\nReview: {review}\nLabel:"
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": prompt, "max_tokens": 5}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def batch_job(folder: Path, base_url: str, **extra: Any) -> Path:
    job: dict[str, Any] = {
        "name": "batch-file",
        "input": {"path": "requests.jsonl"},
        "provider": {"base_url": base_url, "api_key_env": "TEST_RELAY_KEY"},
        "output": {"path": "out/result.parquet", "openai_batch": "out/result.output.jsonl"},
        "run": {"concurrency": 4, "max_attempts": 2, "timeout_s": 30},
        **extra,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


MIXED = [
    chat_line("a-1", "I love this kettle, it works perfectly."),
    completions_line("a-2", "The lid broke after a week, terrible."),
    chat_line("a-3", "Excellent grinder, great value.", stream=True),
    completions_line("a-4", "Leaks everywhere, waste of money."),
    chat_line("a-5", "I love this kettle, it works perfectly."),  # the same body as a-1: asked once
    chat_line("a-6", "[[emulator: prompt_blocked]] It arrived on Tuesday."),
]


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_batch_output_format(line: dict[str, Any]) -> None:
    """The Batch API's output line: exactly these fields, of these types."""
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert isinstance(line["id"], str) and line["id"].startswith("batch_req_")
    assert isinstance(line["custom_id"], str)
    assert (line["response"] is None) != (line["error"] is None)
    if line["response"] is not None:
        response = line["response"]
        assert set(response) == {"status_code", "request_id", "body"}
        assert type(response["status_code"]) is int and isinstance(response["request_id"], str)
        assert isinstance(response["body"], dict)
    else:
        assert set(line["error"]) == {"code", "message"}
        assert all(isinstance(v, str) and v for v in line["error"].values())


def answer_text(body: dict[str, Any]) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if body["object"] == "chat.completion" else choice["text"]


def test_mixed_batch_file_runs_as_is_and_writes_the_batch_output(tmp_path: Path, emulator: Emulator) -> None:
    write_lines(tmp_path / "requests.jsonl", MIXED)
    job = batch_job(tmp_path, emulator.url, model="gpt-override", params={"temperature": 0})

    checked = run_here("validate", str(job))
    assert checked.returncode == 0, checked.stderr
    assert "an OpenAI Batch file (recognised from its lines)" in checked.stdout
    assert emulator.stats()["requests"] == 0

    result = run_here("run", str(job), "--quiet")
    assert "output:" in result.stdout, result.stderr  # finished (a-6 as an error row)
    stats = emulator.stats()
    assert stats["by_route"] == {
        "/v1/chat/completions": 2,
        "/v1/chat/completions (stream)": 1,
        "/v1/completions": 2,
    }
    # the body as written, with the job's model and params laid over it
    assert stats["turns"][f"{SYSTEM}\nReview: Excellent grinder, great value."] == [
        ["system", SYSTEM],
        ["user", "Review: Excellent grinder, great value."],
    ]

    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["custom_id"].to_list() == [line["custom_id"] for line in MIXED]
    assert df["url"].to_list() == [line["url"] for line in MIXED]
    assert df["status"].to_list() == ["ok"] * 5 + ["error"]
    assert df["response_text"].to_list()[:5] == ["positive", "negative", "positive", "negative", "positive"]
    assert set(df["model"].drop_nulls()) == {"gpt-override"}
    assert df["shared_from"].to_list()[4] == "a-1"
    assert df["error_class"][5] == "blocked"

    lines = read_output(tmp_path / "out" / "result.output.jsonl")
    assert [line["custom_id"] for line in lines] == df["custom_id"].to_list()  # input order
    for line, row in zip(lines, df.iter_rows(named=True)):
        assert_batch_output_format(line)
        if row["status"] == "ok":
            body = line["response"]["body"]
            assert line["response"]["status_code"] == 200
            assert answer_text(body) == row["response_text"]
            assert body["model"] == row["model"]
            assert body["usage"]["prompt_tokens"] == (row["prompt_tokens"] or body["usage"]["prompt_tokens"])
            expected = "text_completion" if row["url"] == "/v1/completions" else "chat.completion"
            assert body["object"] == expected
        else:
            assert line["error"]["code"] == row["error_class"]
            assert line["error"]["message"] == row["error"]
    streamed = lines[2]["response"]["body"]  # reassembled from the stream
    assert streamed["choices"][0]["finish_reason"] == "stop" and streamed["usage"]["completion_tokens"] > 0
    assert len({line["id"] for line in lines}) == len(lines)

    again = run_here("run", str(job), "--quiet")  # its own file: replaced, and nothing asked again
    assert "output:" in again.stdout, again.stderr
    assert emulator.stats()["requests"] == stats["requests"]
    assert read_output(tmp_path / "out" / "result.output.jsonl") == lines


def test_a_line_with_another_url_is_one_error_naming_the_line(tmp_path: Path, emulator: Emulator) -> None:
    embeddings = {"custom_id": "e-1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    write_lines(tmp_path / "requests.jsonl", [MIXED[0], MIXED[1], embeddings, MIXED[3]])
    job = batch_job(tmp_path, emulator.url)
    for command in ("validate", "run"):
        result = run_here(command, str(job))
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "requests.jsonl: line 3: url '/v1/embeddings' is not supported" in line
        assert "custom_id e-1" in line and "Traceback" not in line
    assert emulator.stats()["requests"] == 0


def test_repeated_custom_ids_are_refused_before_anything_is_sent(tmp_path: Path, emulator: Emulator) -> None:
    write_lines(tmp_path / "requests.jsonl", [MIXED[0], MIXED[1], {**MIXED[2], "custom_id": "a-1"}])
    job = batch_job(tmp_path, emulator.url, input={"path": "requests.jsonl", "format": "openai-batch"})
    for command in ("validate", "run"):
        result = run_here(command, str(job))
        assert result.returncode == 2
        (line,) = result.stderr.strip().splitlines()
        assert "id column 'custom_id' is not unique (repeated: a-1)" in line
    assert emulator.stats()["requests"] == 0


def test_templates_with_a_batch_file_are_refused(tmp_path: Path, emulator: Emulator) -> None:
    write_lines(tmp_path / "requests.jsonl", MIXED[:2])
    job = batch_job(tmp_path, emulator.url, prompt={"user": "{{ body }}"})
    result = run_here("validate", str(job))
    assert result.returncode == 2
    assert "prompt.user: recognised as an OpenAI Batch file: its lines are the requests" in result.stderr
    assert "or set input.format: table" in result.stderr  # the way to render templates over such a file


def test_a_changed_body_is_a_changed_request(tmp_path: Path, emulator: Emulator) -> None:
    lines = [chat_line(f"c-{i}", f"Review number {i}: it does what it says.") for i in range(6)]
    write_lines(tmp_path / "requests.jsonl", lines)
    job = batch_job(tmp_path, emulator.url)
    assert run_here("run", str(job), "--quiet").returncode == 0
    emulator.reset()

    lines[4] = chat_line("c-4", "Review number 4: it broke, terrible.")
    write_lines(tmp_path / "requests.jsonl", lines)
    refused = run_here("run", str(job), "--quiet")
    assert refused.returncode == 2
    assert "the input's content changed" in refused.stderr and "1 of 6 finished rows" in refused.stderr
    rerun = run_here("run", str(job), "--quiet", "--rerun-changed")
    assert rerun.returncode == 0, rerun.stderr
    assert emulator.stats()["by_prompt"] == {f"{SYSTEM}\nReview: Review number 4: it broke, terrible.": 1}
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["response_text"][4] == "negative"
    assert (
        read_output(tmp_path / "out" / "result.output.jsonl")[4]["response"]["body"]["choices"][0]["message"]["content"]
        == "negative"
    )


def test_output_openai_batch_never_replaces_a_file_batchrun_did_not_write(tmp_path: Path, emulator: Emulator) -> None:
    write_lines(tmp_path / "requests.jsonl", MIXED[:2])
    (tmp_path / "out").mkdir()
    theirs = tmp_path / "out" / "result.output.jsonl"
    theirs.write_text("the user's own file\n", encoding="utf-8")
    job = batch_job(tmp_path, emulator.url)
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 2
    assert "exists and was not written by this job" in result.stderr
    assert theirs.read_text(encoding="utf-8") == "the user's own file\n"
    assert emulator.stats()["requests"] == 0

    same_as_input = batch_job(
        tmp_path, emulator.url, output={"path": "out/result.parquet", "openai_batch": "requests.jsonl"}
    )
    result = run_here("run", str(same_as_input), "--quiet")
    assert result.returncode == 2 and "is the job's input" in result.stderr


# --- resume after kill -9 -------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_emulator() -> Iterator[Emulator]:
    emulator = start_emulator("--latency-ms", "40")
    yield emulator
    stop_emulator(emulator)


def test_kill_9_with_a_batch_file_then_rerun_sends_only_what_was_not_answered(
    tmp_path: Path, slow_emulator: Emulator
) -> None:
    rows = 200
    lines = [
        chat_line(f"k-{i:03d}", f"Review number {i}: it does what it says.")
        if i % 3
        else completions_line(f"k-{i:03d}", f"Review number {i}: it does what it says.")
        for i in range(rows)
    ]
    write_lines(tmp_path / "requests.jsonl", lines)
    job = batch_job(tmp_path, slow_emulator.url)
    slow_emulator.reset()
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(job), "--quiet"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while slow_emulator.stats()["requests"] < rows // 3:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed_at = time.time()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = slow_emulator.stats()
    assert first["requests"] < rows  # killed mid-run
    slow_emulator.reset()

    rerun = run_here("run", str(job), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    second = slow_emulator.stats()
    assert set(second["by_prompt"].values()) == {1}  # the rerun asks each row at most once
    assert len(set(first["by_prompt"]) | set(second["by_prompt"])) == rows  # and, with the first run, all
    again = [p for p in second["by_prompt"] if p in first["by_prompt"]]
    for prompt in again:
        answered = first["answered_at"].get(prompt)
        assert answered is None or answered > killed_at - 1.0  # only rows in flight at the kill
    assert second["requests"] < rows - rows // 4

    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["custom_id"].to_list() == [line["custom_id"] for line in lines]
    assert set(df["status"]) == {"ok"}
    output = read_output(tmp_path / "out" / "result.output.jsonl")
    assert [line["custom_id"] for line in output] == df["custom_id"].to_list()
    for line, text in zip(output, df["response_text"]):  # bodies kept across the kill, too
        assert_batch_output_format(line)
        assert answer_text(line["response"]["body"]) == text


# --- conversations from a column --------------------------------------------------------

PIXEL = (REPO / "sample_data" / "images" / "rose.png").read_bytes()


def conversations(folder: Path) -> Path:
    """A Parquet of list-of-struct conversations; parts with text or an image; three malformed rows."""

    def text(value: str) -> dict[str, Any]:
        return {"type": "text", "text": value, "image_url": None}

    image = {
        "type": "image_url",
        "text": None,
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(PIXEL).decode()},
    }
    rows = [
        (
            "T1",
            [
                {"role": "user", "content": [text("Review: The kettle boils fast.")]},
                {"role": "assistant", "content": [text("positive")]},
                {"role": "user", "content": [text("Review: The handle cracked. And this one?"), image]},
            ],
        ),
        (
            "T2",
            [
                {"role": "system", "content": [text("Be brief.")]},
                {"role": "user", "content": [text("Review: It arrived on Tuesday.")]},
                {"role": "assistant", "content": [text("neutral")]},
                {"role": "user", "content": [text("Review: Excellent grinder. And this one?")]},
            ],
        ),
        ("BAD-EMPTY", []),
        ("BAD-ROLE", [{"role": "tool", "content": [text("42")]}]),
        ("BAD-NULL", None),
    ]
    frame = pl.DataFrame({"conv_id": [r[0] for r in rows], "messages": [r[1] for r in rows]})
    assert frame.schema["messages"] == pl.List(
        pl.Struct(
            {
                "role": pl.String,
                "content": pl.List(
                    pl.Struct({"type": pl.String, "text": pl.String, "image_url": pl.Struct({"url": pl.String})})
                ),
            }
        )
    )
    path = folder / "conversations.parquet"
    frame.write_parquet(path)
    return path


@pytest.mark.parametrize("api", ["openai-chat", "gemini"])
def test_conversations_from_a_column_arrive_turn_by_turn(tmp_path: Path, emulator: Emulator, api: str) -> None:
    conversations(tmp_path)
    job = {
        "name": "conversations",
        "input": {"path": "conversations.parquet", "id_column": "conv_id"},
        "provider": {"api": api, "base_url": emulator.url, "api_key_env": "TEST_RELAY_KEY"},
        "model": "gemini-2.5-flash" if api == "gemini" else "gpt-5.4",
        "prompt": {"system": "You label product reviews.", "messages": "messages"},
        "output": {"path": "out/result.parquet"},
        "run": {"concurrency": 2, "timeout_s": 30},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    checked = run_here("validate", str(path))
    assert checked.returncode == 0, checked.stderr

    result = run_here("run", str(path), "--quiet")
    assert "output:" in result.stdout, result.stderr  # finished, with the malformed rows as errors
    assistant = "model" if api == "gemini" else "assistant"
    turns = sorted(emulator.stats()["turns"].values())
    assert turns == sorted(
        [
            [
                ["system", "You label product reviews."],
                ["user", "Review: The kettle boils fast."],
                [assistant, "positive"],
                ["user", "Review: The handle cracked. And this one? [image]"],
            ],
            [
                # Gemini takes system turns only in systemInstruction, after prompt.system
                *([["system", "You label product reviews. Be brief."]] if api == "gemini" else []),
                *([] if api == "gemini" else [["system", "You label product reviews."], ["system", "Be brief."]]),
                ["user", "Review: It arrived on Tuesday."],
                [assistant, "neutral"],
                ["user", "Review: Excellent grinder. And this one?"],
            ],
        ]
    )
    assert emulator.stats()["requests"] == 2

    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["status"].to_list() == ["ok", "ok", "error", "error", "error"]
    errors = dict(zip(df["conv_id"], df["error"]))
    assert set(df["error_class"].drop_nulls()) == {"input"}
    assert errors["BAD-EMPTY"].startswith(
        "row BAD-EMPTY: prompt.messages (column 'messages'): the conversation is empty"
    )
    assert "row BAD-ROLE: " in errors["BAD-ROLE"] and "message 1: unknown role 'tool'" in errors["BAD-ROLE"]
    assert "row BAD-NULL: " in errors["BAD-NULL"] and "not a list of messages" in errors["BAD-NULL"]


def conversation_job(base_url: str, prompt: dict[str, Any]) -> dict[str, Any]:
    """An openai-chat job over conversations(folder)."""
    return {
        "name": "conversations",
        "input": {"path": "conversations.parquet", "id_column": "conv_id"},
        "provider": {"base_url": base_url, "api_key_env": "TEST_RELAY_KEY"},
        "model": "gpt-5.4",
        "prompt": prompt,
        "output": {"path": "out/result.parquet"},
    }


def test_messages_and_user_together_are_refused(tmp_path: Path, emulator: Emulator) -> None:
    conversations(tmp_path)
    job = conversation_job(emulator.url, {"user": "hi", "messages": "messages"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    result = run_here("run", str(path))
    assert result.returncode == 2 and "prompt.messages: set prompt.user or prompt.messages, not both" in result.stderr
    job["prompt"] = {"messages": "conversation"}
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    result = run_here("run", str(path))
    assert result.returncode == 2 and "prompt.messages: column 'conversation' is not in the input" in result.stderr
    assert emulator.stats()["requests"] == 0


def test_a_batch_file_keeps_the_estimate_the_budget_and_structured_parsing(tmp_path: Path, emulator: Emulator) -> None:
    schema = {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "label", "schema": schema}}
    lines = [chat_line(f"s-{i}", f"Review number {i}: terrible.", response_format=response_format) for i in range(6)]
    lines[1] = completions_line("s-1", "Review number 1: terrible.")
    write_lines(tmp_path / "requests.jsonl", lines)
    output = {"path": "out/result.parquet", "parse": "json", "schema": schema}
    pricing = {"input_per_million": 1000, "output_per_million": 1000}
    job = batch_job(tmp_path, emulator.url, output=output, pricing=pricing, run={"concurrency": 1, "max_cost": 0.16})

    checked = run_here("validate", str(job))
    assert checked.returncode == 0, checked.stderr
    # the largest output cap among the bodies (chat 20, completions 5): 6 rows × 20
    assert "output tokens: at most 120 (20 a row, the largest cap in the sampled bodies and params)" in checked.stdout

    stopped = run_here("run", str(job), "--quiet")
    assert stopped.returncode == 4, stopped.stderr  # each row's worst case counts its own body's cap
    assert "budget reached" in stopped.stderr
    sent = emulator.stats()["requests"]
    assert 1 <= sent < len(lines)

    finished = run_here("run", str(job), "--quiet", "--max-cost", "10")
    assert "output:" in finished.stdout, finished.stderr
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    chat_rows = df.filter(pl.col("url") == "/v1/chat/completions")
    assert chat_rows["status"].to_list() == ["ok"] * 5 and chat_rows["label"].to_list() == ["negative"] * 5
    assert emulator.stats()["requests"] == len(lines)  # nothing asked twice


@pytest.mark.parametrize("api", ["openai-chat", "openai-completions"])
def test_a_streamed_answer_is_written_as_the_whole_answer_it_stands_for(
    tmp_path: Path, emulator: Emulator, api: str
) -> None:
    """A template job's Batch output: the streamed run's bodies equal the unstreamed run's (tool calls included)."""
    (tmp_path / "reviews.csv").write_text("id,text\nR1,I love it.\nR2,It broke.\n", encoding="utf-8")
    tool = {"type": "function", "function": {"name": "record", "parameters": {"type": "object", "properties": {}}}}
    params: dict[str, Any] = {"max_tokens": 30}
    if api == "openai-chat":
        params = {"max_completion_tokens": 30, "tools": [tool], "tool_choice": "required"}
    bodies = {}
    for stream in (False, True):
        folder = tmp_path / f"stream-{stream}"
        folder.mkdir()
        (folder / "reviews.csv").write_bytes((tmp_path / "reviews.csv").read_bytes())
        job = {
            "name": "templated",
            "input": {"path": "reviews.csv", "id_column": "id"},
            "provider": {"api": api, "base_url": emulator.url, "api_key_env": "TEST_RELAY_KEY"},
            "model": "gpt-5.4",
            "prompt": {"user": "Review: {{ text }}"},
            "params": params,
            "stream": stream,
            "output": {"path": "out/result.parquet", "openai_batch": "out/answers.jsonl"},
        }
        (folder / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
        result = run_here("run", str(folder / "job.yaml"), "--quiet")
        assert result.returncode == 0, result.stderr
        lines = read_output(folder / "out" / "answers.jsonl")
        assert [line["custom_id"] for line in lines] == ["R1", "R2"]
        bodies[stream] = [line["response"]["body"] for line in lines]
    for whole, streamed in zip(bodies[False], bodies[True]):
        assert streamed["object"] == whole["object"] and streamed["model"] == whole["model"]
        assert set(whole["choices"][0]) <= set(streamed["choices"][0])  # every field a reader may index
        if api == "openai-chat":
            assert set(whole["choices"][0]["message"]) <= set(streamed["choices"][0]["message"])
        assert streamed["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert streamed["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
        if api == "openai-chat":
            got, want = streamed["choices"][0]["message"], whole["choices"][0]["message"]
            assert got["content"] == want["content"]
            assert [c["function"] for c in got["tool_calls"]] == [c["function"] for c in want["tool_calls"]]
            assert all(c["id"] and c["type"] == "function" for c in got["tool_calls"])
        else:
            assert streamed["choices"][0]["text"] == whole["choices"][0]["text"]


def test_a_changed_image_part_style_is_a_changed_conversation_request(tmp_path: Path, emulator: Emulator) -> None:
    """provider.image_part_style names every part of a conversation's content, so a rerun must see it changed."""
    conversations(tmp_path)
    job = conversation_job(emulator.url, {"messages": "messages"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    assert "output:" in run_here("run", str(path), "--quiet").stdout
    job["provider"] = {**job["provider"], "image_part_style": "responses"}
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    refused = run_here("run", str(path), "--quiet")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "provider.image_part_style: standard -> responses" in refused.stderr
    assert "2 of 5 finished rows would now be sent differently" in refused.stderr


class _EchoingRelay(BaseHTTPRequestHandler):
    """Answers every chat request 200, echoing the credentials it was sent outside the answer's text."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        credentials = self.headers["Authorization"]
        answer = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-5.4",
            "system_fingerprint": credentials,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "positive"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Oneapi-Request-Id", credentials.removeprefix("Bearer sk-"))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_key_echoed_in_an_answer_is_kept_nowhere(tmp_path: Path) -> None:
    relay = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingRelay)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        write_lines(tmp_path / "requests.jsonl", [MIXED[0]])
        job = batch_job(tmp_path, f"http://127.0.0.1:{relay.server_address[1]}")
        result = run_cli("run", str(job), "--quiet")
    finally:
        relay.shutdown()
        relay.server_close()
    assert result.returncode == 0, result.stderr
    (line,) = read_output(tmp_path / "out" / "result.output.jsonl")
    assert line["response"]["body"]["system_fingerprint"] == "Bearer ***"
    assert line["response"]["request_id"] == "***"
    assert_key_nowhere(tmp_path, result)


def test_restart_replaces_the_batch_output_the_job_wrote_before(tmp_path: Path, emulator: Emulator) -> None:
    write_lines(tmp_path / "requests.jsonl", MIXED[:2])
    job = batch_job(tmp_path, emulator.url)
    assert run_here("run", str(job), "--quiet").returncode == 0
    restarted = run_here("run", str(job), "--quiet", "--restart")  # the new checkpoint still knows the file
    assert restarted.returncode == 0, restarted.stderr
    assert emulator.stats()["requests"] == 4
    assert [line["custom_id"] for line in read_output(tmp_path / "out" / "result.output.jsonl")] == ["a-1", "a-2"]


def test_an_inline_image_in_a_body_is_estimated_as_an_image_not_as_its_base64(
    tmp_path: Path, emulator: Emulator
) -> None:
    """A 400 KB image as a data URL would be ~100,000 tokens as text; it is held like any image (1,000)."""
    photo = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8" + os.urandom(300_000)).decode()
    content = [
        {"type": "text", "text": "Label this product photo."},
        {"type": "image_url", "image_url": {"url": photo}},
    ]
    lines = [chat_line(f"p-{i}", "", messages=[{"role": "user", "content": content}], seed=i) for i in range(3)]
    write_lines(tmp_path / "requests.jsonl", lines)
    pricing = {"input_per_million": 10, "output_per_million": 10}
    job = batch_job(tmp_path, emulator.url, pricing=pricing, run={"concurrency": 1, "max_cost": 0.5})

    checked = run_here("validate", str(job))
    assert checked.returncode == 0, checked.stderr
    per_row = int(checked.stdout.split("input tokens:")[1].split("(")[1].split(" a row")[0])
    assert per_row < 1_000, checked.stdout  # the text and JSON; the image is not text

    result = run_here("run", str(job), "--quiet")  # each row holds ~$0.01, not ~$1 (over max_cost: nothing sent)
    assert result.returncode == 0, result.stderr
    assert emulator.stats()["requests"] == 3

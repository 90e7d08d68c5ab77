"""The OpenAI Batch API's files: request lines in, output lines out (docs/openai-batch.md).

In: each line `{"custom_id", "method", "url", "body"}` is one row. Its `url` picks
the protocol (`/v1/chat/completions` or `/v1/completions`); its `body` is sent as
written, with the job's `model` and `params` laid over it. The lines are read in
blocks by job/inputs.py, like any JSONL input, as rows of four string columns (`body` as JSON text).

Out: `output.openai_batch` gets one line per row in input order: `id`, `custom_id`,
`response` (`status_code`, `request_id`, `body`: the answer as received, a stream
reassembled) for answered rows, `error` (`code`, `message`) for failed ones. The
file is written under a temporary name and renamed into place, and only ever
replaces a file this job wrote before (its size and time are kept in the checkpoint).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from batchrun.base import storage
from batchrun.base.errors import JobError

URL_APIS = {"/v1/chat/completions": "openai-chat", "/v1/completions": "openai-completions"}
SCHEMA = pl.Schema({"custom_id": pl.String(), "method": pl.String(), "url": pl.String(), "body": pl.String()})
WRITTEN_META = "openai_batch_written"  # checkpoint meta: [[path, size, mtime_ns], …] of the files this job wrote


def frames(blocks: Iterable[bytes], where: str, start: int = 0) -> Iterator[pl.DataFrame]:
    """The request lines in these blocks of whole lines, as rows from row `start` on; a bad line is a
    JobError naming it. Blank lines are no rows, but count as lines."""
    line_no = 0
    row = 0
    for block in blocks:
        rows: list[dict[str, str]] = []
        for raw in _lines_of(block):
            line_no += 1
            if not raw.strip():
                continue
            if row >= start:
                rows.append(parse_line(raw, f"{where}: line {line_no}"))
            row += 1
        if rows:
            yield pl.DataFrame(rows, schema=SCHEMA)


def count(blocks: Iterable[bytes]) -> int:
    """Non-blank lines: the rows."""
    return sum(1 for block in blocks for raw in _lines_of(block) if raw.strip())


def _lines_of(block: bytes) -> list[bytes]:
    lines = block.split(b"\n")
    if lines[-1] == b"":  # the block's last newline ends its last line
        lines.pop()
    return lines


def parse_line(raw: bytes, where: str) -> dict[str, str]:
    """One request line as a row: custom_id, method, url and body (its JSON text)."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise JobError(f"{where}: not JSON ({e})") from None
    if not isinstance(line, dict):
        raise JobError(f"{where}: a request line must be an object with custom_id, method, url and body")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise JobError(f"{where}: custom_id must be a non-empty string (got {custom_id!r})")
    method = line.get("method", "POST")
    if method != "POST":
        raise JobError(f"{where}: method {method!r} is not supported; a request line is a POST")
    url = line.get("url")
    if url not in URL_APIS:
        raise JobError(
            f"{where}: url {url!r} is not supported; batchrun sends {' and '.join(URL_APIS)} (custom_id {custom_id})"
        )
    body = line.get("body")
    if not isinstance(body, dict):
        raise JobError(f"{where}: body must be an object, the request as the API takes it (custom_id {custom_id})")
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": orjson.dumps(body).decode()}


# --- the output file ------------------------------------------------------------------


def line_id(custom_id: str) -> str:
    """A stable `id` per line (the Batch API's own are `batch_req_…`)."""
    return "batch_req_" + hashlib.blake2b(custom_id.encode(), digest_size=12).hexdigest()


def output_line(
    custom_id: str, status: str, error_class: str | None, error: str | None, answer: tuple[Any, ...] | None
) -> bytes:
    """One output line from a finished row and its kept answer (status_code, request_id, body bytes)."""
    response: dict[str, Any] | None = None
    failure: dict[str, str] | None = None
    if status == "ok" and answer is not None:
        status_code, request_id, body = answer
        response = {"status_code": status_code, "request_id": request_id or "", "body": orjson.loads(body)}
    elif status == "ok":
        failure = {
            "code": "answer_not_kept",
            "message": "answered, but its body was not kept (answered before output.openai_batch was set, "
            "or larger than the checkpoint keeps); the answer's text is in the Parquet output",
        }
    else:
        failure = {"code": error_class or "error", "message": error or ""}
    line = {"id": line_id(custom_id), "custom_id": custom_id, "response": response, "error": failure}
    return orjson.dumps(line) + b"\n"


def check_target(target: Path, written: str | None, others: dict[str, Path]) -> None:
    """Refuse to write over a file this job did not write (`written`: the stamps kept in the checkpoint)."""
    for what, path in others.items():
        if path.resolve() == target.resolve():
            raise JobError(f"output.openai_batch: {target} is the job's {what}; choose another path")
    if not target.exists():
        return
    if written is None or _stamp(target) not in orjson.loads(written):
        raise JobError(
            f"output.openai_batch: {target} exists and was not written by this job; "
            "move it away or choose another path (batchrun never writes over a file it did not write)"
        )


def write(target: Path, lines: Iterator[bytes], record: Callable[[str], None]) -> None:
    """Writes the file atomically. `record` keeps its stamp in the checkpoint before the rename (along
    with the file it replaces, so a kill between the two leaves either one recognised) and after it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    storage.remove_leftovers(target)
    with storage.new_file_beside(target) as (f, tmp):
        for line in lines:
            f.write(line)
        f.close()
        new = _stamp(tmp, target)  # a rename keeps the size and the time
        old = [_stamp(target)] if target.exists() else []
        record(orjson.dumps([*old, new]).decode())
        os.replace(tmp, target)
    record(orjson.dumps([new]).decode())


def _stamp(path: Path, named: Path | None = None) -> list[Any]:
    st = path.stat()
    return [str((named or path).resolve()), st.st_size, st.st_mtime_ns]

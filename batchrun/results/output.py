"""Checkpointed results to Parquet, streamed batch by batch in input order.

The input is read again alongside the checkpoint, one batch at a time, so the
output of a 10-million-row job is written in the memory of one batch. The file
is written under a temporary name and renamed into place when complete (for an
object-storage output: uploaded, then the local file removed).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.base import storage
from batchrun.base.errors import JobError
from batchrun.base.version import __version__
from batchrun.flow import spend
from batchrun.job import openai_batch
from batchrun.job.inputs import ROW_INDEX, InputTable
from batchrun.job.spec import Job, PricingSpec
from batchrun.job.structured import PARSE_NOTE, SCHEMA_INVALID, AnswerParser
from batchrun.ledger.checkpoint import ROW_COLUMNS, Checkpoint, checkpoint_folder
from batchrun.pipeline import images
from batchrun.pipeline.timeline import Watched

LEARNED_LIMITS = "learned_limits"  # checkpoint meta: [{key, requests, window_s, source}], written by the limiter
# The output's Parquet key-value metadata: how batchrun knows a file it may replace is its own.
OWN_OUTPUT_KEY = b"batchrun"
# Input batches are gathered into row groups of this many rows: the writer keeps every
# row group's metadata until it closes, and one group per 2,048-row batch made 10 M rows ~5,000 groups.
ROW_GROUP_ROWS = 16_384
# A column's dictionary stops growing at this size and the rest of its row group is written plain. Ids,
# texts and answers are mostly unique, so their dictionaries were dead weight: pyarrow's default (1 MiB,
# with its hash table) made the writer 13 MB instead of 5, and the file larger (docs/memory.md).
DICTIONARY_PAGE_BYTES = 1 << 16
TOOL_CALL = pl.Struct({"name": pl.String, "arguments": pl.String})
RESULT_SCHEMA: dict[str, pl.DataType] = {
    "response_text": pl.String(),
    "tool_calls": pl.List(TOOL_CALL),
    "image_paths": pl.List(pl.String()),
    "finish_reason": pl.String(),
    "model": pl.String(),
    "prompt_tokens": pl.Int64(),
    "cached_tokens": pl.Int64(),  # of prompt_tokens, from the provider's prompt cache
    "completion_tokens": pl.Int64(),
    "latency_s": pl.Float64(),
    "attempts": pl.Int64(),
    "repairs": pl.Int64(),
    "shared_from": pl.String(),
    "status": pl.String(),
    "error_class": pl.String(),
    "error": pl.String(),
}


def result_frame(
    rows: list[tuple[Any, ...]], parser: AnswerParser | None, pricing: PricingSpec | None, repairs: bool = False
) -> pl.DataFrame:
    """Checkpoint rows to the output's result columns (plus row_index to join on).

    The answers are parsed here, so a changed schema only needs the output rewritten;
    `repairs` is a column only when the job asks for repairs.
    """
    cols = {name: [r[i] for r in rows] for i, name in enumerate(ROW_COLUMNS)}
    for name in ("tool_calls", "image_paths"):
        cols[name] = [orjson.loads(t) if t else None for t in cols[name]]
    names = [n for n in RESULT_SCHEMA if repairs or n != "repairs"]
    frame = pl.DataFrame(
        {ROW_INDEX: cols["idx"], **{name: cols[name] for name in names}},
        schema={ROW_INDEX: pl.UInt32(), **{name: RESULT_SCHEMA[name] for name in names}},
    )
    if parser is not None:
        frame = parser.apply(frame)
    if pricing is not None:
        frame = frame.with_columns(spend.cost_expr(pricing, frame.columns))
    return frame


def check_columns(job: Job, parser: AnswerParser | None, input_columns: list[str]) -> None:
    """Result columns must not clash with input columns, nor the schema's properties (which become columns)
    with either: each clash is refused in one line, never resolved by polars' silent `_right` suffix."""
    results = {*RESULT_SCHEMA, "cost"} | ({PARSE_NOTE} if parser is not None else set())
    clash = sorted(results & set(input_columns))
    if clash:
        names, renames = ", ".join(map(repr, clash)), ", ".join(f"'input_{c}'" for c in clash)
        one = len(clash) == 1
        which, them = (f"a column {names}, which is", "that column") if one else (f"columns {names}, which are", "them")
        raise JobError(
            f"{job.path}: input.path {job.spec.input.path}: the input has {which} also the name of a result "
            f"column of the output; rename {them} in the input (e.g. to {renames})"
        )
    if parser is None:
        return
    taken = {*input_columns, ROW_INDEX, *RESULT_SCHEMA, PARSE_NOTE, "cost", "image_paths"}
    clash = sorted(taken & set(parser.columns))
    if clash:
        raise JobError(
            f"{job.path}: output.schema: the property {clash[0]!r} would become a column, but the output already "
            "has a column of that name; rename the property (in the tool's parameters with parse: tool)"
        )


def check_targets(job: Job) -> None:
    """Never write over user data: refuse, before anything is sent, an output or images folder that is the
    input (or one of its glob's files), or an existing file at the output that batchrun did not write."""
    _check_output_places(job)
    shown_input = job.input_path if job.frame is None else "(a frame given in Python)"
    targets = (("output.path", job.output_url or job.output_path), ("output.images_dir", job.images_dir))
    for key, target in targets if job.frame is None else ():
        if _is_input(target, job.input_path):
            raise JobError(
                f"{job.path}: {key} {target} is the input {shown_input}; batchrun would write over it. "
                f"Set {key} to another path"
            )
    out = job.output_path  # for an object-storage output, its local stand-in (storage.check_output checks the key)
    if out.is_dir():
        raise JobError(f"{job.path}: output.path {out} is a folder; name a .parquet file (input: {shown_input})")
    if out.exists() and not _written_by_batchrun(out):
        raise JobError(
            f"{job.path}: output.path {out} exists and is not an output batchrun wrote; batchrun will not replace "
            f"it. Move it away or set output.path to another file (input: {shown_input})"
        )
    summary = summary_path(out)
    if summary.exists() and not _is_summary(summary):
        raise JobError(
            f"{job.path}: output.path {out}: the summary would replace {summary}, which batchrun did not write; "
            "move it away or choose another output.path"
        )


def _check_output_places(job: Job) -> None:
    """Each thing a run writes needs a place of its own, or one replaces another (the summary the Batch file)."""
    out = job.output_path
    places = {
        "output.path": out,
        "the summary of output.path": summary_path(out),
        "the report of output.path": report_path(out),
        "the checkpoint of output.path": checkpoint_folder(out),
        "output.images_dir": job.images_dir,
    }
    if job.openai_batch_path is not None:
        places["output.openai_batch"] = job.openai_batch_path
    seen: dict[Path, str] = {}
    for key, place in places.items():
        if (other := seen.setdefault(place.resolve(), key)) != key:
            raise JobError(f"{job.path}: {key} and {other} are the same path ({place}); give each its own path")
    if job.spec.output.images_dir is not None and images.foreign_files(job.images_dir, seen):
        raise JobError(
            f"{job.path}: output.images_dir {job.images_dir} already holds files batchrun did not write, and batchrun "
            "never replaces them; set output.images_dir to a new or empty folder"
        )


def _is_input(target: Path | str, input_path: str) -> bool:
    if isinstance(target, str) or storage.is_url(input_path):  # object storage: the same URL
        return str(target) == input_path
    pattern = os.path.normpath(os.path.abspath(input_path))
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(str(target), pattern)
    source = Path(pattern)
    return target == source.resolve() or (target.exists() and source.exists() and os.path.samefile(target, source))


def _written_by_batchrun(path: Path) -> bool:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return OWN_OUTPUT_KEY in metadata


def _is_summary(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "requested_this_run" in data


def write_parquet(
    table: InputTable,
    checkpoint: Checkpoint,
    job: Job,
    limit: int | None,
    parser: AnswerParser | None,
) -> dict[str, Any]:
    """Writes the output; returns its totals (rows ok / error, schema failures, shared, cost)."""
    path = job.output_path
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.remove_leftovers(path)
    with storage.new_file_beside(path) as (file, tmp):
        totals = _write_parquet(file, table, checkpoint, job, limit, parser)
        file.close()
        if job.output_url is None:
            os.replace(tmp, path)
        else:  # written whole here first: nothing is at the key until the output is complete
            storage.upload(tmp, job.output_url, job.spec.output.storage_options)
    return totals


def _write_parquet(
    file: BinaryIO, table: InputTable, checkpoint: Checkpoint, job: Job, limit: int | None, parser: AnswerParser | None
) -> dict[str, Any]:
    pricing = job.spec.pricing
    writer: pq.ParquetWriter | None = None
    group: list[pa.Table] = []
    totals: dict[str, Any] = {"ok": 0, "error": 0, SCHEMA_INVALID: 0, "shared": 0}
    if pricing is not None:
        totals["cost"] = 0.0
    try:
        for batch in table.batches(limit):
            lo, hi = batch[ROW_INDEX][0], batch[ROW_INDEX][-1] + 1
            results = result_frame(
                checkpoint.rows_in_range(lo, hi), parser, pricing, job.spec.output.repair_attempts > 0
            )
            _add_totals(totals, results)
            merged = batch.join(results, on=ROW_INDEX, how="left", maintain_order="left")
            if table.id_column is not None:
                merged = merged.drop(ROW_INDEX)
            arrow = merged.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(
                    file,
                    arrow.schema.with_metadata(_own_metadata(job)),
                    compression="zstd",
                    dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES,
                )
            group.append(arrow.cast(writer.schema))
            if sum(t.num_rows for t in group) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(group))
                group.clear()
        if writer is not None and group:
            writer.write_table(pa.concat_tables(group))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # an empty input still gets a (column-less) file
        pq.write_table(pa.table({}).replace_schema_metadata(_own_metadata(job)), file)
    return totals


def _own_metadata(job: Job) -> dict[bytes, bytes]:
    return {OWN_OUTPUT_KEY: orjson.dumps({"version": __version__, "job": job.spec.name})}


def check_openai_batch_target(job: Job, checkpoint: Checkpoint) -> None:
    """output.openai_batch may only replace the file this job wrote there before."""
    assert job.openai_batch_path is not None
    others = {"output.path": job.output_path}
    if job.frame is None and not storage.is_url(job.input_path):
        others["input"] = Path(job.input_path)
    openai_batch.check_target(job.openai_batch_path, checkpoint.get_meta(openai_batch.WRITTEN_META), others)


def write_openai_batch(table: InputTable, checkpoint: Checkpoint, job: Job, limit: int | None) -> None:
    """The Batch API's output file, one line per finished row, in input order, from the checkpoint."""
    assert job.openai_batch_path is not None
    check_openai_batch_target(job, checkpoint)

    rows = table.count() if limit is None else min(limit, table.count())

    def lines() -> Iterator[bytes]:
        for lo in range(0, rows, ROW_GROUP_ROWS):  # the checkpoint alone, a bounded range at a time
            hi = min(lo + ROW_GROUP_ROWS, rows)
            answers = checkpoint.answers_in_range(lo, hi)
            for record in checkpoint.rows_in_range(lo, hi):
                row = dict(zip(ROW_COLUMNS, record))
                answer = answers.get(row["idx"])
                yield openai_batch.output_line(row["row_id"], row["status"], row["error_class"], row["error"], answer)

    openai_batch.write(job.openai_batch_path, lines(), partial(checkpoint.set_meta, openai_batch.WRITTEN_META))


def _add_totals(totals: dict[str, Any], results: pl.DataFrame) -> None:
    row = results.select(
        (pl.col("status") == "ok").sum().alias("ok"),
        (pl.col("status") == "error").sum().alias("error"),
        (pl.col("error_class") == SCHEMA_INVALID).sum().alias(SCHEMA_INVALID),
        pl.col("shared_from").is_not_null().sum().alias("shared"),
        *([pl.col("cost").sum()] if "cost" in totals else []),
    ).row(0, named=True)
    for key, value in row.items():
        totals[key] += value


def failed_answers(checkpoint: Checkpoint, parser: AnswerParser, rows: int, chunk: int = 10_000) -> Iterator[list[int]]:
    """Indexes of stored answers that fail the parse/schema check, a chunk of the checkpoint at a time."""
    for lo in range(0, rows, chunk):
        failed = []
        for record in checkpoint.rows_in_range(lo, lo + chunk):
            row = dict(zip(ROW_COLUMNS, record))
            if (
                row["status"] == "ok"
                and not parser.judge_stored(row["response_text"], row["finish_reason"], row["tool_calls"]).ok
            ):
                failed.append(row["idx"])
        yield failed


def summary_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + ".summary.json")


def report_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + ".report.html")


def write_summary(output_path: Path, summary: dict[str, Any]) -> Path:
    target = summary_path(output_path)
    with storage.replacing(target) as f:
        f.write((json.dumps(summary, indent=2) + "\n").encode())
    return target


def watch_summary(watched: Watched | None, checkpoint: Checkpoint) -> dict[str, Any]:
    """The summary's push-back figures of this run (None where the engine does not count them: Ray) and the
    limits learned for each key, as the limiter kept them in the checkpoint."""
    return {
        "answered_429": watched.answered_429 if watched is not None else None,
        "retries": watched.retries if watched is not None else None,
        "paused_s": round(watched.paused_s, 1) if watched is not None else None,
        "learned_limits": learned_limits(checkpoint),
    }


def learned_limits(checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """[{key, requests, window_s, source}] from the checkpoint's meta; empty when none was learned (or kept).

    An entry without a number of requests and a window is left out: every reader may divide one by the other."""
    try:
        kept = orjson.loads(checkpoint.get_meta(LEARNED_LIMITS) or "[]")
    except orjson.JSONDecodeError:
        return []
    return [
        {
            "key": str(item.get("key")),
            "requests": item["requests"],
            "window_s": item["window_s"],
            "source": str(item.get("source")),
        }
        for item in (kept if isinstance(kept, list) else [])
        if isinstance(item, dict) and _positive(item.get("requests")) and _positive(item.get("window_s"))
    ]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def watch_lines(summary: dict[str, Any]) -> list[str]:
    """The printed summary's lines on push-back and learned limits (nothing for a summary without them)."""
    lines = []
    if summary.get("answered_429") or summary.get("retries") or summary.get("paused_s"):  # a clean run: no line
        lines.append(
            f"push-back this run: {summary['answered_429']} answers 429, {summary['retries']} retries, "
            f"starts paused {summary['paused_s']:g} s"
        )
    learned = [
        f"{item['key']}: {item['requests']} requests per {item['window_s']:g} s ({item['source']})"
        for item in summary.get("learned_limits") or []
    ]
    if learned:
        lines.append("learned limits: " + "; ".join(learned))
    return lines

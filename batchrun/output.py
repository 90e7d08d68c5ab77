"""Checkpointed results to Parquet, streamed batch by batch in input order.

The input is read again alongside the checkpoint, one batch at a time, so the
output of a 10-million-row job is written in the memory of one batch. The file
is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.checkpoint import ROW_COLUMNS, Checkpoint
from batchrun.inputs import ROW_INDEX, InputTable
from batchrun.spec import PricingSpec

# Input batches are gathered into row groups of this many rows: the writer keeps every
# row group's metadata until it closes, and one group per 2,048-row batch made 10 M rows ~5,000 groups.
ROW_GROUP_ROWS = 16_384
TOOL_CALL = pl.Struct({"name": pl.String, "arguments": pl.String})
RESULT_SCHEMA: dict[str, pl.DataType] = {
    "response_text": pl.String(),
    "tool_calls": pl.List(TOOL_CALL),
    "finish_reason": pl.String(),
    "model": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "latency_s": pl.Float64(),
    "attempts": pl.Int64(),
    "status": pl.String(),
    "error_class": pl.String(),
    "error": pl.String(),
}


def result_frame(rows: list[tuple[Any, ...]], pricing: PricingSpec | None) -> pl.DataFrame:
    """Checkpoint rows to the output's result columns (plus row_index to join on)."""
    cols = {name: [r[i] for r in rows] for i, name in enumerate(ROW_COLUMNS)}
    cols["tool_calls"] = [orjson.loads(t) if t else None for t in cols["tool_calls"]]
    frame = pl.DataFrame(
        {ROW_INDEX: cols["idx"], **{name: cols[name] for name in RESULT_SCHEMA}},
        schema={ROW_INDEX: pl.UInt32(), **RESULT_SCHEMA},
    )
    if pricing is not None:
        cost = pl.col("prompt_tokens") * (pricing.input_per_million / 1e6) + pl.col("completion_tokens") * (
            pricing.output_per_million / 1e6
        )
        frame = frame.with_columns(cost.alias("cost"))
    return frame


def write_parquet(
    table: InputTable,
    checkpoint: Checkpoint,
    path: Path,
    limit: int | None,
    pricing: PricingSpec | None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    writer: pq.ParquetWriter | None = None
    group: list[pa.Table] = []
    try:
        for batch in table.batches(limit):
            lo, hi = batch[ROW_INDEX][0], batch[ROW_INDEX][-1] + 1
            results = result_frame(checkpoint.rows_in_range(lo, hi), pricing)
            merged = batch.join(results, on=ROW_INDEX, how="left", maintain_order="left")
            if table.id_column is not None:
                merged = merged.drop(ROW_INDEX)
            arrow = merged.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(tmp, arrow.schema, compression="zstd")
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
        pl.DataFrame().write_parquet(tmp)
    os.replace(tmp, path)


def summary_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + ".summary.json")


def write_summary(output_path: Path, summary: dict[str, Any]) -> Path:
    target = summary_path(output_path)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target

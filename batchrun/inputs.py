"""The input table, read lazily in batches with polars; never whole in memory."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from batchrun.errors import JobError
from batchrun.spec import Job

ROW_INDEX = "row_index"  # 0-based position in the input; the id when no id_column is given
BATCH_ROWS = 2048


class InputTable:
    """One input file (or a glob of Parquet files) and its id column."""

    def __init__(self, path: str, id_column: str | None, job_file: Path, shown_path: str | None = None) -> None:
        self.path = path
        self.id_column = id_column
        self._where = f"{job_file}: input.path {shown_path or path}"
        self._frame = self._scan()
        try:
            self.schema = self._frame.collect_schema()
        except Exception as e:  # polars raises many kinds for unreadable files
            raise JobError(f"{self._where}: cannot read the input: {_first_line(e)}") from None
        if id_column is None and ROW_INDEX in self.schema:
            raise JobError(
                f"{job_file}: input.id_column: the input has a column named {ROW_INDEX}, "
                "which batchrun uses as the default id; set input.id_column"
            )
        if id_column is not None and id_column not in self.schema:
            raise JobError(
                f"{job_file}: input.id_column: column '{id_column}' is not in {path}; "
                f"its columns are: {', '.join(self.columns)}"
            )

    @classmethod
    def for_job(cls, job: Job) -> InputTable:
        return cls(job.input_path, job.spec.input.id_column, job.path, shown_path=job.spec.input.path)

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names())

    @property
    def id_name(self) -> str:
        return self.id_column or ROW_INDEX

    def _scan(self) -> pl.LazyFrame:
        path = self.path
        suffix = Path(path).suffix.lower()
        if any(ch in path for ch in "*?["):
            if suffix != ".parquet":
                raise JobError(f"{self._where}: a glob must name .parquet files")
            if not glob.glob(path):
                raise JobError(f"{self._where}: no file matches this pattern")
        elif not Path(path).is_file():
            raise JobError(f"{self._where}: file not found")
        if suffix == ".csv":
            return pl.scan_csv(path, infer_schema_length=10_000)
        if suffix == ".parquet":
            return pl.scan_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return pl.scan_ndjson(path, infer_schema_length=10_000)
        raise JobError(f"{self._where}: unsupported extension '{suffix}'; use .csv, .parquet or .jsonl")

    def count(self) -> int:
        return self._collect(self._frame.select(pl.len())).item()

    def check_ids(self) -> None:
        """The id column must be unique and non-null; reads only that column."""
        if self.id_column is None:
            return
        col = pl.col(self.id_column)
        stats = self._collect(
            self._frame.select(
                col.null_count().alias("nulls"),
                col.is_duplicated().any().alias("dup"),
            )
        )
        if stats["nulls"][0]:
            raise JobError(f"{self._where}: id column '{self.id_column}' has {stats['nulls'][0]} empty values")
        if stats["dup"][0]:
            example = self._collect(self._frame.group_by(col).len().filter(pl.col("len") > 1).head(3))[
                self.id_column
            ].to_list()
            raise JobError(
                f"{self._where}: id column '{self.id_column}' is not unique "
                f"(repeated: {', '.join(map(str, example))}); pick a unique column or drop input.id_column"
            )

    def sample(self, rows: int, total: int) -> pl.DataFrame:
        """About `rows` rows spread evenly over an input of `total` rows (for estimates)."""
        every = max(1, -(-total // max(rows, 1)))  # ceil: the sample spans the whole input
        return self._collect(self._frame.gather_every(every).head(rows))

    def batches(self, limit: int | None = None, batch_rows: int = BATCH_ROWS) -> Iterator[pl.DataFrame]:
        """Input rows in order, each batch with the row_index column first."""
        frame = self._frame.with_row_index(ROW_INDEX)
        if limit is not None:
            frame = frame.head(limit)
        try:
            yield from frame.collect_batches(chunk_size=batch_rows)
        except pl.exceptions.PolarsError as e:
            raise JobError(f"{self._where}: cannot read the input: {_first_line(e)}") from None

    def _collect(self, frame: pl.LazyFrame) -> pl.DataFrame:
        try:
            return frame.collect(engine="streaming")
        except pl.exceptions.PolarsError as e:
            raise JobError(f"{self._where}: cannot read the input: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__

"""The input table, read in batches; never whole in memory.

polars scans the input for its schema, row count and errors, but its streaming
`collect_batches` reads far ahead of a slow consumer (a 10-million-row Parquet
file was all in memory, 1.1 GB, before the first thousand rows were sent). So
rows are read here in bounded pieces: Parquet as slices of the scan; CSV and
JSONL in blocks of whole records, parsed by polars with the schema its scan
inferred (so every piece parses exactly as the scan would).
"""

from __future__ import annotations

import glob
import hashlib
import io
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

import polars as pl

from batchrun.base import storage
from batchrun.base.errors import JobError
from batchrun.job import openai_batch
from batchrun.job.openai_batch import MAX_LINE_BYTES, line_too_long
from batchrun.job.spec import Job

ROW_INDEX = "row_index"  # 0-based position in the input; the id when no id_column is given
BATCH_ROWS = 2048
BLOCK_BYTES = 4 << 20  # CSV / JSONL read size
PARQUET_READ_ROWS = 16_384
# polars fetches a whole row group's column chunks for any slice of it, so an object is read in
# bigger slices, to fetch each row group fewer times (docs/object-storage.md has the measurements).
REMOTE_PARQUET_READ_ROWS = 65_536
ID_PARTITION_ROWS = 500_000  # ids checked for uniqueness this many at a time


class InputTable:
    """One input (a file, a glob of Parquet files, an object-storage URL or a frame from Python) and its id column."""

    def __init__(
        self,
        path: str,
        id_column: str | None,
        job_file: Path,
        shown_path: str | None = None,
        frame: pl.DataFrame | None = None,
        storage_options: dict[str, str] | None = None,
        batch: bool = False,
    ) -> None:
        self.path = path
        self.batch = batch  # an OpenAI Batch request file: rows are its lines, custom_id the id
        self.id_column = "custom_id" if batch else id_column
        id_column = self.id_column
        self.given = frame  # the input given in Python: it is read in slices like Parquet
        self.storage_options = storage_options
        self._where = f"{job_file}: input.path {shown_path or path}" if frame is None else f"{job_file}: input"
        self._suffix = Path(path).suffix.lower()
        self._frame = self._scan()
        self._rows: int | None = None
        try:
            self.schema = self._frame.collect_schema()
        except Exception as e:  # polars raises many kinds for unreadable files
            problem = storage.explain(e) if self.remote else None
            raise JobError(f"{self._where}: cannot read the input: {problem or _first_line(e)}") from None
        if id_column is None and ROW_INDEX in self.schema:
            raise JobError(
                f"{job_file}: input.id_column: the input has a column named {ROW_INDEX}, "
                "which batchrun uses as the default id; set input.id_column"
            )
        if id_column is not None and id_column not in self.schema:
            source = "the frame" if frame is not None else path
            raise JobError(
                f"{job_file}: input.id_column: column '{id_column}' is not in {source}; "
                f"its columns are: {', '.join(self.columns)}"
            )

    @classmethod
    def for_job(cls, job: Job) -> InputTable:
        spec = job.spec.input
        return cls(
            job.input_path, spec.id_column, job.path, spec.path, job.frame, spec.storage_options, job.batch_input
        )

    @property
    def remote(self) -> bool:
        return self.given is None and storage.is_url(self.path)

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names())

    @property
    def id_name(self) -> str:
        return self.id_column or ROW_INDEX

    def _scan(self) -> pl.LazyFrame:
        path, suffix = self.path, self._suffix
        options = storage.storage_options(path, self.storage_options)
        if self.given is not None:
            return self.given.lazy()
        if self.remote:
            if suffix in (".csv", ".jsonl", ".ndjson") and storage.scheme(path) not in storage.STREAMED_SCHEMES:
                raise JobError(
                    f"{self._where}: CSV and JSONL on {storage.scheme(path)}:// are not supported yet; "
                    "use Parquet there, or s3:// or https://"
                )
        elif _is_glob(path):
            if suffix != ".parquet":
                raise JobError(f"{self._where}: a glob must name .parquet files")
            if not glob.glob(path):
                raise JobError(f"{self._where}: no file matches this pattern")
        elif not Path(path).is_file():
            raise JobError(f"{self._where}: file not found")
        if self.batch:
            return pl.LazyFrame(schema=openai_batch.SCHEMA)  # the columns only: lines are read by openai_batch
        # Ids are compared as written: a CSV's `007` and `7`, or `2.0` and `2`, are different ids.
        as_text = {self.id_column: pl.String()} if self.id_column else None
        if suffix == ".csv":
            return pl.scan_csv(path, infer_schema_length=10_000, schema_overrides=as_text, storage_options=options)
        if suffix == ".parquet":
            return pl.scan_parquet(path, storage_options=options)
        if suffix in (".jsonl", ".ndjson"):
            return pl.scan_ndjson(path, infer_schema_length=10_000, schema_overrides=as_text, storage_options=options)
        raise JobError(f"{self._where}: unsupported extension '{suffix}'; use .csv, .parquet or .jsonl")

    def count(self) -> int:
        if self._rows is None and self.batch:
            self._rows = openai_batch.count(self._lines())
        if self._rows is None:
            if self.remote and not self.splittable:  # polars would fetch a CSV or JSONL object whole to count it
                self._rows = sum(frame.height for frame in self._frames(self.columns[:1]))
            else:
                self._rows = int(self._collect(self._frame.select(pl.len())).item())
        return self._rows

    def check_ids(self) -> None:
        """The id column must be unique and non-null.

        Checked on 64-bit hashes of the ids, half a million at a time (a pass over the
        id column for each), so a 10-million-row input needs no more memory than a
        small one; a repeated hash is then confirmed on the ids themselves.
        """
        if self.id_column is None:
            return
        parts = max(1, math.ceil(self.count() / ID_PARTITION_ROWS))
        for part in range(parts):
            hashes = [h.filter(h % parts == part) for h in self._id_hashes()]
            merged = pl.concat(hashes) if hashes else pl.Series(dtype=pl.UInt64)
            del hashes
            merged.sort(in_place=True)  # a sort needs far less memory than is_duplicated's hash table
            if merged.len() and merged.rle_id()[-1] + 1 < merged.len():
                self._raise_if_duplicated(merged.filter(merged == merged.shift(1)).unique())

    def _id_hashes(self) -> Iterator[pl.Series]:
        nulls = 0
        column = self.id_name  # check_ids has made sure the job has an id column
        for frame in self._frames([column]):
            ids = frame.get_column(column)
            nulls += ids.null_count()
            yield ids.hash(seed=0)
        if nulls:
            raise JobError(f"{self._where}: id column '{self.id_column}' has {nulls} empty values")

    def _raise_if_duplicated(self, hashes: pl.Series) -> None:
        assert self.id_column is not None
        has_hash = pl.col(self.id_column).hash(seed=0).is_in(hashes.implode())
        candidates = pl.concat([frame.filter(has_hash) for frame in self._frames([self.id_column])])
        repeated = candidates.group_by(self.id_column).len().filter(pl.col("len") > 1).head(3)[self.id_column]
        if repeated.len():  # else different ids whose hashes collided: they are unique after all
            raise JobError(
                f"{self._where}: id column '{self.id_column}' is not unique "
                f"(repeated: {', '.join(map(str, repeated))}); pick a unique column or drop input.id_column"
            )

    def empty_values(self, columns: list[str]) -> tuple[int, dict[str, int]]:
        """Rows with an empty value (null, or empty text) in any of `columns`, and how many in each column."""
        if not columns:
            return 0, {}
        empty = {c: pl.col(c).is_null() | (pl.col(c) == "" if self.schema[c] == pl.String else False) for c in columns}
        rows, per_column = 0, dict.fromkeys(columns, 0)
        for frame in self._frames(columns):
            flags = frame.select(**empty)
            rows += int(flags.select(pl.any_horizontal(pl.all())).to_series().sum())
            for column, count in flags.sum().row(0, named=True).items():
                per_column[column] += int(count)
        return rows, {c: n for c, n in per_column.items() if n}

    def sample(self, rows: int, total: int) -> pl.DataFrame:
        """About `rows` rows spread evenly over an input of `total` rows (for estimates)."""
        every = max(1, -(-total // max(rows, 1)))  # ceil: the sample spans the whole input
        # Read in bounded pieces: polars' own gather_every held all of a 10 M-row input (900 MB).
        # The rows are copied out, as a slice of a frame would keep the whole frame's strings alive.
        picked: list[dict[str, Any]] = []
        offset = 0
        for frame in self._frames():
            picked += frame.gather_every(every, offset=-offset % every).iter_rows(named=True)
            offset += frame.height
        return pl.from_dicts(picked[:rows], schema=self.schema)

    @property
    def splittable(self) -> bool:
        """Whether any range of rows reads directly (Parquet, a frame); CSV and JSONL are read from their start."""
        return self._suffix == ".parquet" or self.given is not None

    def content_digest(self) -> str:
        """A digest of the rows themselves, read in bounded pieces: for inputs that are not local files
        (a frame, an object), so rerunning with the same rows finds its checkpoint and changed rows are seen."""
        digest = hashlib.sha256(repr(list(self.schema.items())).encode())
        for frame in self._frames():
            digest.update(frame.hash_rows(seed=0).to_numpy().tobytes())
        return digest.hexdigest()

    def batches(self, limit: int | None = None, batch_rows: int = BATCH_ROWS, start: int = 0) -> Iterator[pl.DataFrame]:
        """Input rows in order from row `start` (up to row `limit`), each batch with the row_index column first."""
        offset = start
        for frame in self._frames(start=start):
            if limit is not None:
                frame = frame.head(limit - offset)
            for start in range(0, frame.height, batch_rows):
                yield frame.slice(start, batch_rows).with_row_index(ROW_INDEX, offset=offset + start)
            offset += frame.height
            if limit is not None and offset >= limit:
                return

    def _frames(self, columns: list[str] | None = None, start: int = 0) -> Iterator[pl.DataFrame]:
        """The input in bounded pieces from row `start`, in order, typed as the scan's schema."""
        try:
            if self.batch:
                lines = openai_batch.frames(self._lines(), self._where, start)
                yield from (f if columns is None else f.select(columns) for f in lines)
            elif self.splittable:  # polars reads a Parquet slice without decoding its whole row group
                scan = self._frame if columns is None else self._frame.select(columns)
                step = REMOTE_PARQUET_READ_ROWS if self.remote else PARQUET_READ_ROWS
                for offset in range(start, self.count(), step):
                    yield scan.slice(offset, step).collect()
            elif self._suffix == ".csv":
                blocks = _record_blocks(self._open, self._where, csv=True)
                csv = (
                    pl.read_csv(io.BytesIO(header + block), schema=self.schema, columns=columns)
                    for header, block in blocks
                )
                yield from _from_row(csv, start)
            else:
                blocks = _record_blocks(self._open, self._where, csv=False)
                jsonl = (pl.read_ndjson(io.BytesIO(block), schema=self.schema) for _, block in blocks)
                yield from _from_row((f if columns is None else f.select(columns) for f in jsonl), start)
        except (pl.exceptions.PolarsError, OSError, ValueError) as e:
            problem = storage.explain(e) if self.remote else None
            raise JobError(f"{self._where}: cannot read the input: {problem or _first_line(e)}") from None

    def _lines(self) -> Iterator[bytes]:
        """Blocks of whole JSONL lines (an OpenAI Batch file)."""
        return (block for _, block in _record_blocks(self._open, self._where, csv=False))

    def _open(self) -> AbstractContextManager[IO[bytes]]:
        """The input's bytes, front to back (CSV and JSONL)."""
        return storage.open_stream(self.path, self.storage_options) if self.remote else open(self.path, "rb")

    def _collect(self, frame: pl.LazyFrame) -> pl.DataFrame:
        try:
            return frame.collect(engine="streaming")
        except pl.exceptions.PolarsError as e:
            raise JobError(f"{self._where}: cannot read the input: {_first_line(e)}") from None


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _from_row(frames: Iterator[pl.DataFrame], start: int) -> Iterator[pl.DataFrame]:
    """The pieces from row `start` on (the rows before it are read and dropped)."""
    for frame in frames:
        if start >= frame.height:
            start -= frame.height
            continue
        yield frame.slice(start) if start else frame
        start = 0


def _record_blocks(
    opener: Callable[[], AbstractContextManager[IO[bytes]]], where: str, csv: bool
) -> Iterator[tuple[bytes, bytes]]:
    """(header line, block of whole records) of about BLOCK_BYTES each: CSV or JSONL.

    A record is held whole until it ends, so one longer than MAX_LINE_BYTES is refused as it grows (a JobError
    naming its first line), never read to its end.
    """
    with opener() as f:
        header = _first_record_line(f, where) if csv else b""
        lines = 1 if csv else 0  # lines before `rest`
        rest = b""
        while block := f.read(BLOCK_BYTES):
            data = rest + block
            end = _last_record_end(data, csv)
            held_ends = data.find(b"\n", len(rest)) if rest and end else -1  # where the record held so far ends
            if held_ends > MAX_LINE_BYTES:
                raise line_too_long(where, lines + 1)
            lines += data.count(b"\n", 0, end)
            rest = data[end:]
            if len(rest) > MAX_LINE_BYTES:
                raise line_too_long(where, lines + 1)
            if end:
                yield header, data[:end]
        if rest.strip():
            yield header, rest


def _first_record_line(f: IO[bytes], where: str) -> bytes:
    """The first line, read without `readline`, which pyarrow's streams do not have."""
    line = bytearray()
    while (byte := f.read(1)) and byte != b"\n":
        line += byte
        if len(line) > MAX_LINE_BYTES:
            raise line_too_long(where, 1)
    return bytes(line + byte)


def _last_record_end(data: bytes, csv: bool) -> int:
    """Just past the last newline that ends a record (0: none). `data` starts at a record.

    In CSV a newline inside a quoted field is data: a newline ends a record only
    after an even number of quote characters (an escaped quote is two of them).
    JSONL strings cannot hold a raw newline, so every newline ends a record.
    """
    end = data.rfind(b"\n")
    while csv and end >= 0 and data.count(b'"', 0, end) % 2:
        end = data.rfind(b"\n", 0, end)
    return end + 1


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__

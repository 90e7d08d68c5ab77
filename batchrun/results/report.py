"""`batchrun report`: the checkpoint read once, in pieces, into the figures of one HTML page.

Every finished row passes through `Tally` a chunk at a time (through `output.result_frame`,
so statuses, parsed columns and cost are the output's own), and leaves behind only fixed-size
aggregates: counts, time bins, histograms, a few sample rows. Memory and page size do not grow
with the number of rows; the time it takes does, linearly. The page itself is results/report_page.py.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import jinja2
import polars as pl

from batchrun.base.errors import JobError
from batchrun.flow import spend
from batchrun.job.inputs import ROW_INDEX, InputTable
from batchrun.job.render import Renderer
from batchrun.job.spec import Job
from batchrun.job.structured import PARSE_NOTE, AnswerParser
from batchrun.ledger.checkpoint import ROW_COLUMNS, Checkpoint
from batchrun.pipeline import images
from batchrun.pipeline.timeline import last_run, parse_attempt_log
from batchrun.protocols import protocol_for
from batchrun.results import output

CHUNK_ROWS = 20_000
TIME_BINS = 120
TOKEN_BINS = 30
LATENCY_STEP = 1.05  # latency histogram bins are 5 % wide: percentiles within 5 %
LATENCY_FLOOR_S = 0.001
OK_SAMPLES = 8
GALLERY_ROWS = 48
CAPTION_ROWS = 24
COL = {name: i for i, name in enumerate(ROW_COLUMNS)}


@dataclass
class TimeBins:
    """Counts per interval of one shared time axis from `t0` to `t1`."""

    t0: float
    t1: float
    ok: list[int] = field(default_factory=lambda: [0] * TIME_BINS)
    error: list[int] = field(default_factory=lambda: [0] * TIME_BINS)
    rate_limited: list[int] = field(default_factory=lambda: [0] * TIME_BINS)  # attempts answered 429
    other_errors: list[int] = field(default_factory=lambda: [0] * TIME_BINS)  # other failed attempts
    cost: list[float] = field(default_factory=lambda: [0.0] * TIME_BINS)
    limit: list[int | None] = field(default_factory=lambda: [None] * TIME_BINS)  # lowest in-flight limit
    paused_s: list[float] = field(default_factory=lambda: [0.0] * TIME_BINS)
    answered: list[int] = field(default_factory=lambda: [0] * TIME_BINS)  # attempts answered (any outcome)
    rate_sum: list[float] = field(default_factory=lambda: [0.0] * TIME_BINS)  # paced rate, summed over seconds
    rate_seconds: list[int] = field(default_factory=lambda: [0] * TIME_BINS)  # seconds with a paced rate

    def paced_rate(self, i: int) -> float | None:
        """Interval i's mean paced rate (requests/s) over its seconds that were paced; None when none was."""
        return self.rate_sum[i] / self.rate_seconds[i] if self.rate_seconds[i] else None

    @property
    def width_s(self) -> float:
        return max(self.t1 - self.t0, 1.0) / TIME_BINS

    def index(self, t: float) -> int:
        return min(TIME_BINS - 1, max(0, int((t - self.t0) / self.width_s)))


@dataclass
class CacheShare:
    """Input tokens of rows sent, and the part the provider read from its prompt cache, per time bin
    (TimeBins' axis); `saved`: what the cached ones cost less than input (with pricing)."""

    prompt: list[int] = field(default_factory=lambda: [0] * TIME_BINS)
    cached: list[int] = field(default_factory=lambda: [0] * TIME_BINS)
    saved: float | None = None

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached)


@dataclass
class Histogram:
    """Counts per bin; `edges[i]` is bin i's lower edge."""

    edges: list[float]
    counts: list[int]


@dataclass
class Sample:
    idx: int
    row_id: str
    status: str
    error_class: str | None
    error: str | None
    answer: str | None
    parsed: dict[str, Any]
    images: list[str]
    inputs: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    input_images: list[tuple[str, bytes | None]] = field(default_factory=list)  # (ref or problem, image bytes)


@dataclass
class Report:
    job: Job
    rows: int | None  # input rows; None when the input cannot be read
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    estimate: list[str] = field(default_factory=list)
    last_run: dict[str, Any] = field(default_factory=dict)
    exit_state: str = "unknown"
    span_s: float | None = None
    in_flight_at_stop: int = 0
    time: TimeBins | None = None
    latency_ok: Counter[int] = field(default_factory=Counter)  # log-bin number -> rows
    latency_error: Counter[int] = field(default_factory=Counter)
    prompt_hist: Histogram | None = None
    completion_hist: Histogram | None = None
    samples: list[Sample] = field(default_factory=list)
    gallery: list[Sample] = field(default_factory=list)
    captions: list[Sample] = field(default_factory=list)
    parsed_columns: list[str] = field(default_factory=list)
    input_note: str | None = None
    learned_limits: list[dict[str, Any]] = field(default_factory=list)  # output.learned_limits
    cache: CacheShare = field(default_factory=CacheShare)

    @property
    def error(self) -> int:
        return sum(self.errors.values())


def collect(job: Job, checkpoint: Checkpoint) -> Report:
    table, renderer, rows = _input(job)
    report = Report(job, rows)
    if table is None:
        report.input_note = "the input cannot be read now: sample rows show no input columns"
    _run_state(report, checkpoint)
    report.learned_limits = output.learned_limits(checkpoint)
    parser = AnswerParser.for_spec(job.spec, protocol_for(job.spec.provider.api))
    report.parsed_columns = list(parser.columns) if parser is not None else []
    tally = Tally(report, checkpoint, parser)
    tally.run()
    if table is not None and renderer is not None:
        _attach_inputs(report, table, renderer)
        if job.spec.pricing is not None:
            report.estimate = spend.describe_estimate(spend.estimate_job(job, table, renderer), job)
    return report


def _input(job: Job) -> tuple[InputTable | None, Renderer | None, int | None]:
    try:
        table = InputTable.for_job(job)
        return table, Renderer(job, table.columns), table.count()
    except JobError:
        return None, None, None


def _run_state(report: Report, checkpoint: Checkpoint) -> None:
    last = report.last_run = last_run(checkpoint)
    report.in_flight_at_stop = checkpoint.count_interrupted()
    state = last.get("state")
    if state is None:
        report.exit_state = "unknown (the checkpoint predates run records)"
    elif state == "running":
        report.exit_state = "running now" if checkpoint.run_in_progress() else "interrupted (the run was killed)"
    else:
        report.exit_state = state


class Tally:
    """One pass over the checkpoint's rows, CHUNK_ROWS at a time."""

    def __init__(self, report: Report, checkpoint: Checkpoint, parser: AnswerParser | None) -> None:
        self.report = report
        self.checkpoint = checkpoint
        self.parser = parser
        self.pricing = report.job.spec.pricing
        self._ok_pool: list[tuple[int, Sample]] = []  # (hash, sample): the OK_SAMPLES smallest hashes
        self._first_error: dict[str, Sample] = {}
        self._with_image_input = bool(report.job.spec.prompt.images)

    def run(self) -> None:
        last_idx, t0, t1, max_in, max_out = self.checkpoint.report_bounds()
        if last_idx is None:
            return
        report = self.report
        report.span_s = t1 - t0
        report.time = TimeBins(t0, t1)
        report.prompt_hist = _linear_bins(max_in or 0)
        report.completion_hist = _linear_bins(max_out or 0)
        if self.pricing is not None:
            report.cost = 0.0
            report.cache.saved = 0.0
        for lo in range(0, last_idx + 1, CHUNK_ROWS):
            rows = self.checkpoint.rows_in_range(lo, lo + CHUNK_ROWS)
            if rows:
                self._chunk(rows)
        self._limiter()
        report.samples = list(self._first_error.values()) + [s for _, s in sorted(self._ok_pool)]

    def _chunk(self, rows: list[tuple[Any, ...]]) -> None:
        report, bins = self.report, self.report.time
        assert bins is not None
        frame = output.result_frame(rows, self.parser, self.pricing, repairs=True)
        frame = frame.with_columns(
            pl.Series("finished_at", [r[COL["finished_at"]] for r in rows], pl.Float64),
            pl.Series("row_id", [r[COL["row_id"]] for r in rows], pl.String),
        )
        totals = frame.select(
            (pl.col("status") == "ok").sum().alias("ok"),
            pl.col("attempts").sum(),
            pl.col("prompt_tokens").sum(),
            pl.col("completion_tokens").sum(),
            *([pl.col("cost").sum()] if self.pricing is not None else []),
        ).row(0, named=True)
        report.ok += totals["ok"]
        report.attempts += totals["attempts"] or 0
        report.prompt_tokens += totals["prompt_tokens"] or 0
        report.completion_tokens += totals["completion_tokens"] or 0
        if report.cost is not None:
            report.cost += totals["cost"] or 0.0
        errors = frame.filter(pl.col("status") == "error")["error_class"].fill_null("unknown")
        for error_class, n in errors.value_counts().iter_rows():
            report.errors[error_class] += n
        self._time_bins(frame, bins)
        self._cache_share(frame, bins)
        for r in rows:
            started, log = r[COL["started_at"]], r[COL["attempt_log"]]
            if log is None:
                continue
            if " " not in log and log.endswith(":ok"):  # the common case: one attempt, answered
                bins.answered[bins.index(started + float(log.partition(":")[0]))] += 1
                continue
            for offset, outcome, status in parse_attempt_log(log):
                i = bins.index(started + offset)
                bins.answered[i] += 1
                if outcome == "ok":
                    continue
                if status == 429:
                    bins.rate_limited[i] += 1
                else:
                    bins.other_errors[i] += 1
        self._latency(frame)
        _histogram_add(report.prompt_hist, frame["prompt_tokens"])
        _histogram_add(report.completion_hist, frame["completion_tokens"])
        self._pick(frame)

    def _time_bins(self, frame: pl.DataFrame, bins: TimeBins) -> None:
        index = ((pl.col("finished_at") - bins.t0) / bins.width_s).floor().clip(0, TIME_BINS - 1).cast(pl.Int64)
        cost = pl.col("cost").sum() if self.pricing is not None else pl.lit(0.0)
        per_bin = frame.group_by(index.alias("bin")).agg(
            (pl.col("status") == "ok").sum().alias("ok"),
            (pl.col("status") == "error").sum().alias("error"),
            cost.alias("cost"),
        )
        for i, ok, error, spent in per_bin.iter_rows():
            bins.ok[i] += ok
            bins.error[i] += error
            bins.cost[i] += spent or 0.0

    def _cache_share(self, frame: pl.DataFrame, bins: TimeBins) -> None:
        """Input and cached tokens per time bin, of rows that were sent (a shared answer paid nothing)."""
        cache = self.report.cache
        index = ((pl.col("finished_at") - bins.t0) / bins.width_s).floor().clip(0, TIME_BINS - 1).cast(pl.Int64)
        sent = frame.filter(pl.col("shared_from").is_null())
        per_bin = sent.group_by(index.alias("bin")).agg(pl.col("prompt_tokens").sum(), pl.col("cached_tokens").sum())
        for i, prompt, cached in per_bin.iter_rows():
            cache.prompt[i] += prompt or 0
            cache.cached[i] += cached or 0
            if self.pricing is not None and cache.saved is not None:
                cache.saved += (cached or 0) * (self.pricing.input_per_million - self.pricing.cached_price) / 1e6

    def _latency(self, frame: pl.DataFrame) -> None:
        step = math.log(LATENCY_STEP)
        bin_no = (pl.col("latency_s").clip(LATENCY_FLOOR_S).log() / step).floor().cast(pl.Int64)
        sent = frame.filter(pl.col("latency_s").is_not_null() & (pl.col("attempts") > 0))
        counts = sent.group_by(pl.col("status"), bin_no.alias("bin")).len()
        for status, b, n in counts.iter_rows():
            (self.report.latency_ok if status == "ok" else self.report.latency_error)[b] += n

    def _pick(self, frame: pl.DataFrame) -> None:
        """Sample rows: the first error of each class, the ok rows of smallest hash; image rows for the gallery."""
        report = self.report
        errors = frame.filter((pl.col("status") == "error") & pl.col("error_class").is_not_null())
        for row in errors.unique("error_class", keep="first", maintain_order=True).iter_rows(named=True):
            if row["error_class"] not in self._first_error:
                self._first_error[row["error_class"]] = self._sample(row)
        ok = frame.filter(pl.col("status") == "ok").with_columns(
            pl.col(ROW_INDEX).cast(pl.UInt64).hash(seed=17).alias("_h")
        )
        for row in ok.sort("_h").head(OK_SAMPLES).iter_rows(named=True):
            self._ok_pool.append((row["_h"], self._sample(row)))
        self._ok_pool = sorted(self._ok_pool, key=lambda p: p[0])[:OK_SAMPLES]
        if len(report.gallery) < GALLERY_ROWS:
            pictured = ok.filter(pl.col("image_paths").list.len() > 0).head(GALLERY_ROWS - len(report.gallery))
            report.gallery += [self._sample(row) for row in pictured.iter_rows(named=True)]
        if self._with_image_input and len(report.captions) < CAPTION_ROWS:
            captioned = ok.head(CAPTION_ROWS - len(report.captions))
            report.captions += [self._sample(row) for row in captioned.iter_rows(named=True)]

    def _sample(self, row: dict[str, Any]) -> Sample:
        return Sample(
            idx=row[ROW_INDEX],
            row_id=row["row_id"],
            status=row["status"],
            error_class=row["error_class"],
            error=row["error"],
            answer=row["response_text"],
            parsed={c: row.get(c) for c in self.report.parsed_columns if c in row} | _note(row),
            images=row["image_paths"] or [],
        )

    def _limiter(self) -> None:
        bins = self.report.time
        assert bins is not None
        for second, limit_min, paused_s, rate in self.checkpoint.limiter_seconds():
            i = bins.index(second)
            shown = bins.limit[i]
            bins.limit[i] = limit_min if shown is None else min(shown, limit_min)
            bins.paused_s[i] += paused_s
            if rate is not None:
                bins.rate_sum[i] += rate
                bins.rate_seconds[i] += 1


def _note(row: dict[str, Any]) -> dict[str, Any]:
    return {PARSE_NOTE: row[PARSE_NOTE]} if row.get(PARSE_NOTE) else {}


def _linear_bins(top: int) -> Histogram:
    width = max(1, math.ceil((top + 1) / TOKEN_BINS))
    return Histogram([i * width for i in range(TOKEN_BINS)], [0] * TOKEN_BINS)


def _histogram_add(hist: Histogram | None, values: pl.Series) -> None:
    if hist is None:
        return
    width = hist.edges[1] - hist.edges[0]
    counts = (values.drop_nulls() // width).clip(0, TOKEN_BINS - 1).value_counts()
    for b, n in counts.iter_rows():
        hist.counts[int(b)] += n


def percentile(counts: Counter[int], q: float) -> float | None:
    """The q-quantile of a latency histogram: the middle of the bin it falls in."""
    total = sum(counts.values())
    if not total:
        return None
    seen = 0
    for b in sorted(counts):
        seen += counts[b]
        if seen >= q * total:
            return max(LATENCY_FLOOR_S, LATENCY_STEP ** (b + 0.5))
    return None


# --- input rows of the samples, and the images --------------------------------------


def _attach_inputs(report: Report, table: InputTable, renderer: Renderer) -> None:
    """The input columns, prompt and input images of the few rows the page shows, in one pass over the input."""
    wanted: dict[int, list[Sample]] = {}
    for sample in report.samples + report.gallery + report.captions:
        wanted.setdefault(sample.idx, []).append(sample)
    if not wanted:
        return
    last = max(wanted)
    for batch in table.batches(last + 1):
        picked = batch.filter(pl.col(ROW_INDEX).is_in(list(wanted)))
        for row in picked.iter_rows(named=True):
            for sample in wanted[row[ROW_INDEX]]:
                sample.inputs = {k: v for k, v in row.items() if k != ROW_INDEX}
                try:
                    sample.prompt = renderer.render(row).user
                except jinja2.TemplateError as e:
                    sample.prompt = f"(the prompt does not render: {e})"
    if report.captions:
        _load_input_images(report, renderer)


def _load_input_images(report: Report, renderer: Renderer) -> None:
    job = report.job
    loader = images.loader_for(job, inline_urls=False)  # never downloads: the page shows URLs as text

    async def load_all() -> None:
        for sample in report.captions:
            try:
                refs = renderer.render(dict(sample.inputs)).images
            except jinja2.TemplateError:
                continue
            for ref in refs:
                try:
                    (loaded,) = await loader.load((ref,))
                except images.ImageError as e:
                    sample.input_images.append((str(e), None))
                    continue
                sample.input_images.append((ref if loaded.url is None else loaded.url, loaded.data or None))
        await loader.aclose()

    anyio.run(load_all)
    report.captions = [s for s in report.captions if s.input_images]  # rows that sent no image

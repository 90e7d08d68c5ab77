"""`batchrun bench`: batchrun's own throughput and memory, measured against the emulator.

Each scenario starts the emulator in its own process, then measures in this
process, on the same synthetic rows and concurrency:

* the bare loop: `concurrency` tasks posting the pipeline's own request bodies,
  pre-encoded, through aiohttp's client, each answer decoded as the pipeline
  decodes it (the ceiling of a client built on aiohttp; batchrun's own HTTP
  client, pipeline/http.py, is the pipeline's and is not in it);
* the pipeline: a generated job file through `Run` (input batches, render,
  limiter, protocol, checkpoint, Parquet), quiet. Its requests/s counts the whole
  run, start-up and the Parquet write included.

Memory runs `batchrun run` as a child process and reads its peak RSS from the
kernel, on a job that is 90 % done: every input row is read, checked
against the checkpoint and written to the output; the rest are requested.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import polars as pl
import pyarrow.parquet as pq
import yaml

from batchrun.app.checks import load_job
from batchrun.base import eventloop
from batchrun.engines.runner import RunOptions, run_job
from batchrun.job.inputs import InputTable
from batchrun.job.render import Renderer
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import Job
from batchrun.ledger.checkpoint import Checkpoint, RowRecord, checkpoint_folder
from batchrun.pipeline.fingerprint import Fingerprint
from batchrun.pipeline.transport import Transport, read_answer
from batchrun.protocols import Decoder, openai_chat

KEY_ENV = "BATCHRUN_BENCH_KEY"
KEY = "sk-bench-not-a-secret"
CHAT_PATH = "/v1/chat/completions"  # openai_chat.path, for any settings
STREAM_PIECES = 17
PHRASES = [
    "I love this kettle, it works perfectly and the lid is sturdy.",
    "The handle broke after a week, terrible value and very noisy.",
    "It arrived on Tuesday in a plain box with a manual.",
    "Excellent grinder, great value, fast delivery, would recommend.",
    "Leaks everywhere, a waste of money, returned it for a refund.",
]
MEMORY_BASE_ROWS = 10_000
MEMORY_DONE_FRACTION = 0.9
WRITE_CHUNK = 1_000_000
ROW_GROUP_ROWS = 512**2  # polars' default; reading holds one row group, so memory follows this, not the row count


@dataclass
class Sizes:
    rows: int
    concurrencies: tuple[int, ...]  # zero latency, one scenario each
    latency_rows: int
    latency_concurrency: int
    stream_rows: int
    stack_rows: int
    repeat: int


FULL = Sizes(
    rows=20_000,
    concurrencies=(64, 256),
    latency_rows=25_000,
    latency_concurrency=1000,
    stream_rows=20_000,
    stack_rows=10_000,
    repeat=3,
)
QUICK = Sizes(
    rows=3_000,
    concurrencies=(64, 256),
    latency_rows=3_000,
    latency_concurrency=1000,
    stream_rows=1_500,
    stack_rows=300,
    repeat=2,
)
LATENCY_MS = 200.0
# The targets (docs/performance.md): requests/s against the bare loop at least, CPU a request at most.
ZERO_LATENCY_TARGET = 0.85
LATENCY_TARGET = 0.9  # 200 ms x 1,000, against min(ideal, bare loop)
STREAMING_TARGET = 0.9
CPU_TARGET = 1.5
MEMORY_TARGET = 1.2  # peak RSS of the largest job at most this many times the 10,000-row one's


@dataclass
class Rate:
    """Requests per second (wall clock), and this process's CPU time per request, all threads."""

    rps: float
    cpu_us: float

    @classmethod
    def timed(cls, requests: int, measure: Callable[[], object]) -> Rate:
        wall, cpu = time.perf_counter(), time.process_time()
        measure()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return cls(round(requests / wall, 1), round(cpu / requests * 1e6, 1))


@dataclass
class Scenario:
    name: str
    concurrency: int
    latency_ms: float
    rows: int
    compared_with: str
    reference: Rate | None = None
    pipeline: Rate | None = None
    ratio: float | None = None  # pipeline / reference, requests/s
    cpu_times: float | None = None  # pipeline / reference, CPU per request: steadier on a busy machine
    target: float | None = None  # the ratio wanted, at least
    cpu_target: float | None = None  # cpu_times wanted, at most
    met: bool | None = None  # every target of the scenario met
    note: str = ""

    def settle(self) -> None:
        """The ratios, and whether the targets are met."""
        if self.reference is None or self.pipeline is None:
            return
        self.ratio = round(self.pipeline.rps / self.reference.rps, 3)
        self.cpu_times = round(self.pipeline.cpu_us / self.reference.cpu_us, 3)
        checks = []
        if self.target is not None:
            checks.append(self.ratio >= self.target)
        if self.cpu_target is not None:
            checks.append(self.cpu_times <= self.cpu_target)
        self.met = all(checks) if checks else None


@dataclass
class Report:
    quick: bool
    machine: dict[str, Any]
    scenarios: list[Scenario] = field(default_factory=list)
    stacks: list[dict[str, Any]] = field(default_factory=list)
    emulator_rps_at_least: float | None = None
    memory: list[dict[str, Any]] = field(default_factory=list)


# --- the workload ---------------------------------------------------------------------


def write_input(path: Path, rows: int) -> Path:
    """`rows` reviews (review_id, text), written in chunks so 10 M rows need little memory here."""
    phrases = pl.Series(PHRASES)
    writer: pq.ParquetWriter | None = None
    try:
        for lo in range(0, max(rows, 1), WRITE_CHUNK):
            i = pl.int_range(lo, min(rows, lo + WRITE_CHUNK), eager=True)
            chunk = pl.DataFrame(
                {
                    "review_id": ("r" + i.cast(pl.String).str.zfill(9)),
                    "text": phrases.gather(i % len(PHRASES)) + " Order " + i.cast(pl.String) + ".",
                }
            ).to_arrow()
            writer = writer or pq.ParquetWriter(path, chunk.schema, compression="zstd")
            writer.write_table(chunk, row_group_size=ROW_GROUP_ROWS)
    finally:
        if writer is not None:
            writer.close()
    return path


def write_job(
    folder: Path, input_path: Path, base_url: str, concurrency: int, stream: bool = False, attempts: int = 3
) -> Job:
    job = {
        "name": "bench",
        "input": {"path": str(input_path), "id_column": "review_id"},
        "provider": {"api": "openai-chat", "base_url": base_url, "api_key_env": KEY_ENV},
        "model": "gpt-5.4",
        "prompt": {
            "system": "You summarise product reviews.",
            "user": "Review: {{ text }}\nSummarise it in a few words.",
        },
        "params": {"max_completion_tokens": 40},
        "stream": stream,
        "output": {"path": "out/bench.parquet"},
        "run": {"concurrency": concurrency, "max_attempts": attempts, "timeout_s": 120},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    os.environ.setdefault(KEY_ENV, KEY)
    return load_job(path)


def request_bodies(job: Job) -> list[bytes]:
    """The pipeline's own request bodies, rendered and encoded once, for the bare loop."""
    table = InputTable.for_job(job)
    renderer = Renderer(job, table.columns)
    return [
        orjson.dumps(openai_chat.build(renderer.render(row), RequestSettings.of(job.spec, openai_chat)))
        for batch in table.batches()
        for row in batch.iter_rows(named=True)
    ]


@contextmanager
def emulator_process(latency_ms: float = 0.0, extra: list[str] | None = None) -> Iterator[str]:
    """The emulator in its own process, on a free port, with `extra` options; yields its URL.

    Streamed answers come in STREAM_PIECES content events (about 20 events with the
    role, finish, usage and [DONE]); no keepalive pings.
    """
    args = ["--port", "0", "--latency-ms", str(latency_ms), "--stream-pieces", str(STREAM_PIECES), "--ping-ms", "0"]
    args += extra or []
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "emulator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    try:
        if "listening on" not in line:
            raise RuntimeError(f"the emulator did not start: {line!r}")
        yield line.split("listening on ", 1)[1].strip()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- what is measured -------------------------------------------------------------------


async def _aiohttp_loop(job: Job, bodies: list[bytes], decoder: Decoder) -> Rate:
    """The job's requests posted by aiohttp's client, each answer decoded as the pipeline decodes it."""
    import aiohttp

    concurrency = job.spec.run.concurrency
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=concurrency))
    url = job.spec.provider.base_url + CHAT_PATH
    queue = iter(bodies)

    async def worker() -> None:
        for body in queue:
            async with session.post(url, data=body) as response:
                await read_answer(response.content.iter_any(), decoder)

    async def all_workers() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)

    wall, cpu = time.perf_counter(), time.process_time()
    try:
        await all_workers()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return Rate(round(len(bodies) / wall, 1), round(cpu / len(bodies) * 1e6, 1))
    finally:
        await session.close()


def bare_loop(job: Job, bodies: list[bytes]) -> Rate:
    """The bare aiohttp loop over the job's requests, on the event loop the CLI uses."""
    spec = job.spec
    return eventloop.run(_aiohttp_loop, job, bodies, openai_chat.decoder(RequestSettings.of(spec, openai_chat)))


def pipeline(job: Job, rows: int, durable_checkpoint: bool = True) -> Rate:
    """A whole `batchrun run` of the job, in this process, from scratch."""
    shutil.rmtree(checkpoint_folder(job.output_path), ignore_errors=True)  # from scratch, without --restart's note
    options = RunOptions(quiet=True, durable_checkpoint=durable_checkpoint)
    summary: dict[str, Any] = {}
    rate = Rate.timed(rows, lambda: summary.update(eventloop.run(run_job, job, options)))
    if summary["ok"] != rows:
        raise RuntimeError(f"bench: only {summary['ok']} of {rows} rows succeeded; the figures would be wrong")
    return rate


# --- HTTP stacks, bare -------------------------------------------------------------------


async def _stack_loop(stack: str, base_url: str, bodies: list[bytes], concurrency: int) -> float:
    import aiohttp
    import httpx

    url = base_url + CHAT_PATH
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if stack == "batchrun":  # pipeline/http.py, through the transport every engine builds
        transport = Transport(base_url, {"authorization": f"Bearer {KEY}"}, 120, concurrency)
        decoder = openai_chat.decoder(RequestSettings("gpt-5.4", "openai-chat", {}, False, None, None))

        async def post(body: bytes) -> Any:
            return await transport.attempt(CHAT_PATH, body, decoder)

        close: Callable[[], Awaitable[None]] = transport.aclose
    elif stack == "aiohttp":
        session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=concurrency))

        async def post(body: bytes) -> Any:
            async with session.post(url, data=body) as r:
                return orjson.loads(await r.read())

        close = session.close
    else:
        transport = None
        if stack == "httpx-aiohttp":
            import httpx_aiohttp

            transport = httpx_aiohttp.AiohttpTransport(
                client=lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
            )
        client = httpx.AsyncClient(headers=headers, limits=limits, timeout=120, transport=transport)

        async def post(body: bytes) -> Any:
            return orjson.loads((await client.post(url, content=body)).content)

        close = client.aclose
    queue = iter(bodies)

    async def worker() -> None:
        for body in queue:
            await post(body)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rps = len(bodies) / (time.perf_counter() - started)
    await close()
    return rps


def http_stacks(base_url: str, bodies: list[bytes], concurrency: int) -> list[dict[str, Any]]:
    """The bare loop over each installed HTTP client, on asyncio and on uvloop."""
    stacks = ["httpx", "aiohttp", *(["httpx-aiohttp"] if importlib.util.find_spec("httpx_aiohttp") else []), "batchrun"]
    loops = ["asyncio"] + (["uvloop"] if eventloop.has_uvloop() else [])
    results = []
    for stack in stacks:
        row: dict[str, Any] = {"stack": stack}
        for loop in loops:
            row[loop] = round(eventloop.run(_stack_loop, stack, base_url, bodies, concurrency, uvloop=loop == "uvloop"))
        results.append(row)
    return results


# --- memory --------------------------------------------------------------------------------


def prefill(job: Job, done: int) -> None:
    """Mark the first `done` rows finished, through the checkpoint's own API, as an earlier run would."""
    checkpoint = Checkpoint(checkpoint_folder(job.output_path))
    now = time.time()
    try:
        Fingerprint.of(job, InputTable.for_job(job), None).save(checkpoint)
        for lo in range(0, done, 100_000):
            for idx in range(lo, min(done, lo + 100_000)):
                checkpoint.finish(
                    RowRecord(
                        idx, f"r{idx:09d}", "ok", "neutral", None, "stop", "gpt-5.4", 30, 1, 0.01, 1, None, None, now
                    )
                )
            checkpoint.flush_now()
    finally:
        checkpoint.close()


# The kernel's peak RSS of a child counts the image it was forked from, before exec:
# a small launcher process forks the CLI, so the figure is the CLI's own.
_LAUNCHER = (
    "import os, resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL).returncode\n"
    "with open(sys.argv[1], 'w') as f: f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def peak_rss_mb(args: list[str], folder: Path) -> float:
    """Peak resident memory of `python -m batchrun ARGS` as a child process, from the kernel."""
    report = folder / "peak-rss-kib"
    result = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, str(report), sys.executable, "-m", "batchrun", *args],
        env={**os.environ, KEY_ENV: KEY},
        stderr=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"batchrun {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return int(report.read_text()) / 1024  # Linux reports KiB


def resume_peak_rss_mb(folder: Path, rows: int, pending: int, base_url: str) -> float:
    """Peak RSS of resuming a `rows`-row job with all but `pending` rows already done."""
    folder.mkdir(parents=True, exist_ok=True)
    job = write_job(folder, write_input(folder / "input.parquet", rows), base_url, concurrency=64)
    prefill(job, rows - pending)
    peak = peak_rss_mb(["run", str(job.path), "--quiet"], folder)
    if pq.ParquetFile(job.output_path).metadata.num_rows != rows:
        raise RuntimeError(f"bench: the output of the {rows}-row job does not have {rows} rows")
    return peak


def memory(sizes: list[int], base_url: str, workdir: Path) -> list[dict[str, Any]]:
    results = []
    for rows in [MEMORY_BASE_ROWS, *sizes]:
        pending = round(rows * (1 - MEMORY_DONE_FRACTION))
        started = time.perf_counter()
        peak = resume_peak_rss_mb(workdir / f"memory-{rows}", rows, pending, base_url)
        results.append(
            {
                "rows": rows,
                "requested": pending,
                "peak_rss_mb": round(peak, 1),
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
    base = results[0]["peak_rss_mb"]
    for r in results:
        r["ratio"] = round(r["peak_rss_mb"] / base, 2)
    return results


# --- the whole bench ------------------------------------------------------------------------


def run_bench(quick: bool, memory_rows: list[int]) -> Report:
    sizes = QUICK if quick else FULL
    report = Report(quick=quick, machine=machine())
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-") as tmp:
        workdir = Path(tmp)
        with emulator_process() as url:
            zero, workloads = [], []
            for concurrency in sizes.concurrencies:
                job, bodies = _workload(workdir / f"zero-{concurrency}", url, sizes.rows, concurrency)
                zero.append(
                    _compare(f"zero latency, {concurrency}", job, bodies, sizes, ZERO_LATENCY_TARGET, CPU_TARGET)
                )
                workloads.append((job, bodies))
            job, bodies = workloads[0]
            report.stacks = http_stacks(url, bodies[: sizes.stack_rows], job.spec.run.concurrency)
            report.emulator_rps_at_least = max(v for s in report.stacks for k, v in s.items() if k != "stack")
            off = _checkpoint_off(job, sizes)
            job, bodies = _workload(workdir / "stream", url, sizes.stream_rows, sizes.concurrencies[0], stream=True)
            streaming = _compare("streaming", job, bodies, sizes, STREAMING_TARGET, what="bare stream loop")
            streaming.note = f"{STREAM_PIECES + 4} events an answer"
            if memory_rows:
                report.memory = memory(memory_rows, url, workdir)
        report.scenarios += [*zero, _latency_scenario(workdir / "latency", sizes), streaming, off]
    for s in report.scenarios:
        s.settle()
    return report


def _workload(folder: Path, url: str, rows: int, concurrency: int, stream: bool = False) -> tuple[Job, list[bytes]]:
    folder.mkdir(parents=True)
    job = write_job(folder, write_input(folder / "input.parquet", rows), url, concurrency, stream)
    return job, request_bodies(job)


def _compare(
    name: str,
    job: Job,
    bodies: list[bytes],
    sizes: Sizes,
    target: float,
    cpu_target: float | None = None,
    what: str = "bare loop",
) -> Scenario:
    """The bare loop and the pipeline on the same requests, taking turns (a busy machine slows both alike)."""
    scenario = Scenario(name, job.spec.run.concurrency, 0, len(bodies), what, target=target, cpu_target=cpu_target)
    bare, piped = [], []
    for _ in range(sizes.repeat):
        bare.append(bare_loop(job, bodies))
        piped.append(pipeline(job, len(bodies)))
    scenario.reference, scenario.pipeline = best(bare), best(piped)
    return scenario


def best(rates: list[Rate]) -> Rate:
    """The fastest run and the least CPU per request (other processes only ever slow a run down)."""
    return Rate(max(r.rps for r in rates), min(r.cpu_us for r in rates))


def _checkpoint_off(job: Job, sizes: Sizes) -> Scenario:
    """The pipeline, and the pipeline with its checkpoint in memory (no request waits for a commit), taking turns."""
    off = Scenario("checkpoint on vs off", job.spec.run.concurrency, 0, sizes.rows, "pipeline, checkpoint off")
    off.target = 0.95
    on, memory_only = [], []
    for _ in range(sizes.repeat):
        memory_only.append(pipeline(job, sizes.rows, durable_checkpoint=False))
        on.append(pipeline(job, sizes.rows))
    off.reference, off.pipeline = best(memory_only), best(on)
    off.note = "off: SQLite in memory, no request waits for a commit"
    return off


def _latency_scenario(folder: Path, sizes: Sizes) -> Scenario:
    """200 ms a request: the ideal is concurrency / latency, or the bare loop if the CPU caps lower."""
    ideal = sizes.latency_concurrency / (LATENCY_MS / 1000)
    with emulator_process(LATENCY_MS) as url:
        job, bodies = _workload(folder, url, sizes.latency_rows, sizes.latency_concurrency)
        scenario = _compare(f"{LATENCY_MS:.0f} ms x {sizes.latency_concurrency}", job, bodies, sizes, LATENCY_TARGET)
    bare = scenario.reference
    assert bare is not None
    scenario.latency_ms = LATENCY_MS
    scenario.compared_with = "min(ideal, bare loop)"
    scenario.reference = Rate(min(ideal, bare.rps), bare.cpu_us)
    scenario.note = f"ideal {ideal:.0f}/s, bare loop {bare.rps:.0f}/s"
    return scenario


def machine() -> dict[str, Any]:
    import platform

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "uvloop": eventloop.has_uvloop(),
    }


# --- printing ---------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    m = report.machine
    lines = [
        f"batchrun bench{', quick sizes' if report.quick else ''}: {m['cpus']} CPUs, Python {m['python']}, "
        f"{m['platform']}, uvloop {'on' if m['uvloop'] else 'off'}",
        "",
        f"{'':<33}{'requests/s':-^32}  {'CPU µs a request':-^32}",
        f"{'scenario':<21}{'conc':>5}{'rows':>7}{'it':>7}{'batchrun':>9}{'ratio':>7}{'target':>9}"
        f"  {'it':>6}{'batchrun':>9}{'times':>7}{'target':>10}",
    ]
    for s in report.scenarios:
        if s.reference is None or s.pipeline is None or s.ratio is None or s.cpu_times is None:
            lines.append(f"{s.name:<21}{'':>12}  {s.note}")
            continue
        target = f">= {s.target:.2f}" if s.target is not None else ""
        cpu_target = f"<= {s.cpu_target:.2f}" if s.cpu_target is not None else ""
        verdict = {True: "met", False: "MISSED", None: ""}[s.met]
        lines.append(
            f"{s.name:<21}{s.concurrency:>5}{s.rows:>7}{s.reference.rps:>7.0f}{s.pipeline.rps:>9.0f}{s.ratio:>7.3f}"
            f"{target:>9}  {s.reference.cpu_us:>6.0f}{s.pipeline.cpu_us:>9.0f}{s.cpu_times:>7.3f}{cpu_target:>10}"
            f"  {verdict}"
        )
        lines.append(f"{'':<21}it: {s.compared_with}" + (f"; {s.note}" if s.note else ""))
    if report.stacks:
        loops = [k for k in report.stacks[0] if k != "stack"]
        lines += [
            "",
            "bare loop by HTTP stack (req/s, zero latency):",
            f"{'stack':<16}" + "".join(f"{k:>10}" for k in loops),
        ]
        lines += [f"{s['stack']:<16}" + "".join(f"{s[k]:>10}" for k in loops) for s in report.stacks]
        lines.append(f"the emulator sustains at least {report.emulator_rps_at_least:.0f} req/s (the fastest bare loop)")
    if report.memory:
        lines += ["", "memory (resume of a 90 % done job, peak RSS of `batchrun run`):"]
        lines += [
            f"{r['rows']:>12,} rows  {r['requested']:>10,} requested  {r['peak_rss_mb']:>8.1f} MB  x{r['ratio']:.2f}"
            + (f"  target <= {MEMORY_TARGET:.2f}  {'met' if r['ratio'] <= MEMORY_TARGET else 'MISSED'}" if i else "")
            for i, r in enumerate(report.memory)
        ]
    return "\n".join(lines)


def main(quick: bool, json_path: str | None, memory_rows: list[int]) -> int:
    report = run_bench(quick, memory_rows)
    print(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return 0

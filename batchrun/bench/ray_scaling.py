"""`batchrun bench --engine ray`: the Ray engine against the local one, and its scaling over nodes.

Both engines run the same generated job against the emulator (bench/throughput.py's workload) in
this process, alternately, so a busy machine slows both alike:

* rows/s after start-up: from the checkpoint's finish times, the middle 90 % of the
  rows over the time they took (Ray's start-up, the first rows' ramp and the last
  rows' drain left out, the same way for both engines); also the whole run's rows/s;
* the coordinator's CPU per row: its actor process's CPU time (all its threads, Ray's
  own included) per row, after start-up (over the same middle 90 % of rows, from the
  coordinator's own log of rows finished and CPU time at each sync) and over the whole run;
* the coordinator alone: fed by simulated workers as fast as one process can, with the
  calls a real worker makes for its rows but no relay, its CPU per row at a high rate
  (what bounds how many rows/s one coordinator can feed);
* scaling: a simulated cluster of `NODES` nodes on this machine
  (`ray.cluster_utils.Cluster`), rows/s with 1, 2 and 4 sending actors at a latency and
  concurrency one actor cannot keep busy alone (its CPU is the bottleneck), and the
  emulator's peak in-flight count, which must stay within the job's concurrency however
  many actors send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchrun.base import eventloop
from batchrun.bench.throughput import emulator_process, machine, write_input, write_job
from batchrun.engines.contract import Engine
from batchrun.engines.coordinator import row_values
from batchrun.engines.ray_coordinator import CoordinatorActor
from batchrun.engines.ray_engine import RayEngine, RayOptions
from batchrun.engines.runner import Run, RunOptions
from batchrun.flow.spend import Budget
from batchrun.job.spec import Job, RunSpec
from batchrun.ledger.checkpoint import DB_NAME, RowRecord, checkpoint_folder

LATENCY_MS = 20.0
CONCURRENCY = 64
NODES = 2
SCALING_ACTORS = (1, 2, 4)
SCALING_LATENCY_MS = 100.0
SCALING_CONCURRENCY = 256  # 2,560 rows/s at most: more than one actor's CPU sends
STEADY = (0.05, 0.95)  # the share of rows finished between which the steady rate is measured
FEEDERS = 4  # simulated workers feeding the coordinator alone
FEED_BATCH = 512  # rows a simulated worker claims at once (as RowSender's batches)
FEED_SLICE = 64  # rows whose intents and outcomes one sync carries: a slice at concurrency 128 and more
RAY_TARGET = 1.0  # Ray's rows/s after start-up at least the local engine's (docs/performance.md)
COORDINATOR_US_TARGET = 50.0  # the coordinator's CPU a row in a real run, at most (docs/performance.md)


@dataclass
class Sizes:
    rows: int
    scaling_rows: int
    feed_rows: int
    repeat: int


FULL = Sizes(rows=20_000, scaling_rows=10_000, feed_rows=40_000, repeat=2)
QUICK = Sizes(rows=6_000, scaling_rows=1_500, feed_rows=4_000, repeat=1)  # rows: 3 s of sending, not 1


@dataclass
class EngineRun:
    engine: str
    rows_per_s: float  # after start-up (the middle 90 % of rows)
    whole_run_rows_per_s: float  # start-up, Parquet write and all
    coordinator_us_per_row: float | None = None  # after start-up (the middle 90 % of rows)
    coordinator_whole_us_per_row: float | None = None  # from its first rows to its close
    peak_in_flight: int | None = None  # at the emulator


@dataclass
class Report:
    quick: bool
    machine: dict[str, Any]
    latency_ms: float = LATENCY_MS
    concurrency: int = CONCURRENCY
    rows: int = 0
    runs: list[EngineRun] = field(default_factory=list)
    ratio: float | None = None  # Ray / local, best of each, after start-up
    coordinator_us_per_row: float | None = None
    coordinator_whole_us_per_row: float | None = None
    fed_us_per_row: float | None = None  # the coordinator alone, fed as fast as it goes
    fed_rows_per_s: float | None = None
    scaling: list[EngineRun] = field(default_factory=list)
    scaling_nodes: int = NODES


def steady_rows_per_s(job: Job) -> float:
    """Rows per second between the 5th and 95th percentile of the run's finish times."""
    db = sqlite3.connect(checkpoint_folder(job.output_path) / DB_NAME)
    try:
        finished = [t for (t,) in db.execute("SELECT finished_at FROM rows ORDER BY finished_at")]
    finally:
        db.close()
    lo, hi = (round(share * (len(finished) - 1)) for share in STEADY)
    return (hi - lo) / (finished[hi] - finished[lo])


async def _execute(job: Job, engine: Engine | None) -> dict[str, Any]:
    return await Run(job, RunOptions(quiet=True), engine).execute()  # None: the local engine, made on the loop


def one_run(job: Job, engine: RayEngine | None, rows: int, name: str) -> EngineRun:
    """A whole `batchrun run` of the job, from scratch, in this process; `engine` None: the local engine."""
    shutil.rmtree(checkpoint_folder(job.output_path), ignore_errors=True)
    job.output_path.unlink(missing_ok=True)
    started = time.perf_counter()
    summary = eventloop.run(_execute, job, engine)
    wall = time.perf_counter() - started
    if summary["ok"] != rows:
        raise RuntimeError(f"bench: only {summary['ok']} of {rows} rows succeeded; the figures would be wrong")
    run = EngineRun(name, round(steady_rows_per_s(job), 1), round(rows / wall, 1))
    if engine is not None and engine.coordinator_cpu_log:
        log = engine.coordinator_cpu_log
        run.coordinator_us_per_row = round(steady_us_per_row(log, rows), 1)
        run.coordinator_whole_us_per_row = round((log[-1][1] - log[0][1]) / rows * 1e6, 1)
    return run


def steady_us_per_row(log: list[tuple[int, float]], rows: int) -> float:
    """CPU µs a row between the coordinator's marks nearest the 5th and 95th percentile of rows finished."""
    lo, hi = (share * rows for share in STEADY)
    first = max((mark for mark in log if mark[0] <= lo), default=log[0])
    last = min((mark for mark in log if mark[0] >= hi), default=log[-1])
    return (last[1] - first[1]) / max(1, last[0] - first[0]) * 1e6


def compare(folder: Path, sizes: Sizes, report: Report) -> None:
    """Local and Ray alternately on the same job at LATENCY_MS, `repeat` times each; a local Ray for each run."""
    with emulator_process(LATENCY_MS) as url:
        job = write_job(folder, write_input(folder / "input.parquet", sizes.rows), url, CONCURRENCY)
        for _ in range(sizes.repeat):
            report.runs.append(one_run(job, None, sizes.rows, "local"))
            report.runs.append(one_run(job, RayEngine(RayOptions()), sizes.rows, "ray"))
    local = max(r.rows_per_s for r in report.runs if r.engine == "local")
    ray_runs = [r for r in report.runs if r.engine == "ray"]
    report.rows = sizes.rows
    report.ratio = round(max(r.rows_per_s for r in ray_runs) / local, 3)
    report.coordinator_us_per_row = min(r.coordinator_us_per_row or 0.0 for r in ray_runs)
    report.coordinator_whole_us_per_row = min(r.coordinator_whole_us_per_row or 0.0 for r in ray_runs)


def coordinator_alone(folder: Path, sizes: Sizes, report: Report) -> None:
    """The coordinator fed by FEEDERS simulated workers as fast as this process goes: its CPU per row."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        actor: Any = CoordinatorActor  # an actor class; mypy cannot see its `remote`
        coordinator = actor.remote(str(folder), CONCURRENCY, RunSpec(), Budget(None, None, 0.0))
        ray.get(coordinator.start.remote())
        started = time.perf_counter()
        asyncio.run(_feed(coordinator, sizes.feed_rows))
        wall = time.perf_counter() - started
        final = ray.get(coordinator.close.remote())
    finally:
        ray.shutdown()
    log = final["cpu_log"]
    report.fed_us_per_row = round((log[-1][1] - log[0][1]) / sizes.feed_rows * 1e6, 1)
    report.fed_rows_per_s = round(sizes.feed_rows / wall)


async def _feed(coordinator: Any, rows: int) -> None:
    share = rows // FEEDERS
    await asyncio.gather(*(_feeder(coordinator, n * share, share) for n in range(FEEDERS)))


async def _feeder(coordinator: Any, first: int, rows: int) -> None:
    """What a RowSender tells the coordinator about its rows, when every request is answered at once."""
    worker = uuid.uuid4().hex
    permits = (await coordinator.lease.remote(worker, 100, False, CONCURRENCY // FEEDERS))["permits"]
    for lo in range(first, first + rows, FEED_BATCH):
        batch = range(lo, min(lo + FEED_BATCH, first + rows))
        await coordinator.unfinished.remote(list(batch))
        await coordinator.claim.remote(worker, [(i, f"r{i:09d}", i.to_bytes(16, "big")) for i in batch])
        for start in range(0, len(batch), FEED_SLICE):
            rows_now = batch[start : start + FEED_SLICE]
            calls: list[tuple[str, tuple[Any, ...]]] = [("on_success", ())]
            for i in rows_now:
                values = row_values(_answered(i))  # one tuple for both calls, as CoordinatorLink.values gives
                calls += [
                    ("succeeded", (permits[i % len(permits)], 0.02, 50, None, True)),
                    ("end_leading", (i.to_bytes(16, "big"), values, worker)),
                    ("finish", (values,)),
                ]
            await coordinator.sync.remote(worker, len(permits), len(rows_now), calls, list(rows_now))


def _answered(idx: int) -> RowRecord:
    now = time.time()
    return RowRecord(
        idx, f"r{idx:09d}", "ok", "A sturdy kettle, works well.", None, "stop", "gpt-5.4", 31, 9, 0.02, 1,
        None, None, now, request_hash=idx * 7919, started_at=now - 0.02, attempt_log="0.000 ok",
    )  # fmt: skip


@contextmanager
def simulated_cluster(nodes: int) -> Iterator[str]:
    """`nodes` Ray nodes of 2 CPUs each on this machine; yields the head's address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 100 * 2**20, "include_dashboard": False},
    )
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def emulator_stats(url: str, reset: bool = False) -> dict[str, Any]:
    if reset:
        urllib.request.urlopen(urllib.request.Request(url + "/_emulator/reset", method="POST", data=b"")).close()
        return {}
    with urllib.request.urlopen(url + "/_emulator/stats") as answer:
        stats: dict[str, Any] = json.loads(answer.read())
    return stats


def scaling(folder: Path, sizes: Sizes, report: Report) -> None:
    """Rows/s with 1, 2 and 4 actors on a simulated cluster, and the job's in-flight limit held at the emulator."""
    with emulator_process(SCALING_LATENCY_MS) as url:
        # Written first: it sets the bench's key, which the nodes' workers inherit when they start.
        rows = write_input(folder / "input.parquet", sizes.scaling_rows)
        job = write_job(folder, rows, url, SCALING_CONCURRENCY)
        with simulated_cluster(NODES) as address:
            _scale(job, url, address, sizes, report)


def _scale(job: Job, url: str, address: str, sizes: Sizes, report: Report) -> None:
    for actors in SCALING_ACTORS:
        emulator_stats(url, reset=True)
        engine = RayEngine(RayOptions(address=address, actors=actors))
        run = one_run(job, engine, sizes.scaling_rows, f"ray, {actors} actor{'s' if actors > 1 else ''}")
        run.peak_in_flight = emulator_stats(url)["peak_in_flight"]
        report.scaling.append(run)


def run_bench(quick: bool) -> Report:
    sizes = QUICK if quick else FULL
    report = Report(quick=quick, machine=machine())
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-ray-") as tmp:
        (Path(tmp) / "compare").mkdir()
        (Path(tmp) / "scaling").mkdir()
        (Path(tmp) / "alone").mkdir()
        compare(Path(tmp) / "compare", sizes, report)
        coordinator_alone(Path(tmp) / "alone", sizes, report)
        scaling(Path(tmp) / "scaling", sizes, report)
    return report


def format_report(report: Report) -> str:
    m = report.machine
    lines = [
        f"batchrun bench --engine ray{' --quick' if report.quick else ''}: {m['cpus']} CPUs, "
        f"Python {m['python']}, {m['platform']}",
        "",
        f"{report.rows:,} rows at {report.latency_ms:.0f} ms latency, concurrency {report.concurrency}, "
        "a local Ray started for each run (coordinator µs a row after start-up, and over its whole run):",
        f"{'engine':<22}{'rows/s after start-up':>22}{'whole run':>11}{'coordinator µs/row':>20}{'whole run':>11}",
    ]
    for r in report.runs:
        lines.append(
            f"{r.engine:<22}{r.rows_per_s:>22.0f}{r.whole_run_rows_per_s:>11.0f}"
            f"{_us(r.coordinator_us_per_row):>20}{_us(r.coordinator_whole_us_per_row):>11}"
        )
    lines += [
        f"ray / local, rows/s after start-up: {report.ratio:.2f} (target >= {RAY_TARGET:.2f}): "
        f"{_verdict(report.ratio is not None and report.ratio >= RAY_TARGET)}",
        f"coordinator CPU per row: {report.coordinator_us_per_row:.0f} µs (target <= {COORDINATOR_US_TARGET:.0f}): "
        f"{_verdict(_at_most(report.coordinator_us_per_row, COORDINATOR_US_TARGET))} "
        f"(whole run: {_us(report.coordinator_whole_us_per_row)} µs)",
        f"the coordinator alone, fed by {FEEDERS} simulated workers: {report.fed_us_per_row:.0f} µs a row "
        f"at {report.fed_rows_per_s:,.0f} rows/s",
        "",
        f"scaling: {report.scaling_nodes} simulated nodes on this machine, {SCALING_LATENCY_MS:.0f} ms latency, "
        f"concurrency {SCALING_CONCURRENCY} for the whole job (peak in flight: at the emulator):",
        f"{'actors':<22}{'rows/s after start-up':>22}{'whole run':>11}{'coordinator µs/row':>20}{'whole run':>11}"
        f"{'peak in flight':>16}",
    ]
    for r in report.scaling:
        lines.append(
            f"{r.engine:<22}{r.rows_per_s:>22.0f}{r.whole_run_rows_per_s:>11.0f}"
            f"{_us(r.coordinator_us_per_row):>20}{_us(r.coordinator_whole_us_per_row):>11}{r.peak_in_flight:>16}"
        )
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else ""


def _at_most(value: float | None, target: float) -> bool:
    return value is not None and value <= target


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main(quick: bool, json_path: str | None) -> int:
    report = run_bench(quick)
    print(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return 0

"""`batchrun run JOB --engine ray`: the same job on a Ray cluster, with the same output and resume promise.

Ray Data partitions, schedules and retries; batchrun supplies the work:

* The input is a Ray Data datasource whose read tasks each read a range of rows with
  batchrun's own reader (job/inputs.py): values, rendered requests and request hashes are
  the local engine's, so a checkpoint can be resumed by either engine, and every row
  keeps its row_index (Ray's own readers give rows no stable position).
* A pool of `RowSender` actors (map_batches) sends each batch's rows through the same
  row pipeline and worker loop as the local engine (rows.RowPipeline: rendering, protocols,
  transport, retries, repairs), each a ClusterWorker (engines/coordinator_link.py) whose
  collaborators stand in for the job-wide coordinator (engines/coordinator.py), a Ray actor
  here (engines/ray_coordinator.py). An actor gets the input's columns from the driver: it
  never scans the input.
* The driver is a `Run` like a local one (`Run.execute` opens, checks and finally writes
  the output) with `RayEngine` as its engine, and shows one progress bar fed by the actors' reports.
  While it runs it says so to the coordinator (`_signs_of_life`): actors send only while it does.

Ray Data's own checkpointing (CheckpointConfig with an id column) is not used: it records
a block's ids once the whole block is written, so a kill loses every row of unfinished
blocks, and it keeps neither the answers nor the intents that say which rows may be paid twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import polars as pl
import pyarrow as pa
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from batchrun.base.errors import JobError
from batchrun.engines.contract import OpenRun, Sent
from batchrun.engines.coordinator import DRIVER_PING_S, sent_back
from batchrun.engines.coordinator_link import ClusterWorker
from batchrun.engines.ray_coordinator import CoordinatorActor, RayCalls
from batchrun.engines.runner import GRACE_S, Run, RunOptions
from batchrun.job.inputs import InputTable
from batchrun.job.spec import Job
from batchrun.ledger.checkpoint import Checkpoint, RowRecord
from batchrun.pipeline.progress import Progress, paid_images

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # rows are small; Ray spills to disk beyond it
RANGE_ROWS = 50_000  # input rows per read task
ACTOR_CPUS = 0.5  # a sending actor mostly waits on the network; the rest of the CPUs read the input
STATE_EVERY_S = 0.5  # how often the driver asks whether the job was stopped
REPORT = pa.schema(
    [("status", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("images", pa.int64())]
)


@dataclass
class RayOptions:
    address: str | None = None  # None: the RAY_ADDRESS variable, else a local Ray started for this run
    actors: int | None = None  # None: one per CPU of the cluster (at most one per batch of rows)


async def run_job_on_ray(job: Job, options: RunOptions, ray_options: RayOptions) -> dict[str, Any]:
    return await Run(job, options, RayEngine(ray_options)).execute()


class RayEngine:
    """Sends a run's rows with Ray actors; everything before and after sending is the `Run`'s, as locally."""

    def __init__(self, ray_options: RayOptions) -> None:
        self.ray_options = ray_options
        self._interrupts = 0
        # After a run: (rows finished, the coordinator's CPU seconds) from its first rows on (`batchrun bench`).
        self.coordinator_cpu_log: list[tuple[int, float]] = []

    async def send_all(self, run: OpenRun, checkpoint: Checkpoint, progress: Progress, base_url: str) -> Sent:
        if len(run.job.spec.provider.key_variables) > 1:
            raise JobError(
                f"{run.job.path}: provider.api_key_env: several keys are not supported yet with --engine ray; "
                "give one variable, or run without --engine ray"
            )
        # Ray's calls block; nothing else runs on this event loop in a Ray run.
        with _ray_session(self.ray_options.address):
            name = f"batchrun-{uuid.uuid4().hex}"
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            actor = cast(Any, CoordinatorActor)  # an actor class; mypy cannot see its `options`
            coordinator = actor.options(name=name, scheduling_strategy=here).remote(
                str(checkpoint.folder), run.concurrency, run.job.spec.run, run.budget
            )
            ray.get(coordinator.start.remote())
            with _ctrl_c_interrupts(), _signs_of_life(coordinator):
                try:
                    self._send_all(run, coordinator, name, progress, base_url)
                except KeyboardInterrupt:
                    self._stop_on_ctrl_c(coordinator)
                finally:
                    final = ray.get(coordinator.close.remote())
        self.coordinator_cpu_log = final["cpu_log"]
        return sent_back(final, self._interrupts)

    def _send_all(self, run: OpenRun, coordinator: Any, name: str, progress: Progress, base_url: str) -> None:
        limit = run.limit
        rows = run.table.count() if limit is None else min(limit, run.table.count())
        # A batch can keep the whole limit busy, and costs the coordinator two calls: a few per 1,000 rows.
        batch_rows = max(16, min(8 * run.concurrency, 512))
        actors = self.ray_options.actors
        # Every actor from the start: a pool grown on demand sent four fifths of a 20,000-row job with its
        # first actor, the second starting late (`batchrun bench --engine ray`).
        most = min(_most_actors(), -(-rows // batch_rows)) if rows else 1
        pool = ray.data.ActorPoolStrategy(size=actors) if actors else ray.data.ActorPoolStrategy(size=most)
        # Parquet: enough read tasks for every actor to have work from the start, each a range of whole
        # batches. CSV and JSONL can only be read from their start: one task streams them.
        ranges = 1
        if run.table.splittable:
            ranges = min(max(_most_actors(actors), -(-rows // RANGE_ROWS)), max(1, -(-rows // batch_rows)))
        dataset = ray.data.read_datasource(InputRanges(run.job, rows, batch_rows), override_num_blocks=ranges)
        sender = {
            "job": run.job,
            "columns": run.table.columns,
            "id_name": run.table.id_name,
            "concurrency": run.concurrency,
            "coordinator": name,
            "url": base_url,
            "budgeted": run.budget.limit is not None,
        }
        reports = dataset.map_batches(
            RowSender,
            fn_constructor_kwargs=sender,
            batch_size=batch_rows,
            batch_format="pyarrow",
            compute=pool,
            num_cpus=ACTOR_CPUS,
        )
        checked = time.monotonic()
        for report in reports.iter_batches(batch_format="pyarrow", batch_size=None):
            for status, prompt, completion, images in zip(*(report[column].to_pylist() for column in REPORT.names)):
                progress.count(status, prompt, completion, images)
            if time.monotonic() - checked >= STATE_EVERY_S:
                checked = time.monotonic()
                if ray.get(coordinator.stopped.remote()):
                    return  # the rest stays pending

    def _stop_on_ctrl_c(self, coordinator: Any) -> None:
        """As a local run: send no new row; rows in flight get GRACE_S to finish, or a second Ctrl-C cancels them."""
        self._interrupts = 1
        ray.get(coordinator.refuse_new_rows.remote())
        deadline = time.monotonic() + GRACE_S
        try:
            while ray.get(coordinator.awaiting_answer.remote()) and time.monotonic() < deadline:
                time.sleep(0.05)
        except KeyboardInterrupt:
            self._interrupts = 2


class InputRanges(Datasource):
    """The job's input for Ray Data: each read task reads a range of rows with batchrun's reader."""

    def __init__(self, job: Job, rows: int, block_rows: int) -> None:
        super().__init__()
        self._job = job
        self._rows = rows
        self._block_rows = block_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, **_: Any) -> list[ReadTask]:
        blocks = -(-self._rows // self._block_rows)
        step = -(-blocks // max(1, parallelism)) * self._block_rows
        return [
            ReadTask(
                partial(_read_rows, self._job, lo, min(lo + step, self._rows), self._block_rows),
                BlockMetadata(
                    num_rows=min(lo + step, self._rows) - lo, size_bytes=None, input_files=None, exec_stats=None
                ),
            )
            for lo in range(0, self._rows, step)
        ]


def _read_rows(job: Job, lo: int, hi: int, block_rows: int) -> Iterator[pa.Table]:
    for batch in InputTable.for_job(job).batches(hi, block_rows, start=lo):
        yield batch.to_arrow(compat_level=pl.CompatLevel.oldest())


class RowSender:
    """One actor of the pool: sends the rows of the batches it is given, as one ClusterWorker."""

    def __init__(
        self, job: Job, columns: list[str], id_name: str, concurrency: int, coordinator: str, url: str, budgeted: bool
    ) -> None:
        self._coordinator = ray.get_actor(coordinator)
        calls = RayCalls(self._coordinator)
        self._worker = ClusterWorker(job, columns, id_name, concurrency, calls, url, budgeted)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            self._worker.start()  # on the actor's event loop: anyio's primitives need it
        except JobError as e:  # e.g. the key's variable is not set on this node
            node = ray.util.get_node_ip_address()
            await self._coordinator.cannot_start.remote(f"on the Ray worker at {node}: {e}")
            return _Report().table()
        report = _Report()
        await self._worker.send(list(cast(pl.DataFrame, pl.from_arrow(batch)).iter_rows(named=True)), report)
        return report.table()


class _Report:
    """The progress bar's share of a batch: each finished row's status, tokens and paid images, sent to the driver."""

    def __init__(self) -> None:
        self._rows: list[tuple[str, int | None, int | None, int]] = []

    def row_done(self, status: str, record: RowRecord | None) -> None:
        if record is None:
            self._rows.append((status, None, None, 0))
        else:
            self._rows.append((status, record.prompt_tokens, record.completion_tokens, paid_images(record)))

    def table(self) -> pa.Table:
        return pa.Table.from_pylist([dict(zip(REPORT.names, row)) for row in self._rows], schema=REPORT)


@contextmanager
def _ctrl_c_interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in Ray's blocking calls, instead of waiting for asyncio's next await."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _signs_of_life(coordinator: Any) -> Iterator[None]:
    """The driver says it is alive every DRIVER_PING_S, from a thread of its own: workers send only while it does."""
    done = threading.Event()

    def ping() -> None:
        while not done.wait(DRIVER_PING_S):
            coordinator.driver_alive.remote()

    pinger = threading.Thread(target=ping, name="batchrun-driver-alive", daemon=True)
    pinger.start()
    try:
        yield
    finally:
        done.set()
        pinger.join()


def _most_actors(actors: int | None = None) -> int:
    """The pool's size: as asked, else up to one actor per CPU of the cluster."""
    return actors or max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Connects to the cluster at `address` (or RAY_ADDRESS), or starts a local Ray for this run only."""
    address = address or os.environ.get("RAY_ADDRESS")
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            # Ray runs its workers at niceness 15; these commit the checkpoint and pace requests,
            # and starved by a busy machine they would let answers wait for a commit.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(
                address="local",
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                **quiet,
            )
    except ConnectionError as e:
        raise JobError(f"--ray-address {address}: cannot connect to a Ray cluster there ({e})") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # batchrun's own bar is the one
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # Ray counts read tasks, not the blocks they stream: one task reading a CSV feeds every actor.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    try:
        yield
    finally:
        ray.shutdown()

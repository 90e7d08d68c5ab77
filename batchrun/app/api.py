"""batchrun from Python: the CLI's run, validate and status, on job files or dicts and on frames.

The same engine as the CLI (app/commands.py): the same checkpoint, resume promise and messages.
A frame given as `input` is fingerprinted by its rows, so rerunning a notebook cell
resumes, and a changed frame is refused like a changed job file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union

import polars as pl
import pyarrow as pa

from batchrun.app import commands
from batchrun.base import eventloop
from batchrun.base.errors import JobError
from batchrun.base.naming import keyword
from batchrun.engines.resume import JobStatus, job_status
from batchrun.engines.runner import CtrlC, RunOptions
from batchrun.job.spec import Job, read_job, read_job_dict

if TYPE_CHECKING:
    import pandas as pd

JobLike = str | os.PathLike[str] | Mapping[str, Any]
FrameLike = Union[pl.DataFrame, "pd.DataFrame", pa.Table]  # noqa: UP007 (pandas is optional: a forward reference)
T = TypeVar("T")


def run(
    job: JobLike,
    input: FrameLike | None = None,
    *,
    limit: int | None = None,
    concurrency: int | None = None,
    restart: bool = False,
    retry_failed: bool = False,
    rerun_changed: bool = False,
    max_cost: float | None = None,
    base_url: str | None = None,
    adopt_checkpoint: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> pl.DataFrame:
    """Runs or resumes the job and returns its output, as `batchrun run` writes it.

    `concurrency`, `max_cost` and `base_url` set run.concurrency, run.max_cost and provider.base_url
    for this run, with the job file's bounds; the others are `batchrun run`'s flags of the same names.

    Works where an event loop is already running (Jupyter): the run then has a loop of its own
    in a worker thread, and Ctrl-C (interrupt the kernel) stops it as it stops the CLI.
    Raises JobError, RunAborted (stopped by the server), BudgetReached or RunInterrupted.
    """
    loaded = _load(job, input, concurrency=concurrency, max_cost=max_cost, base_url=base_url)
    options = _options(limit, restart, retry_failed, rerun_changed, adopt_checkpoint, quiet)
    if _loop_running() or threading.current_thread() is not threading.main_thread():
        options.presses = CtrlC()  # no SIGINT handler of ours: it is not our loop or thread
        _in_worker_thread(partial(eventloop.run, commands.run, loaded, options), options.presses)
    else:
        eventloop.run(commands.run, loaded, options)
    return _read_output(loaded)


async def arun(
    job: JobLike,
    input: FrameLike | None = None,
    *,
    limit: int | None = None,
    concurrency: int | None = None,
    restart: bool = False,
    retry_failed: bool = False,
    rerun_changed: bool = False,
    max_cost: float | None = None,
    base_url: str | None = None,
    adopt_checkpoint: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> pl.DataFrame:
    """`run`, awaited on the caller's event loop. Cancelling the task stops the run; what finished is kept."""
    loaded = _load(job, input, concurrency=concurrency, max_cost=max_cost, base_url=base_url)
    options = _options(limit, restart, retry_failed, rerun_changed, adopt_checkpoint, quiet)
    options.presses = CtrlC()  # the loop's SIGINT handling stays its owner's
    await commands.run(loaded, options)
    return _read_output(loaded)


def validate(
    job: JobLike, input: FrameLike | None = None, *, show: int = 2, base_url: str | None = None
) -> commands.Plan:
    """Checks the job and its input; returns the first `show` rendered requests and the cost estimate. Sends nothing."""
    loaded = _load(job, input, base_url=base_url)
    if _loop_running():  # rendering loads images on an event loop of its own
        return _in_worker_thread(partial(commands.plan, loaded, show))
    return commands.plan(loaded, show)


def status(job: JobLike, input: FrameLike | None = None, *, base_url: str | None = None) -> JobStatus:
    """Where the job stands: rows done, failed and pending, tokens, cost, and where its checkpoint is."""
    return job_status(_load(job, input, base_url=base_url), keyword)


def _load(job: JobLike, input: FrameLike | None, **settings: Any) -> Job:
    """The job, with the run settings given as keyword arguments laid over it (commands.settle)."""
    frame = _as_polars(input)
    if isinstance(job, Mapping):
        read = read_job_dict(dict(job), Path.cwd(), frame)
    else:
        read = read_job(job)
        if frame is not None:  # the frame stands in for input.path
            read.spec.input = read.spec.input.model_copy(update={"path": None})
            read.frame = frame
    loaded = commands.settle(read, keyword, **settings)
    for warning in loaded.warnings:
        warnings.warn(warning, stacklevel=3)
    return loaded


def _as_polars(input: FrameLike | None) -> pl.DataFrame | None:
    if input is None or isinstance(input, pl.DataFrame):
        return input
    if isinstance(input, pa.Table):
        convert: Callable[[Any], pl.DataFrame] = lambda table: pl.DataFrame(pl.from_arrow(table))  # noqa: E731
    elif type(input).__module__.partition(".")[0] == "pandas":  # pandas is optional: never imported here
        convert = pl.from_pandas
    else:
        raise JobError(f"input: expected a polars or pandas DataFrame or a pyarrow Table, got {type(input).__name__}")
    try:
        return convert(input)
    except (Exception, pl.exceptions.PanicException) as e:  # pyarrow's and polars' (a Rust panic) alike
        raise JobError(_unconvertible(input, convert, e)) from None


def _unconvertible(frame: Any, convert: Callable[[Any], pl.DataFrame], error: BaseException) -> str:
    """One line naming the first column that cannot become a typed column (mixed types, Python objects)."""
    columns = frame.column_names if isinstance(frame, pa.Table) else list(frame.columns)
    for column in columns:
        try:
            convert(frame.select([column]) if isinstance(frame, pa.Table) else frame[[column]])
        except (Exception, pl.exceptions.PanicException) as e:
            return (
                f"input: column {column!r} cannot be read as one typed column ({_first_line(e)}); "
                f"give it one type, e.g. df[{column!r}] = df[{column!r}].astype(str)"
            )
    return f"input: the frame cannot be read as a table ({_first_line(error)})"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _options(
    limit: int | None,
    restart: bool,
    retry_failed: bool,
    rerun_changed: bool,
    adopt_checkpoint: str | os.PathLike[str] | None,
    quiet: bool,
) -> RunOptions:
    commands.check_limit(limit, keyword)
    adopt = Path(adopt_checkpoint) if adopt_checkpoint is not None else None
    return RunOptions(limit, restart, retry_failed, rerun_changed, quiet, adopt, named=keyword)


def _read_output(job: Job) -> pl.DataFrame:
    if job.output_url is not None:
        return pl.read_parquet(job.output_url, storage_options=job.spec.output.storage_options)
    return pl.read_parquet(job.output_path)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_worker_thread(work: Callable[[], T], presses: CtrlC | None = None) -> T:
    """`work` in a worker thread, waited for here.

    Ctrl-C while waiting is handed to the run (`presses`), which stops as the CLI does and raises RunInterrupted.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="batchrun") as pool, _ctrl_c_interrupts():
        future = pool.submit(work)
        while True:
            try:
                # Short waits: SIGINT may land on another thread, and Python runs its handler
                # (KeyboardInterrupt) only when this thread wakes.
                return future.result(timeout=0.1)
            except FutureTimeout:
                continue
            except KeyboardInterrupt:
                if presses is None:
                    raise
                presses.press()


@contextlib.contextmanager
def _ctrl_c_interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in this (main) thread while it waits for the run.

    asyncio.run's own SIGINT handler only cancels its main task on the first Ctrl-C, and that task is
    this very call, blocked waiting: the first Ctrl-C did nothing and every row was sent. Its handler
    (or any other Python one) comes back when the run ends; an ignored SIGINT stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread's handlers
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous) or previous is signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

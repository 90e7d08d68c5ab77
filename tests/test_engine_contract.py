"""The engine contract without Ray: a run whose rows two workers send through the job-wide coordinator,
all in this process, over HTTP to the emulator. The coordinator and the workers' stand-ins are the Ray
engine's own (engines/coordinator.py, engines/coordinator_link.py); only how their calls cross differs."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import polars as pl
from conftest import Emulator, write_csv, write_job

from batchrun.app.checks import load_job
from batchrun.engines.contract import OpenRun, Sent
from batchrun.engines.coordinator import DRIVER_PING_S, Coordinator, sent_back
from batchrun.engines.coordinator_link import ClusterLedger, ClusterWorker, CoordinatorLink
from batchrun.engines.runner import Run, RunOptions
from batchrun.flow.spend import Budget
from batchrun.job.spec import RunSpec
from batchrun.ledger.checkpoint import Checkpoint
from batchrun.pipeline.progress import Progress

BATCH_ROWS = 8


class InProcessCalls:
    """The coordinator's methods called directly (coordinator_link.CoordinatorCalls)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def ask(self, method: str, *args: Any) -> Any:
        answer = getattr(self._coordinator, method)(*args)
        return await answer if inspect.isawaitable(answer) else answer


class TwoWorkers:
    """An engine (contract.Engine) of the Ray engine's parts: one coordinator, two workers taking turns at batches."""

    async def send_all(self, run: OpenRun, checkpoint: Checkpoint, progress: Progress, base_url: str) -> Sent:
        coordinator = Coordinator(str(checkpoint.folder), run.concurrency, run.job.spec.run, run.budget)
        await coordinator.start()
        table = run.table
        calls = InProcessCalls(coordinator)
        budgeted = run.budget.limit is not None
        workers = [
            ClusterWorker(run.job, table.columns, table.id_name, run.concurrency, calls, base_url, budgeted)
            for _ in range(2)
        ]
        rows = [row for batch in table.batches(run.limit) for row in batch.iter_rows(named=True)]
        batches = [rows[i : i + BATCH_ROWS] for i in range(0, len(rows), BATCH_ROWS)]

        async def worker(number: int) -> None:
            for batch in batches[number::2]:
                await workers[number].send(batch, progress)

        async with anyio.create_task_group() as tg:
            tg.start_soon(_alive, coordinator)
            async with anyio.create_task_group() as sending:
                sending.start_soon(worker, 0)
                sending.start_soon(worker, 1)
            tg.cancel_scope.cancel()
        return sent_back(await coordinator.close(), interrupts=0)


async def _alive(coordinator: Coordinator) -> None:
    """The driver's signs of life: workers send only while it gives them."""
    while True:
        await coordinator.driver_alive()
        await asyncio.sleep(DRIVER_PING_S)


def test_a_run_sent_by_workers_through_the_coordinator_without_ray(tmp_path: Path, emulator: Emulator) -> None:
    texts = [f"review {i % 30}" for i in range(60)]  # each text twice: the second is answered by the first
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], [[f"R{i}", text] for i, text in enumerate(texts)])
    job = load_job(write_job(tmp_path, emulator.url, run={"concurrency": 4}))
    summary = asyncio.run(Run(job, RunOptions(quiet=True), TwoWorkers()).execute())
    assert (summary["rows"], summary["ok"], summary["error"]) == (60, 60, 0)
    assert summary["requested_this_run"] == 30
    assert summary["shared"] == 30
    output = pl.read_parquet(summary["output"]).sort("review_id")
    assert output["status"].to_list() == ["ok"] * 60


class CountedCalls(InProcessCalls):
    """InProcessCalls that keep the intents each sync carried."""

    def __init__(self, coordinator: Coordinator) -> None:
        super().__init__(coordinator)
        self.syncs: list[list[int]] = []  # each sync's intents

    async def ask(self, method: str, *args: Any) -> Any:
        if method == "sync":
            self.syncs.append(list(args[-1]))
        return await super().ask(method, *args)


@asynccontextmanager
async def _linked(folder: Path) -> AsyncIterator[tuple[CountedCalls, CoordinatorLink]]:
    """A coordinator in this process and one worker's link to it; closed however the test ends."""
    coordinator = Coordinator(str(folder), 8, RunSpec(), Budget(None, None, 0.0))
    await coordinator.start()
    await coordinator.driver_alive()
    calls = CountedCalls(coordinator)
    try:
        yield calls, CoordinatorLink(calls)
    finally:
        await coordinator.close()


def test_a_batchs_last_settle_makes_no_sync_when_nothing_is_left_to_carry(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _linked(tmp_path / "out.batchrun") as (calls, link):
            await link.settle()  # a sync of its own: the job's state as of now
            syncs = len(calls.syncs)
            await link.settle(news=False)  # nothing told since, no sync under way: nothing to wait for
            assert len(calls.syncs) == syncs
            link.tell("on_success")
            await asyncio.wait_for(link.settle(news=False), 5)  # something to carry: it goes now
            assert len(calls.syncs) == syncs + 1

    asyncio.run(scenario())


def test_a_worker_whose_rows_wait_for_their_intents_commits_larger_slices(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _linked(tmp_path / "out.batchrun") as (calls, link):
            ledger = ClusterLedger(link, concurrency=8)  # slices of 8 at first
            ledger.expect(list(range(200)))
            for idx in range(40):
                await asyncio.wait_for(ledger.begin(idx), 5)
            sizes = [len(intents) for intents in calls.syncs if intents]
            assert sizes[0] == 8
            assert sizes[1] > 8  # a row waited for the second slice: the next ones are larger, fewer syncs

    asyncio.run(scenario())

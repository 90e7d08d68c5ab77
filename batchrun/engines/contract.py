"""The engine contract: what a run gives an engine, and everything an engine reports back.

A `Run` (engines/runner.py) opens the checkpoint, sends the rows with an `Engine`, then
finishes from the checkpoint and from the engine's `Sent` alone: an engine changes
nothing else of the run's. The local engine sends from this process; the Ray engine's
rows are committed by a coordinator in another process, whose checkpoint and budget the
run never sees, so what the run must know of them comes back in `Sent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from batchrun.flow.spend import Budget
from batchrun.job.inputs import InputTable
from batchrun.job.spec import Job
from batchrun.ledger.checkpoint import Checkpoint
from batchrun.pipeline.progress import Progress
from batchrun.pipeline.rows import RowParts, RowPipeline
from batchrun.protocols import CallError


@dataclass
class Sent:
    """How an engine's sending ended: all the run reads to stop, say why, and write the output."""

    requested: int  # requests started this run
    interrupts: int = 0  # Ctrl-Cs: 1 let rows in flight finish, 2 cancelled them
    tripped: CallError | None = None  # the failure that stopped the run (base/stops.py), if one did
    in_flight: int = 0  # rows begun but not finished when sending ended (cancelled after Ctrl-C)
    failure: str | None = None  # why the checkpoint could no longer be written (disk full): nothing more was sent
    spent: float = 0.0  # the budget's spend, earlier runs included
    refused: float | None = None  # the worst case of the request the budget refused (then no more were sent)

    def settle_budget(self, budget: Budget) -> None:
        """The run's budget as the engine left it (the Ray engine's was held by its coordinator)."""
        budget.spent, budget.refused = self.spent, self.refused


class OpenRun(Protocol):
    """What an engine reads from the run: the job, its input, its limits, and the row pipeline to send rows with."""

    job: Job
    table: InputTable
    concurrency: int  # requests in flight at most, job-wide
    limit: int | None  # only the first rows
    budget: Budget  # `run.max_cost`, with what earlier runs spent

    def pipeline(self, parts: RowParts) -> RowPipeline: ...


class Engine(Protocol):
    """Sends the rows of an open run: finished rows go to `checkpoint`, counts to `progress`.

    Returns `Sent`; besides it, an engine's only effects are on the checkpoint's file and the progress bar.
    """

    async def send_all(self, run: OpenRun, checkpoint: Checkpoint, progress: Progress, base_url: str) -> Sent: ...

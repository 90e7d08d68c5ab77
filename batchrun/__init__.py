"""batchrun: a table in, one model call per row, a table out.

From Python::

    import batchrun
    df = batchrun.run("jobs/demo.yaml")              # what `batchrun run` does; the output as a polars DataFrame
    df = batchrun.run(job, input=frame, limit=100)   # job: a path or a dict of the job file's keys
    plan = batchrun.validate(job, input=frame)       # the first requests and the cost estimate; nothing sent
    st = batchrun.status(job, input=frame)           # done / failed / pending, tokens, cost, the checkpoint
    df = await batchrun.arun(job, input=frame)       # on the caller's event loop
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchrun.base.errors import BudgetReached, JobError, RunAborted, RunInterrupted
from batchrun.base.version import __version__ as __version__

if TYPE_CHECKING:
    from batchrun.app.api import arun, run, status, validate

__all__ = ["run", "arun", "validate", "status", "JobError", "RunAborted", "BudgetReached", "RunInterrupted"]


def __getattr__(name: str) -> Any:
    """The API's functions are imported on first use: the CLI and the emulator start without the engine."""
    if name in ("run", "arun", "validate", "status"):
        from batchrun.app import api

        return getattr(api, name)
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")

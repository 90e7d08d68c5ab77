"""The job-wide coordinator (engines/coordinator.py) as a Ray actor, and how workers call it.

The only Ray in the coordinator: the actor class, and the calls that cross to it.
"""

from __future__ import annotations

from typing import Any

import ray

from batchrun.engines.coordinator import Coordinator
from batchrun.engines.coordinator_link import CoordinatorGone

# Rows of every worker may wait on the coordinator at once (for a permit, an intent's
# commit, an identical request's answer); Ray queues calls beyond this, and a queued
# release behind waiting acquires would stall the job.
MAX_WAITING_CALLS = 1_000_000

# One per run, on the driver's node; its methods are async, so it is an async actor.
CoordinatorActor = ray.remote(num_cpus=0, max_concurrency=MAX_WAITING_CALLS)(Coordinator)


class RayCalls:
    """A worker's calls to the coordinator actor (coordinator_link.CoordinatorCalls)."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    async def ask(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._actor, method).remote(*args)
        except ray.exceptions.RayError as e:  # its process ended (the driver was killed)
            raise CoordinatorGone(str(e)) from e

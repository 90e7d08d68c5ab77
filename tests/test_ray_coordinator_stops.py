"""The Ray coordinator when its checkpoint can no longer be written: a worker's sync is answered
(its intents "not committed", so those rows are not sent) rather than never. The coordinator runs
in this process on a real small file system (tmpfs) that fills up; it needs root, like
test_checkpoint_stops.py, and the ray extra. A whole Ray run on a full disk stops as a local one does."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import Emulator, write_csv, write_job

pytest.importorskip("ray")

from test_checkpoint_stops import ROWS, _remount, _stored, small_disk  # noqa: E402, F401  (small_disk: a fixture)
from test_ray_engine import ray_address, ray_run  # noqa: E402, F401  (ray_address is a fixture)

from batchrun.engines.coordinator import Coordinator  # noqa: E402
from batchrun.flow.spend import Budget  # noqa: E402
from batchrun.job.spec import RunSpec  # noqa: E402


def _fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_sync_whose_intents_cannot_be_committed_is_answered(small_disk: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        # The coordinator without Ray around it: the same code the actor's calls run.
        coordinator = Coordinator(str(small_disk / "out.batchrun"), 4, RunSpec(), Budget(None, None, 0.0))
        await coordinator.start()
        state = await asyncio.wait_for(coordinator.sync("w", 0, 0, [], [0, 1]), 5)
        assert state.committed
        _fill(small_disk)
        state = await asyncio.wait_for(coordinator.sync("w", 0, 0, [], list(range(2, 40_000))), 5)
        assert not state.committed  # the rows are not sent; the worker learns it at once
        assert coordinator.checkpoint.failure is not None and "disk is full" in coordinator.checkpoint.failure
        state = await asyncio.wait_for(coordinator.sync("w", 0, 0, [], [40_000]), 5)  # and at every sync after
        assert not state.committed
        await coordinator.close()

    asyncio.run(scenario())


@pytest.mark.ray
def test_a_ray_run_on_a_full_disk_stops_with_one_line(
    tmp_path: Path,
    small_disk: Path,  # noqa: F811
    emulator: Emulator,
    ray_address: str,  # noqa: F811
) -> None:
    """As a local run (test_checkpoint_stops.py): the run stops, says so in one line, keeps what it stored."""
    rows = [[f"R{i}", f"review number {i} " + "x" * 60] for i in range(ROWS)]
    write_csv(tmp_path / "reviews.csv", ["review_id", "text"], rows)
    job = write_job(small_disk, emulator.url, input={"path": str(tmp_path / "reviews.csv"), "id_column": "review_id"})
    full = ray_run(job, ray_address, "--ray-actors", "2")
    assert full.returncode == 3, full.stderr[-3000:]
    assert "disk is full" in full.stderr and "--restart" not in full.stderr
    stored = _stored(small_disk)
    assert 0 < stored < ROWS

    _remount(small_disk, "size=64m")  # space freed
    done = ray_run(job, ray_address, "--ray-actors", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _stored(small_disk) == ROWS

"""The Ray coordinator when its checkpoint can no longer be written: a worker's sync is answered
(its intents "not committed", so those rows are not sent) rather than never. The coordinator runs
in this process on a real small file system (tmpfs) that fills up; it needs root, like
test_checkpoint_stops.py, and the ray extra."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

from batchrun.ray_coordinator import Coordinator  # noqa: E402
from batchrun.spec import RunSpec  # noqa: E402
from batchrun.spend import Budget  # noqa: E402


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_sync_whose_intents_cannot_be_committed_is_answered(small_disk: Path) -> None:
    async def scenario() -> None:
        # The actor's own class, without Ray around it: the same code its calls run.
        coordinator = Coordinator.__ray_metadata__.modified_class(
            str(small_disk / "out.batchrun"), 4, RunSpec(), Budget(None, None, 0.0)
        )
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

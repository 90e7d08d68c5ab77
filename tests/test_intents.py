"""Intent before send: a row still waiting for its intent's commit when the run stops is neither sent
nor counted in flight (the rerun's "may have been paid twice" counts only rows that went out)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from batchrun.ledger import checkpoint as ledger
from batchrun.ledger.checkpoint import Checkpoint


def run_rows(tmp_path: Path, stop: str) -> tuple[list[int], int]:
    """Two rows ask for their intents; the run stops (`ctrl-c` or `cancel`) while the commit is being made.

    Returns the rows that went on to send, and the rows the checkpoint then counts in flight.
    """
    checkpoint = Checkpoint(tmp_path)
    sent: list[int] = []

    async def row(idx: int) -> None:
        await checkpoint.begin(idx)
        sent.append(idx)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(checkpoint.flush_loop)
            async with anyio.create_task_group() as rows:
                rows.start_soon(row, 0)
                rows.start_soon(row, 1)
                await anyio.sleep(0)  # both intents wait for the flusher, which gathers them
                if stop == "ctrl-c":
                    checkpoint.refuse_new_rows()
                    await anyio.sleep(0.5)  # the commit is made meanwhile
                rows.cancel_scope.cancel()
            await checkpoint.flush()  # the run's last commit
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
        return sent, checkpoint.count_interrupted()
    finally:
        checkpoint.close()


def test_ctrl_c_while_the_intent_is_committed_sends_nothing_and_counts_nothing(tmp_path: Path) -> None:
    assert run_rows(tmp_path, "ctrl-c") == ([], 0)


def test_a_row_cancelled_while_its_intent_is_committed_is_not_counted_in_flight(tmp_path: Path) -> None:
    assert run_rows(tmp_path, "cancel") == ([], 0)


def begins_at_once(checkpoint: Checkpoint, idx: int) -> bool:
    """Whether `begin(idx)` returns without a pass through the event loop (its intent already committed)."""
    beginning = checkpoint.begin(idx)
    try:
        beginning.send(None)
    except StopIteration:
        return True
    beginning.close()
    return False


def test_rows_whose_intents_were_committed_a_slice_ahead_begin_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local engine: a commit of intents carries the next rows queued; each slice, used up, commits the next.

    Rows of a slice not begun when the run stops are withdrawn; after Ctrl-C none of them is sent."""
    monkeypatch.setattr(ledger, "AHEAD_S", 3600.0)  # the rate of any row begun fills a whole slice
    checkpoint = Checkpoint(tmp_path)
    checkpoint.send_ahead(4)
    counts: list[int] = []

    async def main() -> None:
        for idx in range(12):
            checkpoint.expect(idx)
        async with anyio.create_task_group() as tg:
            tg.start_soon(checkpoint.flush_loop)
            await checkpoint.begin(0)  # nothing began before it: its own intent alone, waited for
            await checkpoint.begin(1)  # waited for too: its commit carries rows 2-5
            counts.append(checkpoint.count_interrupted())
            assert [begins_at_once(checkpoint, idx) for idx in (2, 3, 4, 5)] == [True] * 4
            counts.append(checkpoint.count_interrupted())  # row 5 used the slice up: 6-9 committed at once
            checkpoint.refuse_new_rows()  # Ctrl-C: a row committed ahead is not sent
            assert not begins_at_once(checkpoint, 6)
            checkpoint.give_back_ahead()
            await checkpoint.flush()
            counts.append(checkpoint.count_interrupted())
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        checkpoint.close()
    assert counts == [6, 10, 6]

"""Intent before send: a row still waiting for its intent's commit when the run stops is neither sent
nor counted in flight (the rerun's "may have been paid twice" counts only rows that went out)."""

from __future__ import annotations

from pathlib import Path

import anyio

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

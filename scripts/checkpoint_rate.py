"""How many rows per second the checkpoint commits, through the same calls a run makes.

Each of `--concurrency` tasks takes rows one by one: `begin` (the intent, committed
before the request would go out), then `finish` (the answer, group-committed by the
flusher). No network: this is the checkpoint's ceiling, not the run's.

    python scripts/checkpoint_rate.py --rows 100000 --concurrency 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchrun.ledger.checkpoint import Checkpoint, RowRecord  # noqa: E402


def record(idx: int) -> RowRecord:
    text = "positive: the customer likes the product and says so twice."
    fields = (idx, f"R{idx}", "ok", text, None, "stop", "gpt-5.4", 60, 3, 0.8, 1, None, None, time.time())
    return RowRecord(*fields, request_hash=idx)


async def measure(folder: Path, rows: int, concurrency: int) -> float:
    checkpoint = Checkpoint(folder)
    next_row = iter(range(rows))

    async def worker() -> None:
        for idx in next_row:
            await checkpoint.begin(idx)
            checkpoint.finish(record(idx))

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(checkpoint.flush_loop)
        async with anyio.create_task_group() as work:
            for _ in range(concurrency):
                work.start_soon(worker)
        await checkpoint.flush()
        tg.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    assert checkpoint.count_finished(0, rows) == rows and checkpoint.count_interrupted() == 0
    checkpoint.close()
    return rows / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rate = anyio.run(measure, Path(tmp), args.rows, args.concurrency)
    print(f"{args.rows} rows, {args.concurrency} in flight: {rate:,.0f} rows/s committed (intent + answer)")


if __name__ == "__main__":
    main()

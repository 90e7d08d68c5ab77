"""The durable record of the run: SQLite in WAL mode beside the output.

* `rows` holds every finished row (ok or error) with the answer as received, so
  the output can be rebuilt, and re-parsed, without a request.
* `inflight` holds rows whose request may have been sent: a row is written there,
  and committed, before its request goes out ("intent before spend"), so a rerun
  can say how many rows a kill may have paid twice.
* Writes are group-committed by one flusher: intents as soon as possible (the
  request waits for them), finished rows at least every `FLUSH_S`.

A kill between commits loses at most the uncommitted finished rows (their
intents remain, so the rerun counts them). SQLite's journal makes a torn write
impossible to mistake for a committed one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import anyio

FLUSH_S = 0.2
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    idx INTEGER PRIMARY KEY,
    row_id TEXT NOT NULL,
    status TEXT NOT NULL,
    response_text TEXT,
    tool_calls TEXT,
    finish_reason TEXT,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_s REAL,
    attempts INTEGER NOT NULL,
    error_class TEXT,
    error TEXT,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS inflight (idx INTEGER PRIMARY KEY, started_at REAL NOT NULL);
"""


@dataclass
class RowRecord:
    """One finished row, as stored; the field order is the `rows` column order."""

    idx: int
    row_id: str
    status: str  # "ok" | "error"
    response_text: str | None
    tool_calls: str | None  # JSON list of {name, arguments}
    finish_reason: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float | None
    attempts: int
    error_class: str | None
    error: str | None
    finished_at: float


ROW_COLUMNS = list(RowRecord.__dataclass_fields__)


class Checkpoint:
    def __init__(self, folder: Path, durable: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        # durable=False is for `batchrun bench` only, to measure what durability costs:
        # the database lives in memory and no request waits for a commit.
        self.durable = durable
        target = folder / "checkpoint.sqlite" if durable else ":memory:"
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process; WAL keeps it consistent
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()  # one thread at a time on the connection
        self._intents: list[tuple[int, float]] = []
        self._finished: list[RowRecord] = []
        self._withdrawn: list[int] = []
        self._intent_done = anyio.Event()
        self._wake = anyio.Event()
        self._last_flush = time.monotonic()

    # --- reading --------------------------------------------------------------------

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def finished_in_range(self, lo: int, hi: int, ok_only: bool = False) -> set[int]:
        """Indexes in [lo, hi) that need no request: bounded by the batch, not the job."""
        sql = "SELECT idx FROM rows WHERE idx >= ? AND idx < ?" + (" AND status = 'ok'" if ok_only else "")
        return {r[0] for r in self._query(sql, (lo, hi))}

    def count_finished(self, lo: int, hi: int) -> int:
        return int(self._query("SELECT COUNT(*) FROM rows WHERE idx >= ? AND idx < ?", (lo, hi))[0][0])

    def rows_in_range(self, lo: int, hi: int) -> list[tuple[Any, ...]]:
        cols = ", ".join(ROW_COLUMNS)
        return self._query(f"SELECT {cols} FROM rows WHERE idx >= ? AND idx < ? ORDER BY idx", (lo, hi))

    def totals(self) -> dict[str, Any]:
        ok, errors, prompt, completion, last = self._query(
            "SELECT COALESCE(SUM(status = 'ok'), 0), COALESCE(SUM(status = 'error'), 0),"
            " SUM(prompt_tokens), SUM(completion_tokens), MAX(finished_at) FROM rows"
        )[0]
        return {
            "ok": ok,
            "error": errors,
            "prompt_tokens": prompt or 0,
            "completion_tokens": completion or 0,
            "last_finished_at": last,
        }

    def take_interrupted(self) -> int:
        """Rows whose request may have been sent by a run that died: count them, then forget them."""
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM inflight").fetchone()
            self._db.execute("DELETE FROM inflight")
        return int(count)

    # --- writing --------------------------------------------------------------------

    async def begin(self, idx: int) -> None:
        """Durably record that `idx` is about to be requested; returns once committed."""
        if not self.durable:
            return
        self._intents.append((idx, time.time()))
        done = self._intent_done
        self._wake.set()
        await done.wait()

    def finish(self, record: RowRecord) -> None:
        self._finished.append(record)
        if len(self._finished) >= 512:
            self._wake.set()

    def withdraw(self, idx: int) -> None:
        """The request of `idx` was answered without cost (e.g. 401): it is pending, not in flight."""
        self._withdrawn.append(idx)

    def forget_errors(self) -> int:
        """--retry-failed: drop rows that ended in error so they are requested again."""
        with self._lock:
            return self._db.execute("DELETE FROM rows WHERE status = 'error'").rowcount

    async def flush_loop(self) -> None:
        """Runs for the whole run; cancel it after a final `flush()`."""
        while True:
            with anyio.move_on_after(FLUSH_S):
                await self._wake.wait()
            self._wake = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        batch = self._take()
        waiters, self._intent_done = self._intent_done, anyio.Event()
        if any(batch):
            await anyio.to_thread.run_sync(self._write, *batch, abandon_on_cancel=False)
        waiters.set()

    def flush_now(self) -> None:
        """Synchronous final flush, for shutdown paths outside the event loop."""
        self._write(*self._take())

    def _take(self) -> tuple[list[tuple[int, float]], list[RowRecord], list[int]]:
        batch = (self._intents, self._finished, self._withdrawn)
        self._intents, self._finished, self._withdrawn = [], [], []
        return batch

    def _write(self, intents: list[tuple[int, float]], finished: list[RowRecord], withdrawn: list[int]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO inflight VALUES (?, ?)", intents)
            self._db.executemany(
                f"INSERT OR REPLACE INTO rows VALUES ({', '.join('?' * len(ROW_COLUMNS))})",
                [astuple(r) for r in finished],
            )
            gone = [(r.idx,) for r in finished] + [(i,) for i in withdrawn]
            self._db.executemany("DELETE FROM inflight WHERE idx = ?", gone)
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def checkpoint_folder(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".batchrun")

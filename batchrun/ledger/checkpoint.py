"""The durable record of the run: SQLite in WAL mode beside the output.

* `rows` holds every finished row (ok or error) with the answer as received, so
  the output can be rebuilt, and re-parsed, without a request.
* `inflight` holds rows whose request may have been sent: a row is written there,
  and committed, before its request goes out ("intent before spend"), so a rerun
  can say how many rows a kill may have paid twice.
* Writes are group-committed by one flusher: intents as soon as possible (the
  request waits for them), finished rows at least every `FLUSH_S`.
* Intents ahead (the local engine, `send_ahead`): rows queued for the workers are
  `expect`ed; each commit of intents also commits those of the next rows queued,
  as many as began in the last `AHEAD_S` (at most `concurrency`), and when they are
  used up the next slice is committed at once, so at a steady rate a row begins
  without waiting for a commit (a wait is a pass through the event loop: 10-18 µs
  of CPU a row). A slice's rows not sent (answered by an identical request, left
  pending at a stop) are withdrawn; after a kill the rerun counts them among the
  rows that may have been paid twice.

A kill between commits loses at most the uncommitted finished rows (their
intents remain, so the rerun counts them). SQLite's journal makes a torn write
impossible to mistake for a committed one: a WAL cut mid-frame loses only its
uncommitted tail. Damage SQLite cannot repair (a cut database file, a file that
is not a database, a checkpoint from another format) is refused on open with a
one-line message. A lock file keeps two runs off one checkpoint.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import math
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from batchrun.base.errors import JobError

FLUSH_S = 0.2
# Intents committed ahead: as many as rows began in this long (the rate, not a burst, sizes a slice), so
# a stall leaves at most about this much of the rate's rows counted in flight though never sent.
AHEAD_S = 0.005
# Once an intent waits, the commit starts this much later, so the rows admitted meanwhile share it:
# about 30 intents a commit at concurrency 64 (`batchrun bench`), each commit costing tens of µs of
# CPU whatever its size. A request waits this much longer, once, before it is sent.
GATHER_S = 0.001
WAL_CHECKPOINT_S = 1.0  # how often, while commits are made, the WAL's pages are moved to the database
WAL_AUTOCHECKPOINT_PAGES = 1000  # SQLite's default, for writes outside a run's flush loop
SCHEMA_VERSION = "3"  # bump when a table changes; a checkpoint of another version is refused
DB_NAME = "checkpoint.sqlite"

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
    finished_at REAL NOT NULL,
    shared_from TEXT,
    repairs INTEGER NOT NULL,
    request_hash INTEGER,
    image_paths TEXT
);
CREATE TABLE IF NOT EXISTS inflight (idx INTEGER PRIMARY KEY, started_at REAL NOT NULL);
"""
# Answer bodies as received, kept only for jobs with output.openai_batch; created on open, so
# a checkpoint from before it existed gains it without a new format.
_ANSWERS = (
    "CREATE TABLE IF NOT EXISTS answers (idx INTEGER PRIMARY KEY, status_code INTEGER NOT NULL,"
    " request_id TEXT, body BLOB NOT NULL)"
)
# What `batchrun report` draws, added to checkpoints of format 3 when they are opened, so an
# older one still resumes (its rows simply lack them). Columns of `rows` after its last one,
# in RowRecord's order (`cached_tokens` too, added later the same way: rows are written by column
# name); `limiter` holds one line per second of wall time that saw an attempt.
_REPORT_COLUMNS = {"started_at": "REAL", "attempt_log": "TEXT", "cached_tokens": "INTEGER"}
_LIMITER_TABLE = """
CREATE TABLE IF NOT EXISTS limiter (
    second INTEGER PRIMARY KEY,
    limit_min INTEGER NOT NULL,
    limit_max INTEGER NOT NULL,
    limit_last INTEGER NOT NULL,
    paused_s REAL NOT NULL,
    rate REAL
)
"""
# The paced rate (requests/s, NULL while not pacing) came later: a limiter table without it gains it on open.
_LIMITER_RATE = "ALTER TABLE limiter ADD COLUMN rate REAL"


@dataclass(slots=True)  # made for every row: slots make it and read it faster
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
    shared_from: str | None = None  # the row whose identical request answered this one (nothing was sent)
    repairs: int = 0  # follow-up asks after answers that failed output.schema
    request_hash: int | None = None  # see fingerprint.row_hash; None when the row could not be rendered
    image_paths: str | None = None  # JSON list of the files the row's images were written to
    started_at: float | None = None  # wall time of the first attempt; None when nothing was sent
    attempt_log: str | None = None  # see timeline.AttemptLog: each attempt's time and outcome
    cached_tokens: int | None = None  # of prompt_tokens, read from the provider's prompt cache (docs/caching.md)
    # (status_code, request_id, body as JSON bytes): kept in the `answers` table, not in `rows`
    answer: tuple[int, str | None, bytes] | None = field(default=None, repr=False)


# sqlite3 binds int, float and str as they are but looks every other value up as a possible adapter first,
# and None, in half of a row's columns, failed that look-up (two attribute errors raised and cleared) at
# ~0.2 µs each. Registered, None is bound as NULL as before, straight away (`{}.get(None)` is None).
sqlite3.register_adapter(type(None), dict[None, None]().get)

ROW_COLUMNS = [name for name in RowRecord.__dataclass_fields__ if name != "answer"]
_row_values = operator.attrgetter(*ROW_COLUMNS)  # a record's values in column order, in C
# Rows written in groups of this many a statement: one step of SQLite's (and one release of Python's lock)
# for the group, not one a row.
ROWS_A_STATEMENT = 32


def _statements(head: str, row: str, tail: str = "", sep: str = ", ") -> tuple[str, str]:
    """The statement for one row and for ROWS_A_STATEMENT rows: `head`, `row` once or repeated, `tail`."""
    return head + row + tail, head + sep.join([row] * ROWS_A_STATEMENT) + tail


# Named: columns added on open follow the table's own order, which a checkpoint's history decides.
_INSERT_ROWS = _statements(
    f"INSERT OR REPLACE INTO rows ({', '.join(ROW_COLUMNS)}) VALUES ", f"({', '.join('?' * len(ROW_COLUMNS))})"
)
_INSERT_INTENTS = _statements("INSERT OR REPLACE INTO inflight VALUES ", "(?, ?)")
_DELETE_INTENTS = _statements("DELETE FROM inflight WHERE idx IN (", "?", ")")
# A second written twice (a run resumed within it) keeps the extremes and the later state.
_MERGE_LIMITER = """
INSERT INTO limiter VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(second) DO UPDATE SET
    limit_min = MIN(limit_min, excluded.limit_min), limit_max = MAX(limit_max, excluded.limit_max),
    limit_last = excluded.limit_last, paused_s = MAX(paused_s, excluded.paused_s),
    rate = COALESCE(excluded.rate, rate)
"""


class _NeedsUpdate(JobError):
    """A checkpoint of an earlier batchrun, without the tables added since: opened read-only, it cannot gain them."""


class Checkpoint:
    @classmethod
    def for_reading(cls, folder: Path) -> Checkpoint:
        """The checkpoint opened read-only (status, report: reading needs no write access), unless it was written
        by an earlier batchrun: that one is brought up to date first, which needs write access once."""
        try:
            return cls(folder, read_only=True)
        except _NeedsUpdate:
            return cls(folder)

    def __init__(self, folder: Path, durable: bool = True, read_only: bool = False) -> None:
        """`read_only`: for reading an existing checkpoint (status, report), which needs no write access;
        nothing is created, brought up to date or locked."""
        if not read_only:
            folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        # durable=False is for `batchrun bench` only, to measure what durability costs:
        # the database lives in memory and no request waits for a commit.
        self.durable = durable
        self.read_only = read_only
        try:
            self._db = _connect_read_only(folder / DB_NAME) if read_only else _connect(folder / DB_NAME, durable)
        except sqlite3.DatabaseError as e:
            raise JobError(_open_failure(folder, e)) from None
        try:
            if read_only:
                self._check_existing()
            else:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # durable against a kill; WAL keeps it consistent
                self._open_or_create()
                self._db.execute(_ANSWERS)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise JobError(_open_failure(folder, e)) from None
        except JobError:
            self._db.close()
            raise
        self._lock = threading.Lock()  # one thread at a time on the connection
        self._lock_file: int | None = None
        self._refusing = False
        self.failure: str | None = None  # why the checkpoint can no longer be written (disk full, read-only)
        self.failed = anyio.Event()
        self.awaiting_answer: set[int] = set()  # begun in this run, not finished: at most `concurrency` rows
        self._intents: list[tuple[int, float]] = []
        self._finished: list[RowRecord] = []
        self._withdrawn: list[int] = []
        self._limiter: list[tuple[int, int, int, int, float, float | None]] = []
        # Rows waiting for their intent's commit: a future each, as asyncio.Event would make, without
        # its bookkeeping (a waiter leaving scans all the others: quadratic in the rows of a commit).
        self._intent_waiters: list[asyncio.Future[None]] = []
        self._wake = anyio.Event()
        self._most_ahead = 0  # intents committed ahead at most (0: none; `send_ahead`)
        self._upcoming: dict[int, None] = {}  # rows queued for the workers, in order, intents not committed
        self._ahead: set[int] = set()  # intents committed ahead, rows not begun
        self._begun = 0  # rows begun since the last slice was committed
        self._sliced_at = time.monotonic()
        self._last_flush = time.monotonic()
        self._wal_checkpointer: _WalCheckpointer | None = None  # while `flush_loop` runs
        self._last_wal_checkpoint = time.monotonic()

    def _open_or_create(self) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:  # new: the schema and its version in one transaction, so a kill leaves none or both
            self._db.executescript(
                f"BEGIN; {_SCHEMA} INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
            )
            self._add_report_tables()
            return
        self._check_existing()
        self._add_report_tables()

    def _check_existing(self) -> None:
        """Refuses a checkpoint that is cut short, damaged or of another format."""
        (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        if (self.folder / DB_NAME).stat().st_size % page_size:  # SQLite writes whole pages only
            raise sqlite3.DatabaseError("its database file is cut short")
        problem = self._db.execute("PRAGMA quick_check").fetchone()[0]
        if problem != "ok":
            raise sqlite3.DatabaseError(problem.splitlines()[-1] if problem.startswith("***") else problem)
        found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = found[0] if found else "1"  # format 1 did not record its version
        if version != SCHEMA_VERSION:
            raise JobError(
                f"{self.folder}: the checkpoint was written in format {version}, this batchrun reads format "
                f"{SCHEMA_VERSION}; run again with --restart to start over, or use the batchrun that wrote it"
            )
        if self.read_only and not self._has_report_tables():
            raise _NeedsUpdate(self.folder)

    def _has_report_tables(self) -> bool:
        have = {r[1] for r in self._db.execute("PRAGMA table_info(rows)")}
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        return set(_REPORT_COLUMNS) <= have and {"limiter", "answers"} <= tables

    def _add_report_tables(self) -> None:
        have = {r[1] for r in self._db.execute("PRAGMA table_info(rows)")}
        missing = [(name, kind) for name, kind in _REPORT_COLUMNS.items() if name not in have]
        limiter = {r[1] for r in self._db.execute("PRAGMA table_info(limiter)")}
        if not missing and "rate" in limiter:
            return
        self._db.execute("BEGIN")
        for name, kind in missing:
            self._db.execute(f"ALTER TABLE rows ADD COLUMN {name} {kind}")
        if not limiter:
            self._db.execute(_LIMITER_TABLE)
        elif "rate" not in limiter:
            self._db.execute(_LIMITER_RATE)
        self._db.execute("COMMIT")

    def lock_for_run(self) -> None:
        """Only one run at a time may use a checkpoint: two would pay for every row twice."""
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JobError(
                f"{self.folder}: another batchrun run is using this checkpoint; wait for it to end or stop it"
            ) from None
        self._lock_file = fd

    def run_in_progress(self) -> bool:
        if self.read_only:  # a lock only a run takes; its file never made here
            try:
                fd = os.open(self.folder / "lock", os.O_RDONLY)
            except FileNotFoundError:
                return False
        else:
            fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock this call took
        return False

    # --- reading --------------------------------------------------------------------

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock, self._writable():
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

    def answers_in_range(self, lo: int, hi: int) -> dict[int, tuple[int, str | None, bytes]]:
        """The kept answer bodies of rows in [lo, hi) (output.openai_batch)."""
        rows = self._query(
            "SELECT idx, status_code, request_id, body FROM answers WHERE idx >= ? AND idx < ?", (lo, hi)
        )
        return {idx: (status, request_id, body) for idx, status, request_id, body in rows}

    def totals(self) -> dict[str, Any]:
        ok, errors, prompt, completion, last, images, cached = self._query(
            "SELECT COALESCE(SUM(status = 'ok'), 0), COALESCE(SUM(status = 'error'), 0),"
            " SUM(prompt_tokens), SUM(completion_tokens), MAX(finished_at),"
            " SUM(CASE WHEN shared_from IS NULL THEN json_array_length(image_paths) END),"
            " SUM(CASE WHEN shared_from IS NULL THEN cached_tokens END) FROM rows"
        )[0]
        return {
            "ok": ok,
            "error": errors,
            "prompt_tokens": prompt or 0,
            "completion_tokens": completion or 0,
            "last_finished_at": last,
            "images": images or 0,
            "cached_tokens": cached or 0,
        }

    def count_interrupted(self) -> int:
        """Rows whose request was sent by an earlier run that stopped before their answer was recorded.

        They stay counted until they finish, so a run killed again before re-sending them still reports them.
        """
        return int(self._query("SELECT COUNT(*) FROM inflight")[0][0])

    def error_classes(self) -> dict[str, int]:
        rows = self._query("SELECT error_class, COUNT(*) FROM rows WHERE status = 'error' GROUP BY 1 ORDER BY 2 DESC")
        return {str(cls): int(n) for cls, n in rows}

    def report_bounds(self) -> tuple[Any, ...]:
        """Last row index, first start, last finish, most tokens in and out."""
        return self._query(
            "SELECT MAX(idx), MIN(COALESCE(started_at, finished_at)), MAX(finished_at),"
            " MAX(prompt_tokens), MAX(completion_tokens) FROM rows"
        )[0]

    def limiter_seconds(self) -> list[tuple[int, int, float, float | None]]:
        """(second, lowest in-flight limit, seconds paused, paced rate or None) of each second recorded, in order."""
        return self._query("SELECT second, limit_min, paused_s, rate FROM limiter ORDER BY second")

    def hashes_in_range(self, lo: int, hi: int, ok_only: bool = False) -> dict[int, int | None]:
        """Request hash of each finished row in [lo, hi)."""
        sql = "SELECT idx, request_hash FROM rows WHERE idx >= ? AND idx < ?" + (
            " AND status = 'ok'" if ok_only else ""
        )
        return dict(self._query(sql, (lo, hi)))

    # --- writing --------------------------------------------------------------------

    async def begin(self, idx: int) -> None:
        """Durably record that `idx` is about to be requested; returns once committed.

        After `refuse_new_rows` it records nothing and waits to be cancelled: the row stays pending.
        """
        if idx in self._ahead:  # committed with a slice ahead: nothing to wait for
            self._ahead.discard(idx)
            if not self._refusing:
                self.awaiting_answer.add(idx)
                self._begun += 1
                if not self._ahead:
                    self._commit_slice()
                return
            self.withdraw(idx)
        elif await self.commit_intents([idx]):  # not committed ahead (the first rows, after a lull): rare
            return
        await anyio.sleep_forever()

    def send_ahead(self, most: int) -> None:
        """Commit the intents of `expect`ed rows ahead of their `begin`, at most `most` at a time."""
        self._most_ahead = most if self.durable else 0

    def expect(self, idx: int) -> None:
        """Row `idx` is queued for the workers, after the rows expected before it."""
        if self._most_ahead:
            self._upcoming[idx] = None

    def give_back_ahead(self) -> None:
        """The run sends no more: intents committed ahead of rows never begun are withdrawn."""
        for idx in self._ahead:
            self.withdraw(idx)
        self._ahead.clear()
        self._upcoming.clear()

    async def commit_intents(self, indexes: list[int]) -> bool:
        """`begin` for several rows in one commit, returning False rather than waiting to be cancelled when
        they may not be sent (Ctrl-C, or a commit that failed): the Ray coordinator answers a worker's sync
        with it."""
        if self._refusing:
            return False
        committed = self._ask_commit(indexes)
        try:
            if committed is not None:
                await committed
        except BaseException:  # cancelled before their requests went out: not in flight after all
            self._withdraw_all(indexes)
            raise
        return self._may_send(indexes, committed is not None)

    def _ask_commit(self, indexes: list[int]) -> asyncio.Future[None] | None:
        """The intents queued for the next commit, and the future it resolves (None: not durable, no commit)."""
        if not self.durable:
            return None
        now = time.time()
        self._intents += [(idx, now) for idx in indexes]
        if self._upcoming:
            for idx in indexes:
                self._upcoming.pop(idx, None)
        committed = asyncio.get_running_loop().create_future()
        self._intent_waiters.append(committed)
        self._wake.set()
        return committed

    def _may_send(self, indexes: list[int], committed: bool) -> bool:
        """After the intents' commit (`committed`: there was one): whether the rows may be sent."""
        if committed and self.failure is not None:  # the intents were not recorded: the rows must not be sent
            return False
        if committed and self._refusing:  # Ctrl-C came while the intents were being committed: not sent
            self._withdraw_all(indexes)
            return False
        self.awaiting_answer.update(indexes)
        self._begun += len(indexes)
        return True

    def _withdraw_all(self, indexes: list[int]) -> None:
        for idx in indexes:
            self.withdraw(idx)

    def refuse_new_rows(self) -> None:
        """Ctrl-C: no row that has not begun may be sent any more."""
        self._refusing = True

    def finish(self, record: RowRecord) -> None:
        self.awaiting_answer.discard(record.idx)
        if self._upcoming or self._ahead:  # ended without being sent (an identical request's answer)
            self._upcoming.pop(record.idx, None)
            self._ahead.discard(record.idx)
        self._finished.append(record)
        if len(self._finished) >= 512:
            self._wake.set()

    def record_limiter(self, seconds: list[tuple[int, int, int, int, float, float | None]]) -> None:
        """(second, limit min, max, last, seconds paused, paced rate) lines of timeline.LimiterTimeline, merged."""
        self._limiter.extend(seconds)

    def withdraw(self, idx: int) -> None:
        """The request of `idx` was answered without cost (e.g. 401): it is pending, not in flight."""
        self.awaiting_answer.discard(idx)
        self._withdrawn.append(idx)

    def forget_errors(self) -> int:
        """--retry-failed: drop rows that ended in error so they are requested again."""
        with self._lock, self._writable():
            return self._db.execute("DELETE FROM rows WHERE status = 'error'").rowcount

    def forget(self, indexes: list[int]) -> None:
        """Drop these finished rows so they are requested again (--rerun-changed, answers that failed output.schema)."""
        with self._lock, self._writable():
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM rows WHERE idx = ?", [(i,) for i in indexes])
            self._db.executemany("DELETE FROM answers WHERE idx = ?", [(i,) for i in indexes])
            self._db.execute("COMMIT")

    async def flush_loop(self) -> None:
        """Runs for the whole run; cancel it after a final `flush()`.

        Meanwhile its commits are made on the event loop and the WAL checkpoints in a thread (_WalCheckpointer).
        """
        if self.durable and self._wal_checkpointer is None:
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._wal_checkpointer = _WalCheckpointer(self.folder / DB_NAME)
        loop = asyncio.get_running_loop()
        try:
            while True:
                wake = self._wake
                timer = loop.call_later(FLUSH_S, wake.set)  # a timer, not a cancel scope: a few µs a commit less
                await wake.wait()
                timer.cancel()
                self._wake = anyio.Event()
                await anyio.sleep(GATHER_S)  # intents asked for meanwhile join the same commit
                await self.flush()
        finally:
            if self._wal_checkpointer is not None:
                self._wal_checkpointer.stop()
                self._wal_checkpointer = None
                self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")

    async def flush(self) -> None:
        """Commit what is pending. If that fails (disk full, read-only), `failure` says why and nothing more is sent."""
        waiters, self._intent_waiters = self._intent_waiters, []
        slice_ = self._next_slice() if self._intents else []
        self._commit(slice_)
        for waiter in waiters:
            if not waiter.done():  # done: its row was cancelled meanwhile
                waiter.set_result(None)

    def _commit_slice(self) -> None:
        """The next slice's intents committed now, with whatever else is pending."""
        if self._upcoming and self.failure is None:
            self._commit(self._next_slice())

    def _next_slice(self) -> list[int]:
        """The next rows queued, as many as began in the last AHEAD_S (at most `most`), their intents pending."""
        now = time.monotonic()
        begun, elapsed = self._begun, now - self._sliced_at
        self._begun, self._sliced_at = 0, now
        size = min(self._most_ahead, len(self._upcoming), math.ceil(begun * AHEAD_S / max(elapsed, 1e-6)))
        indexes = list(itertools.islice(self._upcoming, size))
        for idx in indexes:
            del self._upcoming[idx]
        wall = time.time()
        self._intents += [(idx, wall) for idx in indexes]
        return indexes

    def _commit(self, slice_: list[int]) -> None:
        """Commit what is pending; `slice_`: rows whose intents it carries ahead of their `begin`."""
        batch = self._take()
        if any(batch) and self.failure is None:
            try:
                self._write(*batch)
            except JobError as e:
                self.failure = str(e)
                self._refusing = True
                self.failed.set()
                return
            self._tidy_wal()
        if self.failure is None:
            self._ahead.update(slice_)

    def _tidy_wal(self) -> None:
        """Every WAL_CHECKPOINT_S of commits, the WAL's pages go to the database (see _WalCheckpointer)."""
        now = time.monotonic()
        if self._wal_checkpointer is not None and now - self._last_wal_checkpoint >= WAL_CHECKPOINT_S:
            self._last_wal_checkpoint = now
            self._wal_checkpointer.ask()

    def flush_now(self) -> None:
        """Synchronous final flush, for shutdown paths outside the event loop."""
        self._write(*self._take())

    def _take(self) -> Batch:
        batch = (self._intents, self._finished, self._withdrawn, self._limiter)
        self._intents, self._finished, self._withdrawn, self._limiter = [], [], [], []
        return batch

    @contextmanager
    def _writable(self) -> Iterator[None]:
        """A write that fails (disk full, read-only, damage found) as a one-line JobError; its transaction undone."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            if self._db.in_transaction:
                self._db.rollback()
            raise JobError(_open_failure(self.folder, e)) from None

    def _write(
        self,
        intents: list[tuple[int, float]],
        finished: list[RowRecord],
        withdrawn: list[int],
        limiter: list[tuple[Any, ...]] | None = None,
    ) -> None:
        with self._lock, self._writable():
            self._db.execute("BEGIN")
            _grouped(self._db, _INSERT_INTENTS, intents)
            _grouped(self._db, _INSERT_ROWS, list(map(_row_values, finished)))
            gone = [(r.idx,) for r in finished] + [(i,) for i in withdrawn]
            kept = [(r.idx, *r.answer) for r in finished if r.answer]
            if kept:  # only jobs with output.openai_batch keep answers; the others pay nothing here
                self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)", kept)
            _grouped(self._db, _DELETE_INTENTS, gone)
            self._db.executemany(_MERGE_LIMITER, limiter or [])
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None


Batch = tuple[list[tuple[int, float]], list[RowRecord], list[int], list[tuple[Any, ...]]]


def _grouped(db: sqlite3.Connection, statements: tuple[str, str], values: Sequence[tuple[Any, ...]]) -> None:
    """Each of `values` through (statement for one, statement for ROWS_A_STATEMENT): whole groups, then the rest."""
    one, group = statements
    whole = len(values) - len(values) % ROWS_A_STATEMENT
    if whole:
        db.executemany(
            group,
            (
                tuple(itertools.chain.from_iterable(values[i : i + ROWS_A_STATEMENT]))
                for i in range(0, whole, ROWS_A_STATEMENT)
            ),
        )
    if whole < len(values):
        db.executemany(one, values[whole:])


class _WalCheckpointer:
    """Moves committed pages from the WAL into the database, in a thread of its own with its own connection.

    The commits themselves run on the event loop: a commit in a worker thread released and took back
    Python's lock around every statement, against a busy event loop, which cost about 20 µs of CPU a row
    on `batchrun bench`. What can take long on a slow disk is the WAL checkpoint (it syncs the
    files), which SQLite would otherwise make inside a commit every 1000 pages: it is made here instead,
    `PASSIVE` (it never blocks a commit).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._asked = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="batchrun-checkpoint", daemon=True)
        self._thread.start()

    def ask(self) -> None:
        self._asked.set()

    def stop(self) -> None:
        self._stopping = True
        self._asked.set()
        self._thread.join()

    def _serve(self) -> None:
        db: sqlite3.Connection | None = None
        while True:
            self._asked.wait()
            self._asked.clear()
            if self._stopping:
                break
            try:
                db = db or sqlite3.connect(self._path, isolation_level=None)
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:  # a full or read-only disk: the next commit says so, in its words
                pass
        if db is not None:
            db.close()


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """The database opened for reading only. A reader of a WAL database makes its `-shm` file if it is not
    there; on a read-only file system it cannot, and nothing can be writing there either: then the file is
    read as it stands."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        return _reading(uri)
    except sqlite3.OperationalError:
        return _reading(uri + "&immutable=1")


def _reading(uri: str) -> sqlite3.Connection:
    db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1")
    except sqlite3.Error:
        db.close()
        raise
    return db


def _connect(path: Path, durable: bool) -> sqlite3.Connection:
    return sqlite3.connect(path if durable else ":memory:", check_same_thread=False, isolation_level=None)


def _open_failure(folder: Path, e: sqlite3.DatabaseError) -> str:
    """Three stops told apart: only a damaged checkpoint suggests --restart, which gives up its answers."""
    name = getattr(e, "sqlite_errorname", "")
    if name.startswith("SQLITE_FULL") or "disk is full" in str(e):
        return f"{folder}: the disk is full; free some space and run again (the answers stored so far are kept)"
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_IOERR")):
        return (
            f"{folder}: the checkpoint cannot be written ({e}): a read-only folder or file system? "
            "Make it writable and run again (its answers are kept)"
        )
    return (
        f"{folder}: the checkpoint is damaged ({e}); run again with --restart to start over "
        "(its stored answers are lost)"
    )


def checkpoint_folder(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".batchrun")

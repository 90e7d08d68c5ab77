"""Picking a job up where it stopped: finding its checkpoint, checking the job still
matches it, and telling the user where things stand (`batchrun status`).

The checkpoint lives beside the output (`<output>.batchrun/`). A hidden pointer
beside the job file remembers where, so changing `output.path` moves the
checkpoint along instead of starting over.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from batchrun import openai_batch, output, spend
from batchrun.checkpoint import DB_NAME, Checkpoint, checkpoint_folder
from batchrun.errors import JobError
from batchrun.fingerprint import compare
from batchrun.inputs import InputTable
from batchrun.render import Renderer
from batchrun.spec import Job
from batchrun.structured import AnswerParser


@dataclass
class ResumeFlags:
    restart: bool = False
    rerun_changed: bool = False
    retry_failed: bool = False


def open_for_run(
    job: Job, table: InputTable, renderer: Renderer, flags: ResumeFlags, durable: bool = True
) -> tuple[Checkpoint, list[str]]:
    """The job's checkpoint, locked for this run and matching the job file; notes say what was done to it.

    Raises JobError, before any request, when the job changed in a way that changes requests
    and neither --restart nor --rerun-changed was given.
    """
    written = _written_batch_output(job) if flags.restart else None
    folder, notes = _prepare_folder(job, flags.restart)
    checkpoint = Checkpoint(folder, durable)
    try:
        checkpoint.lock_for_run()
        if written is not None:  # the new checkpoint still knows the Batch output file the job wrote
            checkpoint.set_meta(openai_batch.WRITTEN_META, written)
        comparison, current = compare(
            checkpoint, job, table, renderer, forget_changed=flags.rerun_changed, ok_only=flags.retry_failed
        )
        if comparison.changed_rows and not flags.rerun_changed:
            raise JobError(_refusal(job, comparison.changes, comparison.changed_rows, comparison.finished_rows))
        current.save(checkpoint)
        if comparison.changes:
            notes.append(_accepted(comparison.changes, comparison.changed_rows, comparison.finished_rows))
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint, notes


def _written_batch_output(job: Job) -> str | None:
    """The stamps of the output.openai_batch files the job wrote, from the checkpoint --restart discards."""
    folder = find_folder(job)
    if job.openai_batch_path is None or not (folder / DB_NAME).exists():
        return None
    try:
        checkpoint = Checkpoint(folder)
    except JobError:
        return None  # unreadable: the file is then refused as any other
    try:
        return checkpoint.get_meta(openai_batch.WRITTEN_META)
    finally:
        checkpoint.close()


def _refusal(job: Job, changes: list[str], changed: int, finished: int) -> str:
    keep = f" and keep the other {finished - changed} answers" if changed < finished else ""
    return (
        f"{job.path}: the job changed since its checkpoint ({'; '.join(changes)}): {changed} of {finished} "
        f"finished rows would now be sent differently. Run again with --rerun-changed to send those {changed} "
        f"rows again{keep}, or with --restart to start over"
    )


def _accepted(changes: list[str], changed: int, finished: int) -> str:
    what = "; ".join(changes)
    if changed:
        return f"--rerun-changed ({what}): {changed} rows will be sent again, {finished - changed} answers kept"
    return f"the job changed ({what}), but not the request of any answer kept; the answers are kept"


# --- where the checkpoint is ---------------------------------------------------------


def _pointer(job: Job) -> Path:
    return job.path.with_name(f".{job.path.name}.checkpoint")


def find_folder(job: Job) -> Path:
    """Beside the output; or where the pointer says, if the output path changed since."""
    folder = checkpoint_folder(job.output_path)
    if (folder / DB_NAME).exists():
        return folder
    try:
        previous = Path(_pointer(job).read_text(encoding="utf-8").strip())
    except OSError:
        return folder
    return previous if (previous / DB_NAME).exists() else folder


def _prepare_folder(job: Job, restart: bool) -> tuple[Path, list[str]]:
    folder = checkpoint_folder(job.output_path)
    found = find_folder(job)
    notes: list[str] = []
    if restart:
        notes += [_discard(f) for f in dict.fromkeys((found, folder)) if f.exists()]
    elif found != folder:
        if folder.exists():
            shutil.rmtree(folder)  # a checkpoint folder without a database holds nothing
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(found), str(folder))
        notes.append(f"the output path changed: moved the checkpoint from {found} to {folder}")
    try:
        pointer = _pointer(job)
        if not job.path.is_file():
            pass  # a job given as a dict in Python: no job file to keep a pointer beside
        elif not pointer.exists() or pointer.read_text(encoding="utf-8").strip() != str(folder):
            pointer.write_text(f"{folder}\n", encoding="utf-8")
    except OSError:
        pass  # a read-only job folder: only a changed output path will start over
    return folder, notes


def _discard(folder: Path) -> str:
    try:
        checkpoint = Checkpoint(folder)
    except JobError:
        what = "a checkpoint it could not read"
    else:
        try:
            if checkpoint.run_in_progress():
                raise JobError(f"{folder}: another batchrun run is using this checkpoint; stop it before --restart")
            totals = checkpoint.totals()
        finally:
            checkpoint.close()
        what = f"a checkpoint with {totals['ok']} ok and {totals['error']} error rows"
    # One rename first, so a kill while deleting never leaves half a checkpoint in place.
    trash = folder.with_name(f"{folder.name}.discarded-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash)
    return f"--restart: discarded {what} ({folder})"


# --- batchrun status -------------------------------------------------------------------


@dataclass
class JobStatus:
    """Where a job stands (`batchrun status`, `batchrun.status`): rows, tokens, cost and the checkpoint's place."""

    job: str
    rows: int
    done: int
    ok: int
    failed: int
    pending: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None  # None without pricing
    checkpoint: Path  # where it is, or will be once the job starts
    lines: list[str]  # what `batchrun status` prints


def status_lines(job: Job) -> list[str]:
    return job_status(job).lines


def job_status(job: Job) -> JobStatus:
    table = InputTable.for_job(job)
    rows = table.count()
    folder = find_folder(job)
    name = job.spec.name
    if not (folder / DB_NAME).exists():
        lines = [f"job {name}: not started; {rows} rows pending", f"checkpoint: {folder} (made by the first run)"]
        cost = 0.0 if job.spec.pricing is not None else None
        return JobStatus(name, rows, 0, 0, 0, rows, 0, 0, cost, folder, lines)
    checkpoint = Checkpoint(folder)
    try:
        return _status(job, table, rows, checkpoint)
    finally:
        checkpoint.close()


def _status(job: Job, table: InputTable, rows: int, checkpoint: Checkpoint) -> JobStatus:
    totals = checkpoint.totals()
    done = checkpoint.count_finished(0, rows)
    parser = AnswerParser.for_spec(job.spec)
    invalid = sum(len(f) for f in output.failed_answers(checkpoint, parser, rows)) if parser else 0
    ok, failed = totals["ok"] - invalid, totals["error"] + invalid
    classes = ", ".join(f"{cls} {n}" for cls, n in checkpoint.error_classes().items())
    lines = [
        f"job {job.spec.name}: {done} of {rows} rows done: {ok} ok, "
        f"{failed} failed" + (f" ({classes})" if classes else "") + f"; {rows - done} pending"
    ]
    if invalid:
        lines.append(f"{invalid} of the failed rows are answers that did not parse or match output.schema")
    lines.append(f"tokens: {totals['prompt_tokens']} in / {totals['completion_tokens']} out")
    spent = None
    if (pricing := job.spec.pricing) is not None:
        spent = spend.cost(pricing, totals["prompt_tokens"], totals["completion_tokens"], totals["images"])
        limit = job.spec.run.max_cost
        budget = f" of run.max_cost {spend.money(limit, pricing)}" if limit is not None else ""
        lines.append(f"cost so far: {spend.money(spent, pricing)}{budget}")
    if totals["last_finished_at"] is not None:
        when = datetime.fromtimestamp(totals["last_finished_at"]).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"last row finished: {when} ({_ago(time.time() - totals['last_finished_at'])})")
    in_flight = checkpoint.count_interrupted()
    if checkpoint.run_in_progress():
        lines.append(f"a run is going on now: {in_flight} rows in flight")
    elif in_flight:
        lines.append(
            f"{in_flight} rows were in flight when the last run stopped "
            "(sent, answer not recorded: the only ones that may be paid twice)"
        )
    lines.append(_match_line(job, table, checkpoint))
    lines.append(f"checkpoint: {checkpoint.folder}")
    if job.output_url is not None:
        lines.append(f"output: {job.output_url} (uploaded when a run completes)")
    return JobStatus(
        job.spec.name,
        rows,
        done,
        ok,
        failed,
        rows - done,
        totals["prompt_tokens"],
        totals["completion_tokens"],
        spent,
        checkpoint.folder,
        lines,
    )


def _match_line(job: Job, table: InputTable, checkpoint: Checkpoint) -> str:
    comparison, _ = compare(checkpoint, job, table, Renderer(job, table.columns))
    if not comparison.changes:
        return "job file: matches the checkpoint"
    what = "; ".join(comparison.changes)
    if not comparison.changed_rows:
        return f"job file: changed ({what}), but no finished row's request did; the next run keeps every answer"
    return (
        f"job file: changed ({what}): {comparison.changed_rows} of {comparison.finished_rows} finished rows "
        "would be sent differently; the next run needs --rerun-changed or --restart"
    )


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"

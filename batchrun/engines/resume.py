"""Picking a job up where it stopped: finding its checkpoint, checking the job still
matches it, and telling the user where things stand (`batchrun status`).

The checkpoint lives beside the output (`<output>.batchrun/`), derived from the
output path alone, so a copied job folder or a second copy of a job never reaches
another's answers, and nothing is written beside the job file. When `output.path`
changes, the run is refused while a checkpoint of this job file exists at the old
place (remembered in the user's state folder, not beside the job): the user moves
it explicitly with `--adopt-checkpoint OLD`, or starts over with `--restart`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson

from batchrun.base import storage
from batchrun.base.errors import JobError
from batchrun.base.naming import Naming, flag
from batchrun.flow import spend
from batchrun.flow.learned import META_KEY as LEARNED_META
from batchrun.job import openai_batch
from batchrun.job.inputs import InputTable
from batchrun.job.render import Renderer
from batchrun.job.spec import Job
from batchrun.job.structured import AnswerParser
from batchrun.ledger.checkpoint import DB_NAME, Checkpoint, checkpoint_folder
from batchrun.pipeline.fingerprint import Comparison, compare
from batchrun.protocols import protocol_for
from batchrun.results import output


@dataclass
class ResumeFlags:
    restart: bool = False
    rerun_changed: bool = False
    retry_failed: bool = False
    adopt_checkpoint: Path | None = None  # --adopt-checkpoint: move this checkpoint beside the output first
    named: Naming = flag  # how messages name these: flags (the CLI) or keyword arguments (Python)


def open_for_run(
    job: Job, table: InputTable, renderer: Renderer, flags: ResumeFlags, durable: bool = True
) -> tuple[Checkpoint, list[str]]:
    """The job's checkpoint, locked for this run and matching the job file; notes say what was done to it.

    Raises JobError, before any request, when the job changed in a way that changes requests
    and neither --restart nor --rerun-changed was given.
    """
    written = _written_batch_output(job) if flags.restart else None
    folder, notes = _prepare_folder(job, table, renderer, flags)
    checkpoint = Checkpoint(folder, durable)
    try:
        checkpoint.lock_for_run()
        if written is not None:  # the new checkpoint still knows the Batch output file the job wrote
            checkpoint.set_meta(openai_batch.WRITTEN_META, written)
        comparison, current = compare(
            checkpoint, job, table, renderer, forget_changed=flags.rerun_changed, ok_only=flags.retry_failed
        )
        if comparison.changed_rows and not flags.rerun_changed:
            raise JobError(_refusal(job, comparison, flags.named))
        current.save(checkpoint)
        if comparison.changes:
            notes.append(_accepted(comparison.changes, comparison.changed_rows, comparison.finished_rows, flags.named))
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint, notes


def _written_batch_output(job: Job) -> str | None:
    """The stamps of the output.openai_batch files the job wrote, from the checkpoint --restart discards."""
    folder = checkpoint_folder(job.output_path)
    if job.openai_batch_path is None or not (folder / DB_NAME).exists():
        return None
    try:
        checkpoint = Checkpoint.for_reading(folder)
    except JobError:
        return None  # unreadable: the file is then refused as any other
    try:
        return checkpoint.get_meta(openai_batch.WRITTEN_META)
    finally:
        checkpoint.close()


def _refusal(job: Job, comparison: Comparison, named: Naming) -> str:
    changed, finished = comparison.changed_rows, comparison.finished_rows
    keep = f" and keep the other {finished - changed} answers" if changed < finished else ""
    return (
        f"{job.path}: the job changed since its checkpoint ({'; '.join(comparison.changes)}): {changed} of "
        f"{finished} finished rows would now be sent differently. Run again with {named('rerun_changed', True)} "
        f"to send those {changed} rows again{keep}, or with {named('restart', True)} to start over"
    )


def _accepted(changes: list[str], changed: int, finished: int, named: Naming) -> str:
    what = "; ".join(changes)
    if changed:
        rerun = named("rerun_changed", True)
        return f"{rerun} ({what}): {changed} rows will be sent again, {finished - changed} answers kept"
    return f"the job changed ({what}), but not the request of any answer kept; the answers are kept"


# --- where the checkpoint is ---------------------------------------------------------


def _last_place_file(job: Job) -> Path:
    """Where this job file's last checkpoint folder is noted, keyed by the job file's own path."""
    return storage.state_root() / "jobs" / hashlib.sha256(str(job.path).encode()).hexdigest()[:24]


def earlier_folder(job: Job) -> Path | None:
    """A checkpoint this job file used over the same input before `output.path` changed, if it is still there."""
    if not job.path.is_file():
        return None  # a job given as a dict in Python has no job file to remember
    try:
        noted, _, input_path = _last_place_file(job).read_text(encoding="utf-8").partition("\n")
    except OSError:
        return None
    folder, here = Path(noted), checkpoint_folder(job.output_path)
    if folder == here or input_path.strip() != job.input_path or (here / DB_NAME).exists():
        return None  # a job file pointed at another input and output is a new job
    return folder if (folder / DB_NAME).exists() else None


def _note_place(job: Job, folder: Path) -> None:
    """Only ever read to say where an earlier checkpoint is; never used to move one."""
    if not job.path.is_file():
        return
    try:
        place = _last_place_file(job)
        place.parent.mkdir(parents=True, exist_ok=True)
        with storage.replacing(place) as f:  # a link planted at `place` is replaced, never written through
            f.write(f"{folder}\n{job.input_path}\n".encode())
    except OSError:
        pass  # no writable home: only the hint about a changed output.path is lost


def _prepare_folder(job: Job, table: InputTable, renderer: Renderer, flags: ResumeFlags) -> tuple[Path, list[str]]:
    folder = checkpoint_folder(job.output_path)
    notes: list[str] = []
    if flags.adopt_checkpoint is not None:  # refused before --restart discards anything
        source = _adoptable(flags.adopt_checkpoint, folder, job, table, renderer, flags)
    named = flags.named
    if flags.restart and folder.exists():
        notes.append(_discard(folder, job, table, named))
    if flags.adopt_checkpoint is not None:
        notes.append(_adopt(source, folder, named))
    elif not flags.restart and (earlier := earlier_folder(job)) is not None:
        raise JobError(
            f"{job.path}: output.path changed, and this job's checkpoint is still at {earlier}; "
            f"run with {named('adopt_checkpoint', earlier)} to move it here and keep its answers, "
            f"or with {named('restart', True)} to start a new one"
        )
    _note_place(job, folder)
    return folder, notes


def _adoptable(given: Path, folder: Path, job: Job, table: InputTable, renderer: Renderer, flags: ResumeFlags) -> Path:
    """The checkpoint --adopt-checkpoint names, checked as the run will check it once moved: a refusal must
    come before the move, or the job it belongs to loses it (and pays again)."""
    source = given.resolve()
    named = flags.named
    if source.name.endswith(".parquet") and not (source / DB_NAME).exists():
        source = checkpoint_folder(source)  # the old output's path names its checkpoint too
    if source == folder:
        return source
    if not (source / DB_NAME).exists():
        raise JobError(f"{named('adopt_checkpoint', source)}: no batchrun checkpoint there ({DB_NAME} is missing)")
    if (folder / DB_NAME).exists() and not flags.restart:
        raise JobError(
            f"{named('adopt_checkpoint', source)}: {folder} already holds a checkpoint; "
            f"use {named('restart', True)} with it to discard that one first"
        )
    adopted = Checkpoint.for_reading(source)
    try:
        if adopted.run_in_progress():
            raise JobError(f"{named('adopt_checkpoint', source)}: another batchrun run is using it; wait for it to end")
        comparison, _ = compare(adopted, job, table, renderer, ok_only=flags.retry_failed)
    finally:
        adopted.close()
    if comparison.changed_rows and not flags.rerun_changed:
        raise JobError(
            f"{named('adopt_checkpoint', source)}: not moved: it does not match {job.path} "
            f"({'; '.join(comparison.changes)}): {comparison.changed_rows} of {comparison.finished_rows} finished "
            f"rows would now be sent differently; add {named('rerun_changed', True)} to adopt it and send those rows "
            "again, or leave it where it is"
        )
    return source


def _adopt(source: Path, folder: Path, named: Naming) -> str:
    """--adopt-checkpoint: the user's explicit move of a checkpoint folder (checked by `_adoptable`) here."""
    if source == folder:
        return f"{named('adopt_checkpoint', source)}: {folder} is already this output's checkpoint"
    if folder.exists():
        shutil.rmtree(folder)  # a checkpoint folder without a database holds nothing
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(folder))
    return f"{named('adopt_checkpoint', source)}: moved the checkpoint from {source} to {folder}"


def _discard(folder: Path, job: Job, table: InputTable, named: Naming) -> str:
    try:
        checkpoint = Checkpoint(folder)
    except JobError:
        what = "a checkpoint it could not read"
    else:
        try:
            if checkpoint.run_in_progress():
                raise JobError(
                    f"{folder}: another batchrun run is using this checkpoint; stop it before {named('restart', True)}"
                )
            ok, failed = _ok_and_failed(job, checkpoint, table.count())
        finally:
            checkpoint.close()
        what = f"a checkpoint with {ok} ok and {failed} error rows"
    # One rename first, so a kill while deleting never leaves half a checkpoint in place.
    trash = folder.with_name(f"{folder.name}.discarded-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash)
    return f"{named('restart', True)}: discarded {what} ({folder})"


def _ok_and_failed(job: Job, checkpoint: Checkpoint, rows: int) -> tuple[int, int]:
    """Rows ok and failed as the output counts them: a stored answer that fails output.schema is a failure."""
    totals = checkpoint.totals()
    parser = AnswerParser.for_spec(job.spec, protocol_for(job.spec.provider.api))
    invalid = sum(len(f) for f in output.failed_answers(checkpoint, parser, rows)) if parser else 0
    return totals["ok"] - invalid, totals["error"] + invalid


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


def job_status(job: Job, named: Naming = flag) -> JobStatus:
    """Where the job stands; what to do next names the settings as `named` does (flags, or keyword arguments)."""
    table = InputTable.for_job(job)
    rows = table.count()
    folder = checkpoint_folder(job.output_path)
    name = job.spec.name
    if not (folder / DB_NAME).exists():
        lines = [f"job {name}: not started; {rows} rows pending", _output_line(job)]
        lines.append(f"checkpoint: {folder} (made by the first run)")
        if (earlier := earlier_folder(job)) is not None:
            lines.append(
                f"output.path changed: this job's checkpoint is at {earlier}; "
                f"run with {named('adopt_checkpoint', earlier)} to move it here"
            )
        cost = 0.0 if job.spec.pricing is not None else None
        return JobStatus(name, rows, 0, 0, 0, rows, 0, 0, cost, folder, lines)
    checkpoint = Checkpoint.for_reading(folder)
    try:
        return _status(job, table, rows, checkpoint, named)
    finally:
        checkpoint.close()


def _learned_line(meta: str | None) -> str | None:
    """The relay's limits the last run learned (flow/learned.py), one key after another."""
    try:
        said = orjson.loads(meta or "[]")
    except orjson.JSONDecodeError:
        return None
    parts = [
        f"{w['key']} {w['requests']} per {w['window_s']:g} s ({w['source']})"
        for w in said
        if isinstance(w, dict) and {"key", "requests", "window_s", "source"} <= w.keys()
    ]
    return "the relay's limits: " + "; ".join(parts) if parts else None


def _status(job: Job, table: InputTable, rows: int, checkpoint: Checkpoint, named: Naming) -> JobStatus:
    totals = checkpoint.totals()
    done = checkpoint.count_finished(0, rows)
    ok, failed = _ok_and_failed(job, checkpoint, rows)
    invalid = failed - totals["error"]
    classes = ", ".join(f"{cls} {n}" for cls, n in checkpoint.error_classes().items())
    lines = [
        f"job {job.spec.name}: {done} of {rows} rows done: {ok} ok, "
        f"{failed} failed" + (f" ({classes})" if classes else "") + f"; {rows - done} pending"
    ]
    if invalid:
        lines.append(f"{invalid} of the failed rows are answers that did not parse or match output.schema")
    cached = f" ({totals['cached_tokens']} of them from the provider's cache)" if totals["cached_tokens"] else ""
    lines.append(f"tokens: {totals['prompt_tokens']} in{cached} / {totals['completion_tokens']} out")
    spent = None
    if (pricing := job.spec.pricing) is not None:
        spent = spend.cost(
            pricing, totals["prompt_tokens"], totals["completion_tokens"], totals["images"], totals["cached_tokens"]
        )
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
            "(sent or about to be, answer not recorded: the only ones that may be paid twice)"
        )
    if learned := _learned_line(checkpoint.get_meta(LEARNED_META)):
        lines.append(learned)
    lines.append(_match_line(job, table, checkpoint, named))
    lines.append(_output_line(job))
    lines.append(f"checkpoint: {checkpoint.folder}")
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


def _output_line(job: Job) -> str:
    if job.output_url is not None:
        return f"output: {job.output_url} (uploaded when a run completes)"
    return f"output: {job.output_path}"


def _match_line(job: Job, table: InputTable, checkpoint: Checkpoint, named: Naming) -> str:
    comparison, _ = compare(checkpoint, job, table, Renderer(job, table.columns))
    if not comparison.changes:
        return "job file: matches the checkpoint"
    what = "; ".join(comparison.changes)
    if not comparison.changed_rows:
        return f"job file: changed ({what}), but no finished row's request did; the next run keeps every answer"
    return (
        f"job file: changed ({what}): {comparison.changed_rows} of {comparison.finished_rows} finished rows "
        f"would be sent differently; the next run needs {named('rerun_changed', True)} or {named('restart', True)}"
    )


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"

"""What a job's requests depend on, so a rerun knows which stored answers still fit.

* The job fingerprint, kept in the checkpoint's meta in readable form: the input's
  content digest, the template sources, and the request settings (model, protocol,
  params, stream, image settings with prompt.images or prompt.messages, and the output
  settings the protocol sends with each request: a schema sent natively).
* The request hash of each finished row, kept in `rows`: the request settings plus
  the row's rendered system and user text and image values.

When the fingerprint changed, every finished row is rendered again (no request, one
input batch in memory at a time) and its hash compared, which says exactly which
rows a change affects. The final request body is not hashed: images are loaded and
bodies built at send time. Output path, parsing, a schema not sent natively, limits
and concurrency are in neither, so changing them only re-derives the output.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import jinja2
import orjson

from batchrun.flow.sharing import request_key
from batchrun.job.inputs import ROW_INDEX, InputTable
from batchrun.job.render import Renderer, RowInputError
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import Job, JobSpec
from batchrun.ledger.checkpoint import Checkpoint
from batchrun.protocols import protocol_for

META_KEY = "fingerprint"
SHOWN_CHARS = 60


def request_settings(spec: JobSpec) -> dict[str, Any]:
    """The job-file settings that shape every request body (settings.RequestSettings), by their job-file names."""
    return RequestSettings.of(spec, protocol_for(spec.provider.api)).by_job_keys()


def templates(spec: JobSpec) -> dict[str, Any]:
    found = {"prompt.system": spec.prompt.system, "prompt.user": spec.prompt.user, "prompt.images": spec.prompt.images}
    if spec.prompt.messages is not None:  # absent when unset: fingerprints from before it existed still match
        found["prompt.messages"] = spec.prompt.messages
    return found


def settings_digest(settings: RequestSettings) -> bytes:
    """The request settings, hashed whole: one part of every row's request hash."""
    return hashlib.blake2b(orjson.dumps(settings.by_job_keys(), option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


def row_hash(settings: bytes, key: bytes) -> int:
    """A row's request hash from its rendered request's key (sharing.request_key) and the request settings.

    64 bits (a signed SQLite integer): compact for 10-million-row checkpoints, collisions negligible.
    """
    return int.from_bytes(hashlib.blake2b(settings + key, digest_size=8).digest(), "big", signed=True)


def render_hash(renderer: Renderer, settings: bytes, row: dict[str, Any]) -> int | None:
    """The row's request hash; None when its templates fail on it (it is stored as an input error)."""
    try:
        return row_hash(settings, request_key(renderer.render(row)))
    except (jinja2.TemplateError, RowInputError):
        return None


@dataclass
class Fingerprint:
    input_digest: str
    input_files: list[list[Any]]  # [path, size, mtime_ns] per file: an untouched input is not hashed again
    input_shown: str
    templates: dict[str, Any]
    settings: dict[str, Any]

    @classmethod
    def of(cls, job: Job, table: InputTable, previous: Fingerprint | None) -> Fingerprint:
        if table.given is not None or table.remote:  # no file here to stat: the rows are digested
            files, digest = [], table.content_digest()
        else:
            files = _input_files(job.input_path)
            if previous is not None and previous.input_files == files:
                digest = previous.input_digest
            else:
                digest = _content_digest([f[0] for f in files])
        # Through JSON, as stored, so a value YAML typed (a date, say) compares equal to its stored form.
        settings = orjson.loads(orjson.dumps(request_settings(job.spec)))
        shown = job.spec.input.path or "the frame given in Python"
        return cls(digest, files, shown, templates(job.spec), settings)

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> Fingerprint | None:
        stored = checkpoint.get_meta(META_KEY)
        return cls(**orjson.loads(stored)) if stored else None

    def save(self, checkpoint: Checkpoint) -> None:
        checkpoint.set_meta(META_KEY, orjson.dumps(asdict(self)).decode())

    def changes_from(self, old: Fingerprint) -> list[str]:
        """What changed that may change requests, readably; empty when nothing did."""
        found = []
        if self.input_digest != old.input_digest:
            found.append(f"the input's content changed ({self.input_shown})")
        found += [f"{key} changed" for key, value in self.templates.items() if old.templates.get(key) != value]
        for key in {**old.settings, **self.settings}:
            before, after = old.settings.get(key), self.settings.get(key)
            if before != after:
                found.append(f"{key}: {_shown(before)} -> {_shown(after)}")
        return found


@dataclass
class Comparison:
    changes: list[str]  # empty: the job still matches the checkpoint
    changed_rows: int  # finished rows whose request would now differ
    finished_rows: int  # finished rows of the current input (counted only when something changed)


def compare(
    checkpoint: Checkpoint,
    job: Job,
    table: InputTable,
    renderer: Renderer,
    forget_changed: bool = False,
    ok_only: bool = False,
) -> tuple[Comparison, Fingerprint]:
    """Compare the job with its checkpoint; with `forget_changed`, drop the answers of changed rows.

    `ok_only` leaves failed rows out (--retry-failed sends them again anyway).
    """
    stored = Fingerprint.load(checkpoint)
    current = Fingerprint.of(job, table, stored)
    changes = current.changes_from(stored) if stored is not None else []
    changed = finished = 0
    if changes:
        settings = settings_digest(RequestSettings.of(job.spec, protocol_for(job.spec.provider.api)))
        for indexes, held in _changed_rows(checkpoint, table, renderer, settings, ok_only):
            changed += len(indexes)
            finished += held
            if forget_changed and indexes:
                checkpoint.forget(indexes)
    return Comparison(changes, changed, finished), current


def _changed_rows(
    checkpoint: Checkpoint, table: InputTable, renderer: Renderer, settings: bytes, ok_only: bool
) -> Iterator[tuple[list[int], int]]:
    """Per input batch: the finished rows whose request hash differs now, and how many finished rows it has."""
    for batch in table.batches():
        lo, hi = batch[ROW_INDEX][0], batch[ROW_INDEX][-1] + 1
        stored = checkpoint.hashes_in_range(lo, hi, ok_only)
        if not stored:
            continue
        changed = [
            idx
            for row in batch.iter_rows(named=True)
            if (idx := row[ROW_INDEX]) in stored and stored[idx] != render_hash(renderer, settings, row)
        ]
        yield changed, len(stored)


def _input_files(path: str) -> list[list[Any]]:
    names = sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else [path]
    stats = [(os.path.abspath(n), os.stat(n)) for n in names]
    return [[name, st.st_size, st.st_mtime_ns] for name, st in stats]


def _content_digest(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0end of file\0")
    return digest.hexdigest()


def _shown(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, str) else value
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."

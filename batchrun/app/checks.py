"""The checks across keys and features, run on a job once its shape is valid (spec.read_job).

They need what other modules know (schemas, protocols, images, storage), so they
live above them rather than in job/spec.py, which everything imports. Each problem is
one line naming the file, the line and the key; warnings are kept on the job for
the commands to print.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import polars as pl

from batchrun.base import storage
from batchrun.base.errors import JobError
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import OPENAI_BATCH, Job, JobSpec, input_problems, read_job, read_job_dict, recognise_batch_file
from batchrun.job.structured import output_problems
from batchrun.pipeline.images import PILLOW_MISSING, pillow_available
from batchrun.protocols.gemini import generation_config


def load_job(path: str | os.PathLike[str]) -> Job:
    """The job file at `path`, validated and checked: what every command runs."""
    return checked(read_job(path))


def job_from_dict(data: dict[str, Any], folder: Path, frame: pl.DataFrame | None = None) -> Job:
    """A job given in Python as a dict of the job file's keys (spec.read_job_dict), checked."""
    return checked(read_job_dict(data, folder, frame))


def checked(job: Job) -> Job:
    """The job, if nothing across its keys is wrong (else the first problem as a JobError); warnings kept on it."""
    spec = job.spec
    for key, problem in [
        *_unsupported(spec),
        *_storage_problems(spec),
        *output_problems(spec),
        *_spend_problems(spec),
        *_protocol_problems(spec),
    ]:
        raise JobError(f"{job.where(key)}: {key}: {problem}")
    owned = OWNED_PARAMS.get(spec.provider.api, set()) & set(spec.params)
    if owned:
        key = "params." + sorted(owned)[0]
        raise JobError(f"{job.where(key)}: {key}: batchrun sets this itself; remove it from params")
    if spec.input.format is None and job.frame is None and recognise_batch_file(job.input_path):
        job.input_format, job.format_recognised = OPENAI_BATCH, True
    for key, problem in input_problems(job):
        raise JobError(f"{job.where(key)}: {key}: {problem}")
    job.warnings = [f"{job.where(key)}: {key}: {problem}" for key, problem in _warnings(spec)]
    return job


# Keys that parse but whose feature batchrun does not have yet: refusing them is
# better than silently ignoring them.
def _unsupported(spec: JobSpec) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if spec.output.sharded:
        found.append(("output.sharded", "sharded output is not supported yet"))
    return found


def _storage_problems(spec: JobSpec) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for key, path in (("input.path", spec.input.path), ("output.path", spec.output.path)):
        if path is not None and (problem := storage.url_problem(path, output=key == "output.path")):
            found.append((key, problem))
    if spec.output.images_dir is not None and storage.is_url(spec.output.images_dir):
        found.append(("output.images_dir", "object storage for images is not supported yet; use a local folder"))
    if spec.output.openai_batch is not None and storage.is_url(spec.output.openai_batch):
        found.append(("output.openai_batch", "object storage for it is not supported yet; use a local path"))
    return found


def _spend_problems(spec: JobSpec) -> list[tuple[str, str]]:
    if spec.run.max_cost is not None and spec.pricing is None:
        return [("run.max_cost", "a budget needs pricing (input_per_million, output_per_million) to count the cost")]
    return []


OWNED_PARAMS = {
    "openai-chat": {"model", "messages", "stream", "stream_options"},
    "openai-completions": {"model", "prompt", "stream", "stream_options"},
    "gemini": {"contents", "systemInstruction", "system_instruction"},
}
_GEMINI_MODEL_FORBIDDEN = re.compile(r"[/?#:\s]")


def _protocol_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What the chosen protocol cannot send (docs/protocol.md §1, §3, §4.1)."""
    api = spec.provider.api
    found: list[tuple[str, str]] = []
    if api == "gemini" and spec.model is not None and _GEMINI_MODEL_FORBIDDEN.search(spec.model):
        found.append(("model", f"{spec.model!r}: a Gemini model is its bare id, without / ? # : or spaces"))
    if api == "openai-completions" and spec.prompt.images:
        found.append(("prompt.images", "openai-completions takes no images; use openai-chat or gemini"))
    if api == "openai-completions" and spec.prompt.messages is not None:
        found.append(
            ("prompt.messages", "openai-completions takes one prompt, not a conversation; use openai-chat or gemini")
        )
    if spec.output.openai_batch is not None and api == "gemini":
        found.append(
            ("output.openai_batch", "the Batch output holds OpenAI answers; use openai-chat or openai-completions")
        )
    if spec.prompt.max_image_side is not None and not pillow_available():
        found.append(("prompt.max_image_side", PILLOW_MISSING))
    return found


def _warnings(spec: JobSpec) -> list[tuple[str, str]]:
    """Legal but probably not what the user wants."""
    found: list[tuple[str, str]] = []
    api = spec.provider.api
    if api == "openai-completions" and "max_tokens" not in spec.params:
        found.append(("params", "max_tokens is not set; the completions default is tiny (16 tokens)"))
    modalities = generation_config(RequestSettings.of(spec)).get("responseModalities") if api == "gemini" else None
    if spec.output.images_dir and isinstance(modalities, list) and "IMAGE" not in [str(m).upper() for m in modalities]:
        found.append(("output.images_dir", "is set but params.responseModalities lacks IMAGE: no image will come"))
    return found

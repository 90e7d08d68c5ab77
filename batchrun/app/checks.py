"""The checks across keys and features, run on a job once its shape is valid (spec.read_job).

They need what other modules know (schemas, protocols, images, storage), so they
live above them rather than in job/spec.py, which everything imports. Each problem is
one line naming the file, the line and the key; warnings are kept on the job for
the commands to print.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from batchrun.base import storage
from batchrun.base.errors import JobError
from batchrun.job.spec import OPENAI_BATCH, Job, JobSpec, input_problems, read_job, read_job_dict, recognise_batch_file
from batchrun.job.structured import output_problems
from batchrun.pipeline.images import PILLOW_MISSING, pillow_available
from batchrun.protocols import APIS, WireProtocol, able, protocol_for


def load_job(path: str | os.PathLike[str]) -> Job:
    """The job file at `path`, validated and checked: what every command runs."""
    return checked(read_job(path))


def job_from_dict(data: dict[str, Any], folder: Path, frame: pl.DataFrame | None = None) -> Job:
    """A job given in Python as a dict of the job file's keys (spec.read_job_dict), checked."""
    return checked(read_job_dict(data, folder, frame))


def checked(job: Job) -> Job:
    """The job, if nothing across its keys is wrong (else the first problem as a JobError); warnings kept on it."""
    spec = job.spec
    if spec.provider.api not in APIS:
        key = "provider.api"
        raise JobError(f"{job.where(key)}: {key}: unknown API {spec.provider.api!r}; use one of {', '.join(APIS)}")
    protocol = protocol_for(spec.provider.api)
    for key, problem in [
        *_unsupported(spec),
        *_storage_problems(spec),
        *_protocol_problems(spec, protocol),
        *output_problems(spec, protocol),
        *_spend_problems(spec),
    ]:
        raise JobError(f"{job.where(key)}: {key}: {problem}")
    if spec.input.format is None and job.frame is None and recognise_batch_file(job.input_path):
        job.input_format, job.format_recognised = OPENAI_BATCH, True
    for key, problem in [*input_problems(job), *_batch_file_problems(job, protocol)]:
        raise JobError(f"{job.where(key)}: {key}: {problem}")
    warnings = [*protocol.job_warnings(spec), *_warnings(spec, protocol)]
    job.warnings = [f"{job.where(key)}: {key}: {problem}" for key, problem in warnings]
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


# What a job asks that a protocol may lack: its capability flag (WireProtocol), the key that asks,
# whether this job asks, what the API lacks, and whether to name the APIs that have it.
_CAPABILITIES: list[tuple[str, str, Callable[[JobSpec], bool], str, bool]] = [
    ("IMAGES_IN", "prompt.images", lambda spec: bool(spec.prompt.images), "takes no images", True),
    (
        "CONVERSATIONS",
        "prompt.messages",
        lambda spec: spec.prompt.messages is not None,
        "takes one prompt, not a conversation",
        True,
    ),
    ("STREAMS", "stream", lambda spec: spec.stream, "does not stream; remove stream: true", False),
    ("TOOLS", "output.parse", lambda spec: spec.output.parse == "tool", "has no tools; use parse: json or text", False),
    (
        "OPENAI_BATCH",
        "output.openai_batch",
        lambda spec: spec.output.openai_batch is not None,
        "answers are not OpenAI Batch answers",
        True,
    ),
    (
        "REPAIRS",
        "output.repair_attempts",
        lambda spec: spec.output.repair_attempts > 0 and spec.output.parse == "json",
        "cannot be asked again with a follow-up yet",
        True,
    ),
]


def _protocol_problems(spec: JobSpec, protocol: WireProtocol) -> list[tuple[str, str]]:
    """What the chosen protocol cannot send, from its capabilities and its own checks (docs/protocol.md)."""
    owned = sorted(protocol.OWNED_PARAMS & set(spec.params))
    found = [(f"params.{owned[0]}", "batchrun sets this itself; remove it from params")] if owned else []
    for capability, key, asks, lacking, name_others in _CAPABILITIES:
        if asks(spec) and not getattr(protocol, capability):
            instead = f"; use {' or '.join(able(capability))}" if name_others else ""
            found.append((key, f"{spec.provider.api} {lacking}{instead}"))
    if spec.prompt.max_image_side is not None and not pillow_available():
        found.append(("prompt.max_image_side", PILLOW_MISSING))
    return found + protocol.job_problems(spec)


def _batch_file_problems(job: Job, protocol: WireProtocol) -> list[tuple[str, str]]:
    """An OpenAI Batch file's lines go to the OpenAI paths their url names, whatever provider.api says."""
    if job.batch_input and not protocol.OPENAI_BATCH:
        what = "recognised as an OpenAI Batch file" if job.format_recognised else "input.format is openai-batch"
        return [("provider.api", f"{what}: its lines go to the OpenAI paths their url names; remove provider.api")]
    return []


def _warnings(spec: JobSpec, protocol: WireProtocol) -> list[tuple[str, str]]:
    """Legal but probably not what the user wants (the protocol adds its own)."""
    if spec.output.images_dir and not protocol.IMAGES_OUT:
        return [("output.images_dir", f"is set but {spec.provider.api} answers no images")]
    return []

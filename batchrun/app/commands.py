"""What `run` and `validate` do, for the command line (cli.py) and Python (app/api.py) alike
(`status` is resume.job_status).

Each takes a loaded Job and returns what it found; printing is the caller's. Settings given
for one run (`--concurrency`, `concurrency=`) are laid over the job file's by `settle` and
validated by the job model, so each has one bound and one default whichever way it is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from batchrun.app.checks import checked
from batchrun.base.errors import JobError
from batchrun.base.naming import Naming
from batchrun.engines.runner import RunOptions, run_job
from batchrun.flow import spend
from batchrun.job.inputs import ROW_INDEX, InputTable
from batchrun.job.render import Renderer, RowInputError
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import Job, JobSpec, with_settings
from batchrun.job.structured import AnswerParser
from batchrun.pipeline import cache_order
from batchrun.pipeline.images import ImageLoader, loader_for, preview_body
from batchrun.protocols import WireProtocol, protocol_for
from batchrun.results import output

# The job file's keys a run may set without editing it, by their flag's and keyword argument's name.
RUN_SETTINGS = {"concurrency": "run.concurrency", "max_cost": "run.max_cost", "base_url": "provider.base_url"}


def settle(job: Job, named: Naming, **given: Any) -> Job:
    """The job read (spec.read_job, read_job_dict) with the run settings given (None: the job file's) laid
    over its own, then checked across its keys (checks.checked); a problem names a setting as `named` does."""
    settings = {RUN_SETTINGS[name]: (named(name), value) for name, value in given.items() if value is not None}
    return checked(with_settings(job, settings))


def check_limit(limit: int | None, named: Naming) -> None:
    """The row limit is the run's, not the job file's: its one bound is here."""
    if limit is not None and limit < 1:
        raise JobError(f"{named('limit')}: must be at least 1 (got {limit})")


async def run(
    job: Job,
    options: RunOptions,
    engine: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
) -> dict[str, Any]:
    """Runs or resumes the job; returns its summary. Raises JobError, RunAborted, BudgetReached, RunInterrupted."""
    if engine == "local":
        if ray_address is not None or ray_actors is not None:
            raise JobError("--ray-address and --ray-actors need --engine ray")
        return await run_job(job, options)
    ray_engine = _ray_engine()
    return await ray_engine.run_job_on_ray(job, options, ray_engine.RayOptions(ray_address, ray_actors))


def _ray_engine() -> ModuleType:
    """The Ray engine, which needs the optional `ray` extra; the core install never imports Ray."""
    try:
        from batchrun.engines import ray_engine
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "ray":
            raise
        raise JobError("--engine ray needs Ray, which is not installed: pip install 'batchrun[ray]'") from None
    return ray_engine


def _preview(
    protocol: WireProtocol,
    loader: ImageLoader,
    renderer: Renderer,
    row: dict[str, Any],
    settings: RequestSettings,
    spec: JobSpec,
) -> str:
    """One row's request as it would be sent; an OpenAI Batch line's with the path its url names."""
    try:
        request = renderer.render(row)
    except RowInputError as e:
        return f"(not sent: the row would be an input error: {e})"
    except Exception as e:  # as `run` records it: a template failing on this row (a sandbox refusal, a filter)
        return f"(not sent: the row would be an input error: template: {e})"
    if request.api is None:
        return preview_body(protocol, loader, request, settings)
    line_protocol = protocol_for(request.api)
    path = line_protocol.path(settings)
    return f"POST {spec.provider.base_url}{path}\n" + preview_body(line_protocol, loader, request, settings)


@dataclass
class Plan:
    """What `validate` found: the job's input, its endpoint, the first rendered requests, the cost estimate."""

    job: str
    rows: int
    input: str
    columns: list[str]
    endpoint: str  # "openai-chat gpt-5.4 -> POST https://..."
    requests: dict[str, str]  # row id -> the request body as it would be sent (payloads shortened)
    estimate: spend.Estimate
    estimate_lines: list[str]  # the estimate as `validate` prints it
    empty_rows: int = 0  # rows with an empty value in a column the prompt uses: it renders as empty text
    empty_by_column: dict[str, int] = field(default_factory=dict)


def plan(job: Job, show: int = 2) -> Plan:
    """Checks the job and its input and renders the first `show` requests; nothing is sent."""
    spec = job.spec
    table = InputTable.for_job(job)
    table.check_ids()
    renderer = Renderer(job, table.columns)
    protocol = protocol_for(spec.provider.api)
    output.check_columns(job, AnswerParser.for_spec(spec, protocol), table.columns)
    output.check_targets(job)
    if all(os.environ.get(env, "").strip() for env in spec.provider.key_variables):
        job.api_keys()  # keys that are set must be sendable; validate sends nothing, so it needs none
    loader = loader_for(job, protocol.INLINE_IMAGE_URLS)
    settings = RequestSettings.of(spec, protocol)
    requests: dict[str, str] = {}
    for batch in table.batches(limit=show):
        for row in batch.iter_rows(named=True):
            row_id = row[table.id_name] if table.id_column else row[ROW_INDEX]
            requests[str(row_id)] = _preview(protocol, loader, renderer, row, settings, spec)
    estimate = spend.estimate_job(job, table, renderer)
    empty_rows, empty_by_column = table.empty_values(renderer.columns_used)
    if job.batch_input:
        how = "recognised from its lines" if job.format_recognised else "input.format: openai-batch"
        laid = " with model and params laid over it" if spec.params or spec.model else ""
        endpoint = (
            f"input: an OpenAI Batch file ({how}): custom_id is the row id, each line's url picks "
            f"its path, its body is sent as written{laid}"
        )
    else:
        endpoint = f"{spec.provider.api} {spec.model} -> POST {spec.provider.base_url}"
        endpoint += protocol.path(settings)
    estimate_lines = spend.describe_estimate(estimate, job) + _cache_advice(job, table, renderer, estimate)
    return Plan(
        job=spec.name,
        rows=table.count(),
        input=spec.input.path or "the frame given in Python",
        columns=table.columns,
        endpoint=endpoint,
        requests=requests,
        estimate=estimate,
        estimate_lines=estimate_lines,
        empty_rows=empty_rows,
        empty_by_column=empty_by_column,
    )


def _cache_advice(job: Job, table: InputTable, renderer: Renderer, estimate: spend.Estimate) -> list[str]:
    """How much of each request is a prefix shared with other rows, over the rows the run reads ahead."""
    texts = []
    for batch in table.batches(limit=cache_order.WINDOW_ROWS):
        for row in batch.iter_rows(named=True):
            try:
                texts.append(cache_order.leading_text(renderer.render(row)))
            except Exception:  # such a row fails as an input error, without a request (see _preview)
                continue
    share = cache_order.prefix_share(texts)
    lines = cache_order.advice_lines(share, job.path, job.spec.run.order)
    if lines and job.spec.pricing is not None:
        lines.insert(
            2, spend.describe_cached(estimate, share.expected_cached / max(share.input_tokens, 1), job.spec.pricing)
        )
    return lines

"""Commands: run, validate, status, report, models, emulator, bench."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrun.base.errors import BudgetReached, JobError, RunAborted, RunInterrupted
from batchrun.base.redaction import for_terminal
from batchrun.base.version import __version__

if TYPE_CHECKING:
    from batchrun.job.spec import Job

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_ABORTED = 3
EXIT_BUDGET = 4
EXIT_ROWS_FAILED = 5  # the run finished and the output is complete, but some rows ended in error
EXIT_INTERRUPTED = 130
# polars' allocator (jemalloc) keeps freed pages for 0.5 s, and 1 s more as pages the kernel still counts:
# a big job churns through far more memory in that time than a small one, so its peak RSS grew with its
# rows. Handing freed pages back at once keeps it flat (docs/memory.md). polars reads this on import.
POLARS_ALLOCATOR_ENV = "_RJEM_MALLOC_CONF"
POLARS_ALLOCATOR_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"


def entry() -> int:
    """The `batchrun` command and `python -m batchrun`: a process of batchrun's own, not yet running threads.

    Only here is the environment changed: C's setenv is not thread-safe, and a `main` called in a process
    whose other threads read the environment (polars, SQLite, a server thread) crashed one run in three.
    """
    _hand_back_freed_memory()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except JobError as e:
        print(for_terminal(f"batchrun: error: {e}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunAborted as e:
        print(for_terminal(f"batchrun: {e}; resume with: {_resume_command(args)}"), file=sys.stderr)
        return EXIT_ABORTED
    except BudgetReached as e:
        print(
            for_terminal(f"batchrun: {e}: {_resume_command(args, with_max_cost=False)} --max-cost HIGHER"),
            file=sys.stderr,
        )
        return EXIT_BUDGET
    except RunInterrupted as e:
        print(for_terminal(f"\nbatchrun: {e}; resume with: {_resume_command(args)}"), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        resume = f"; resume with: {_resume_command(args)}" if args.command == "run" else ""
        print(f"\nbatchrun: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # e.g. an output folder that cannot be written
        where = f"{e.filename}: " if e.filename else ""
        print(for_terminal(f"batchrun: error: {where}{e.strerror or e}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # a bug: show it, but never with the key in it
        print(for_terminal(traceback.format_exc()), file=sys.stderr, end="")
        return EXIT_INTERNAL


def _hand_back_freed_memory() -> None:
    """polars' allocator, set before polars is imported (it is too late after: batchrun called from Python).

    Ours goes last, as later settings win: an inherited value holds polars' defaults when the parent
    process imported polars (as `batchrun bench` does), and those must not undo ours.
    """
    if "polars" in sys.modules:
        return
    conf = os.environ.get(POLARS_ALLOCATOR_ENV, "")
    if not conf.endswith(POLARS_ALLOCATOR_CONF):
        os.environ[POLARS_ALLOCATOR_ENV] = f"{conf},{POLARS_ALLOCATOR_CONF}" if conf else POLARS_ALLOCATOR_CONF


def _resume_command(args: argparse.Namespace, *extra: str, with_max_cost: bool = True) -> str:
    """The command that resumes a run: the same job, row limit, concurrency and budget; never --restart."""
    words = ["batchrun", "run", args.job, *extra]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    if args.concurrency is not None:
        words += ["--concurrency", str(args.concurrency)]
    if args.max_cost is not None and with_max_cost:
        words += ["--max-cost", f"{args.max_cost:g}"]
    if args.base_url is not None:
        words += ["--base-url", args.base_url]
    if args.engine != "local":
        words += ["--engine", args.engine]
    if args.ray_address is not None:
        words += ["--ray-address", args.ray_address]
    if args.ray_actors is not None:
        words += ["--ray-actors", str(args.ray_actors)]
    return shlex.join(words)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchrun",
        description="Run a table of rows through a model API.",
        epilog=(
            "exit codes: 0 every row ok; 1 internal error; 2 bad input; 3 stopped by the server; "
            f"4 budget reached; {EXIT_ROWS_FAILED} finished with failed rows; 130 interrupted"
        ),
    )
    parser.add_argument("--version", action="version", version=f"batchrun {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, help="batchrun COMMAND -h shows its options")

    run = sub.add_parser("run", help="run or resume a job; writes the output Parquet")
    run.add_argument("job", help="the job file (YAML)")
    run.add_argument("--limit", type=int, help="only the first N rows, to try a job cheaply")
    run.add_argument("--concurrency", type=int, help="requests in flight at most (overrides run.concurrency)")
    run.add_argument("--restart", action="store_true", help="throw the checkpoint away and start over")
    run.add_argument("--retry-failed", action="store_true", help="request again the rows that ended in error")
    run.add_argument(
        "--rerun-changed",
        action="store_true",
        help="after the job file changed: keep answers whose request is unchanged, send only the changed rows",
    )
    run.add_argument(
        "--adopt-checkpoint",
        type=Path,
        metavar="OLD",
        help="move this earlier checkpoint of the job (e.g. from before output.path changed) beside the output",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--max-cost",
        type=float,
        help="stop before the job's cost could pass this (overrides run.max_cost)",
    )
    _base_url_argument(run)
    run.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="where rows are sent from: this process (default) or a Ray cluster (pip install 'batchrun[ray]')",
    )
    run.add_argument("--ray-address", help="the Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--ray-actors", type=_positive_int, help="a pool of N sending actors (default: one per CPU)")
    run.set_defaults(func=_run)

    validate = sub.add_parser("validate", help="check the job and its input, show the first requests; no network")
    validate.add_argument("job", help="the job file (YAML)")
    validate.add_argument("--show", type=int, default=2, help="how many rendered requests to show (default 2)")
    _base_url_argument(validate)
    validate.set_defaults(func=_validate)

    status = sub.add_parser("status", help="what is done, failed, pending; tokens; cost")
    status.add_argument("job", help="the job file (YAML)")
    _base_url_argument(status)
    status.set_defaults(func=_status)

    models = sub.add_parser("models", help="the relay's models (GET /v1/models)")
    models.add_argument("job", nargs="?", help="take base_url and api_key_env from this job file")
    models.add_argument("--base-url", help="the relay (default: the job's base_url, else https://ai.szkmjb.com)")
    models.add_argument("--api-key-env", help="the variable holding the key (default: KUAIMA_API_KEY, or the job's)")
    models.set_defaults(func=_models)

    report = sub.add_parser("report", help="one HTML page of the run: charts, sample rows, images")
    report.add_argument("job", help="the job file (YAML)")
    report.add_argument("--open", action="store_true", help="open the page in the web browser")
    report.set_defaults(func=_report)

    emulator = sub.add_parser("emulator", help="a local OpenAI + Gemini compatible server for trials and tests")
    emulator.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    emulator.add_argument("--port", type=int, default=8787, help="0 picks a free port (printed on start)")
    emulator.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer")
    emulator.add_argument("--jitter-ms", type=float, default=0.0, help="extra random delay, up to this much")
    emulator.add_argument(
        "--api-key-env", help="require the key held in this variable, or in any of several: A,B (default: accept any)"
    )
    emulator.add_argument(
        "--key-quota",
        action="append",
        default=[],
        metavar="VAR=N",
        help="the key in VAR pays for N requests, then 403 insufficient_user_quota (repeatable)",
    )
    emulator.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=RATE",
        help="answer with fault NAME at this rate, e.g. 429=0.1 (repeatable)",
    )
    emulator.add_argument("--seed", type=int, default=0, help="seed of the random faults (default 0)")
    emulator.add_argument("--ping-ms", type=float, default=10_000, help="`: PING` interval on OpenAI streams; 0: none")
    emulator.add_argument("--stall-ms", type=float, default=3_000, help="how long a `stall` directive pauses a stream")
    emulator.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between stream events")
    emulator.add_argument(
        "--stream-pieces", type=_positive_int, default=4, help="content events per streamed chat answer (default 4)"
    )
    emulator.add_argument(
        "--rpm-limit", type=_positive_int, help="per key, N requests per window (failed ones count); 429 beyond"
    )
    emulator.add_argument("--rpm-window-s", type=float, default=60.0, help="the --rpm-limit window (default 60)")
    emulator.add_argument(
        "--rpm-refused-free", action="store_true", help="refused requests do not count in the --rpm-limit window"
    )
    emulator.add_argument(
        "--rpm-unstated", action="store_true", help='the --rpm-limit 429 says only "rate limit exceeded", no numbers'
    )
    emulator.add_argument(
        "--refuse-all", metavar="STATUS:MESSAGE", help='answer every request so, e.g. "400:No connected db."'
    )
    emulator.add_argument(
        "--refuse-share", type=float, default=0.0, help="refuse this share of rows for their content (400)"
    )
    emulator.add_argument(
        "--max-concurrency", type=_positive_int, help="more in flight at once: 429 token_concurrency_limit_reached"
    )
    emulator.add_argument(
        "--cache-prefixes",
        type=_positive_int,
        default=0,
        help="model a provider prompt cache holding this many prefixes (docs/caching.md); default: no cache",
    )
    emulator.set_defaults(func=_emulator)

    bench = sub.add_parser("bench", help="measure the client's own throughput against the emulator")
    bench.add_argument("--quick", action="store_true", help="a few-second run with small sizes (what CI runs)")
    bench.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    bench.add_argument(
        "--memory",
        type=_positive_int,
        action="append",
        default=[],
        metavar="ROWS",
        help="also compare peak memory of a ROWS-row job with a 10,000-row one (repeatable)",
    )
    bench.add_argument(
        "--push-back",
        action="store_true",
        help="instead: wall time and rate under random 429/503s, a rate limit and a concurrency limit (~3 min)",
    )
    bench.add_argument(
        "--cache",
        action="store_true",
        help="instead: 120 documents x 5 questions, shuffled, against a 16-prefix prompt cache: "
        "rows that hit it and cost, in the cache's order and in input order",
    )
    bench.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="ray: instead, the Ray engine's rows/s against the local one's, and its scaling over simulated nodes",
    )
    bench.set_defaults(func=_bench)
    return parser


def _base_url_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--base-url", help="the relay to send to, e.g. http://127.0.0.1:8787 (overrides provider.base_url)"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _load(args: argparse.Namespace) -> Job:
    """The job file with the run settings given as flags laid over it: one bound and one message each (the job's)."""
    from batchrun.app import commands
    from batchrun.base.naming import flag
    from batchrun.job.spec import read_job

    given = {name: getattr(args, name, None) for name in commands.RUN_SETTINGS}
    job = commands.settle(read_job(args.job), flag, **given)
    commands.check_limit(getattr(args, "limit", None), flag)
    return job


def _run(args: argparse.Namespace) -> int:
    from batchrun.app import commands
    from batchrun.base import eventloop
    from batchrun.engines.runner import RunOptions

    job = _load(args)
    _print_warnings(job.warnings)
    options = RunOptions(
        limit=args.limit,
        restart=args.restart,
        retry_failed=args.retry_failed,
        rerun_changed=args.rerun_changed,
        quiet=args.quiet,
        adopt_checkpoint=args.adopt_checkpoint,
    )
    summary = eventloop.run(commands.run, job, options, args.engine, args.ray_address, args.ray_actors)
    _print_summary(summary)
    print(f"report: {shlex.join(['batchrun', 'report', args.job])}")
    if summary["error"]:
        print(f"{summary['error']} rows failed; retry them with: {_resume_command(args, '--retry-failed')}")
        return EXIT_ROWS_FAILED
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    from batchrun.pipeline.progress import human
    from batchrun.results import output

    line = (
        f"{summary['rows']} rows: {summary['ok']} ok, {summary['error']} error; "
        f"tokens {human(summary['prompt_tokens'] or 0)} in / {human(summary['completion_tokens'] or 0)} out"
    )
    if summary.get("cached_tokens"):
        line += f" ({summary['cached_tokens']} in from the provider's cache)"
    if "cost" in summary:
        line += f"; cost {summary['cost']:.4f} {summary['currency']}"
    line += f"; {summary['wall_s']:.1f} s, {summary['requests_per_s'] or 0:.1f} requests/s"
    print(for_terminal(line))
    if summary.get("answers_without_usage"):
        print(
            f"{summary['answers_without_usage']} answers came without usable token counts: the budget counted each "
            "at its worst case (the prompt estimate and the full output cap); their cost column is empty"
        )
    if summary["schema_invalid"]:
        print(f"{summary['schema_invalid']} answers did not parse or match output.schema (error_class schema_invalid)")
    if summary["shared"]:
        print(f"{summary['shared']} rows repeated another row's request and share its answer (column shared_from)")
    for line in output.watch_lines(summary):
        print(line)
    if summary["in_flight_at_last_stop"]:
        print(
            f"{summary['in_flight_at_last_stop']} rows were in flight when the last run stopped "
            "(the only ones that may have been paid twice)"
        )
    print(f"output: {summary['output']}")


def _validate(args: argparse.Namespace) -> int:
    from batchrun.app import commands

    job = _load(args)
    _print_warnings(job.warnings)
    plan = commands.plan(job, args.show)
    print(f"job {plan.job}: {plan.rows} rows from {plan.input}, columns: {', '.join(plan.columns)}")
    if plan.empty_rows:
        counts = ", ".join(f"{column}: {n}" for column, n in plan.empty_by_column.items())
        print(
            f"empty values: {plan.empty_rows} rows have an empty value in a column the prompt uses ({counts}); "
            "it renders as empty text, and an empty image reference adds no image"
        )
    print(plan.endpoint)
    for row_id, body in plan.requests.items():
        print(f"\nrow {row_id}:")
        print(for_terminal(body))
    for env in job.spec.provider.key_variables:
        if not job.uses_emulator and not os.environ.get(env, "").strip():
            print(f"batchrun: note: {env} is not set; `run` will need it", file=sys.stderr)
    print()
    for line in plan.estimate_lines:
        print(line)
    print(f"\nok: the job is valid ({len(plan.requests)} requests shown, none sent)")
    return 0


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"batchrun: warning: {warning}", file=sys.stderr)


def _emulator_key(variable: str) -> str:
    key = os.environ.get(variable.strip())
    if not key:
        raise JobError(f"--api-key-env: the variable {variable.strip()} is not set")
    return key


def _key_quotas(items: list[str]) -> dict[str, int]:
    quotas = {}
    for item in items:
        variable, _, count = item.partition("=")
        if not count.isdigit():
            raise JobError(f"--key-quota {item}: give VAR=N, N a whole number of requests")
        quotas[_emulator_key(variable)] = int(count)
    return quotas


def _refusal(given: str | None) -> tuple[int, str] | None:
    if given is None:
        return None
    status, _, message = given.partition(":")
    if not status.isdigit() or not 400 <= int(status) < 500 or not message:
        raise JobError(f"--refuse-all {given}: give STATUS:MESSAGE, STATUS a 4xx, e.g. 400:No connected db.")
    return int(status), message


def _status(args: argparse.Namespace) -> int:
    from batchrun.engines.resume import status_lines

    print(for_terminal("\n".join(status_lines(_load(args)))))
    return 0


def _models(args: argparse.Namespace) -> int:
    from batchrun.app.models import list_models

    for line in list_models(args.job, args.base_url, args.api_key_env):
        print(for_terminal(line))
    return 0


def _report(args: argparse.Namespace) -> int:
    import webbrowser

    from batchrun.app.checks import load_job
    from batchrun.results.report_page import write_report

    page = write_report(load_job(args.job))
    print(page)
    if args.open:
        webbrowser.open(page.resolve().as_uri())
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        if args.push_back or args.memory:
            raise JobError("bench --engine ray measures the Ray engine alone; run --push-back and --memory without it")
        if importlib.util.find_spec("ray") is None:
            raise JobError("--engine ray needs Ray, which is not installed: pip install 'batchrun[ray]'")
        from batchrun.bench.ray_scaling import main as ray_bench_main

        return ray_bench_main(args.quick, args.json)
    if args.cache:
        from batchrun.bench.cache import main as cache_bench_main

        return cache_bench_main(args.json)
    if args.push_back:
        from batchrun.bench.pushback import main as push_back_main

        return push_back_main(args.quick, args.json)
    from batchrun.bench.throughput import main as bench_main

    return bench_main(args.quick, args.json, args.memory)


def _emulator(args: argparse.Namespace) -> int:
    from batchrun.emulator.faults import FAULTS
    from batchrun.emulator.server import EmulatorConfig, serve_forever
    from batchrun.emulator.streams import StreamSettings

    rates: dict[str, float] = {}
    for item in args.fault:
        name, _, rate = item.partition("=")
        if name not in FAULTS:
            raise JobError(f"--fault {item}: unknown fault '{name}'; known: {', '.join(sorted(FAULTS))}")
        try:
            rates[name] = float(rate)
        except ValueError:
            raise JobError(f"--fault {item}: the rate must be a number between 0 and 1") from None
    keys = {name: _emulator_key(name) for name in args.api_key_env.split(",")} if args.api_key_env else {}
    config = EmulatorConfig(
        api_key=next(iter(keys.values()), None),
        more_keys=tuple(keys.values())[1:],
        key_quota=_key_quotas(args.key_quota),
        rpm_counts_refused=not args.rpm_refused_free,
        rpm_unstated=args.rpm_unstated,
        refuse_all=_refusal(args.refuse_all),
        refuse_share=args.refuse_share,
        latency_s=args.latency_ms / 1000,
        jitter_s=args.jitter_ms / 1000,
        fault_rates=rates,
        seed=args.seed,
        streams=StreamSettings(
            args.ping_ms / 1000 or None, args.stall_ms / 1000, args.chunk_delay_ms / 1000, args.stream_pieces
        ),
        rpm_limit=args.rpm_limit,
        rpm_window_s=args.rpm_window_s,
        max_concurrency=args.max_concurrency,
        cache_prefixes=args.cache_prefixes,
    )
    try:
        serve_forever(config, args.host, args.port)
    except KeyboardInterrupt:
        pass
    return 0

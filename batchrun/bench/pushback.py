"""`batchrun bench --push-back`: how close to the relay's allowance batchrun stays when it pushes back.

Each scenario runs the same generated job (bench/throughput.py's workload) against an
emulator process started with the scenario's faults or limits, and compares
it with a run of the same job in the same invocation (docs/backoff.md):

* random push-back: wall time with 10 % / 30 % hint-less 429s or 5 % 503s,
  over the wall time of the same job with none; every row must end ok;
* a rate limit of N requests a second (refused ones counted, as the relay
  does): requests answered ok per second over N, and the share answered 429;
* the same limit halved, then restored mid-run (`POST /_emulator/limits`):
  seconds until three seconds in a row average 80 % of the new N ok answers
  with at most 10 % answered 429;
* a concurrency limit: ok answers per second over what the limit allows.

Windows the relay states in its 429 (new-api's words; docs/backoff.md), several keys (docs/keys.md),
refusals:

* a 60 s window, refused requests counted: wall time over the least possible (every full window used,
  the last burst answered), the share answered 429, rows failed (0);
* a 10 s window, refused requests not counted: the same;
* two keys: rows per second with two keys over one key's (target >= 1.8);
* a key running out of quota mid-run: every row ends ok with the other key;
* the same 400 for every request: requests sent before the run stops (<= 2 x concurrency + 10);
* 10 % of rows refused for their content: the run goes on, only those rows fail.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from batchrun.app.checks import load_job
from batchrun.base import eventloop
from batchrun.base.errors import RunAborted
from batchrun.bench.throughput import KEY, KEY_ENV, emulator_process, machine, write_input, write_job
from batchrun.engines.runner import RunOptions, run_job

MAX_ATTEMPTS = 10  # a row refused at random 30 % of the time fails 5 attempts in a row once in 400 rows
SETTLED_SHARE = 0.8  # a second's ok answers within this share of N: settled
CONCURRENCY = 32


@dataclass
class Sizes:
    random_rows: int
    random_latency_ms: float
    limit_per_s: int
    limit_s: float  # how long the rate-limit run lasts, about
    phase_s: float  # each phase of the halving run
    concurrency_limit: int


@dataclass
class Windows:
    """The stated windows: (requests, seconds) of the long and the short one, and rows for the refusal runs."""

    long: tuple[int, float]
    short: tuple[int, float]
    refusal_rows: int


FULL = Sizes(random_rows=600, random_latency_ms=500, limit_per_s=40, limit_s=25, phase_s=15, concurrency_limit=8)
QUICK = Sizes(random_rows=300, random_latency_ms=500, limit_per_s=20, limit_s=12, phase_s=8, concurrency_limit=4)
FULL_WINDOWS = Windows(long=(300, 60.0), short=(100, 10.0), refusal_rows=300)
QUICK_WINDOWS = Windows(long=(100, 20.0), short=(50, 5.0), refusal_rows=200)
WINDOW_LATENCY_MS = 500
SHORT_WINDOWS = 8  # the first window's overshoot (up to 32 429s) is under 10 % of a run this long
SECOND_KEY_ENV, SECOND_KEY = "BATCHRUN_BENCH_KEY_2", "sk-bench-second-not-a-secret"


@dataclass
class Figure:
    scenario: str
    measured: str  # what `value` is
    value: float
    target: str
    met: bool
    note: str = ""


def run_push_back(quick: bool, workdir: Path) -> list[Figure]:
    sizes = QUICK if quick else FULL
    figures = _random_push_back(workdir / "random", sizes)
    figures += _rate_limit(workdir / "rate", sizes)
    figures += _halved_and_restored(workdir / "halved", sizes)
    figures += _concurrency_limit(workdir / "concurrency", sizes)
    figures += run_windows_and_keys(quick, workdir)
    return figures


def run_windows_and_keys(quick: bool, workdir: Path) -> list[Figure]:
    """Windows the relay states, several keys, refusals (docs/backoff.md, docs/keys.md)."""
    windows = QUICK_WINDOWS if quick else FULL_WINDOWS
    figures = _window(workdir / "long", *windows.long, counted=True, windows=3)  # the 900 rows
    figures += _window(workdir / "short", *windows.short, counted=False, windows=SHORT_WINDOWS)
    figures += _window(workdir / "unstated", *windows.short, counted=True, windows=SHORT_WINDOWS, unstated=True)
    figures += _two_keys(workdir / "keys", *windows.short)
    figures += _quota_mid_run(workdir / "quota", windows.refusal_rows)
    figures += _refused_alike(workdir / "alike", windows.refusal_rows)
    figures += _row_refusals(workdir / "rows", windows.refusal_rows)
    return figures


def _window(folder: Path, n: int, window_s: float, counted: bool, windows: int, unstated: bool = False) -> list[Figure]:
    """`windows` windows' worth of rows: the least possible wall is all but one window and the last answers.

    `unstated`: the 429 says only "rate limit exceeded", the window is learned (flow/window_guess.py)."""
    rows = windows * n
    args = _window_args(n, window_s) + ([] if counted else ["--rpm-refused-free"])
    args += ["--rpm-unstated"] if unstated else []
    run = _run(folder, rows, args)
    least = (windows - 1) * window_s + WINDOW_LATENCY_MS / 1000
    refused = run.stats["by_status"].get("429", 0) / run.stats["requests"]
    scenario = f"{window_s:g} s window" + (", unstated" if unstated else "") + (", refused counted" if counted else "")
    note = f"{rows} rows in {run.wall_s:.1f} s, least {least:.1f} s; {n} per {window_s:g} s; {run.failed} failed"
    figures = [
        Figure(scenario, "least / wall", round(least / run.wall_s, 2), ">= 0.9", least / run.wall_s >= 0.9, note),
        Figure(scenario, "429 share", round(refused, 3), "<= 0.10", refused <= 0.10 and run.failed == 0),
    ]
    if unstated:  # the window learned in the first: what the windows after the second sustain
        sustained = _ok_per_s(run.timeline, 2 * window_s, (windows - 1) * window_s) / (n / window_s)
        figures.append(Figure(scenario, "ok/s ÷ N/W, w. 3+", round(sustained, 2), ">= 0.9", sustained >= 0.9))
    return figures


def _ok_per_s(timeline: list[list[int]], start_s: float, end_s: float) -> float:
    """Answers not 429 per second, from `start_s` to `end_s` after the run's first second."""
    first = timeline[0][0]
    ok = sum(requests - refused for second, requests, refused in timeline if start_s <= second - first < end_s)
    return ok / (end_s - start_s)


def _two_keys(folder: Path, n: int, window_s: float) -> list[Figure]:
    """Each key's window the bound, not the places: 100 ms answers (32 places take 320 a second)."""
    args = _window_args(n, window_s, latency_ms=100)
    windows = SHORT_WINDOWS
    one = _run(folder / "one", windows * n, args)
    two = _run(folder / "two", 2 * windows * n, args, keys=2)
    ratio = (2 * windows * n / two.wall_s) / (windows * n / one.wall_s)
    note = f"{2 * windows * n} rows in {two.wall_s:.1f} s vs {windows * n} in {one.wall_s:.1f} s; {two.failed} failed"
    return [
        Figure("two keys", "rows/s over one key", round(ratio, 2), ">= 1.8", ratio >= 1.8 and two.failed == 0, note)
    ]


def _quota_mid_run(folder: Path, rows: int) -> list[Figure]:
    args = ["--latency-ms", "100", "--key-quota", f"{SECOND_KEY_ENV}={rows // 4}"]
    run = _run(folder, rows, args, keys=2)
    note = f"the second key paid for {rows // 4} requests; {run.ok} of {rows} rows ok"
    return [Figure("a key's quota runs out", "rows failed", run.failed, "0", run.failed == 0 and run.ok == rows, note)]


def _refused_alike(folder: Path, rows: int) -> list[Figure]:
    run = _run(folder, rows, ["--latency-ms", "100", "--refuse-all", "400:No connected db."])
    most = 2 * CONCURRENCY + 10
    sent = run.stats["requests"]
    note = f"stopped: {run.stopped}; {run.ok + run.failed} of {rows} rows finished, the rest pending"
    return [Figure("the same 400 for all", "requests sent", sent, f"<= {most}", run.stopped and sent <= most, note)]


def _row_refusals(folder: Path, rows: int) -> list[Figure]:
    run = _run(folder, rows, ["--latency-ms", "100", "--refuse-share", "0.1"])
    note = f"stopped: {run.stopped}; {run.failed} of {rows} rows refused for their content, {run.ok} ok"
    return [Figure("10 % rows refused", "rows ok + refused", run.ok + run.failed, f"= {rows}", not run.stopped, note)]


def _window_args(n: int, window_s: float, latency_ms: float = WINDOW_LATENCY_MS) -> list[str]:
    return ["--latency-ms", str(latency_ms), "--rpm-limit", str(n), "--rpm-window-s", str(window_s)]


@dataclass
class Run:
    wall_s: float
    ok: int
    failed: int
    stopped: bool
    stats: dict[str, Any]
    timeline: list[list[int]]  # the emulator's [second, requests, 429s] for each second that saw a request


def _run(folder: Path, rows: int, emulator_args: list[str], keys: int = 1) -> Run:
    """One run of the bench job whose rows may fail or stop it; `keys`: 1, or 2 (the second in SECOND_KEY_ENV)."""
    folder.mkdir(parents=True)
    os.environ.setdefault(KEY_ENV, KEY)
    os.environ.setdefault(SECOND_KEY_ENV, SECOND_KEY)
    variables = [KEY_ENV, SECOND_KEY_ENV][:keys]
    with emulator_process(extra=["--api-key-env", ",".join(variables), *emulator_args]) as url:
        job = write_job(folder, write_input(folder / "input.parquet", rows), url, CONCURRENCY, attempts=MAX_ATTEMPTS)
        spec = yaml.safe_load(job.path.read_text(encoding="utf-8"))
        spec["provider"]["api_key_env"] = variables
        job.path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        started = time.perf_counter()
        try:
            summary = eventloop.run(run_job, load_job(job.path), RunOptions(quiet=True))
            stopped = False
        except RunAborted:
            summary, stopped = {}, True
        wall_s = time.perf_counter() - started
        stats = _get(url + "/_emulator/stats")
        timeline = _get(url + "/_emulator/timeline")
    ok = summary.get("ok", stats["by_status"].get("200", 0) if stopped else 0)
    return Run(wall_s, ok, summary.get("error", 0), stopped, stats, timeline)


def _random_push_back(folder: Path, sizes: Sizes) -> list[Figure]:
    latency = ["--latency-ms", str(sizes.random_latency_ms)]
    clean_s, _ = _timed_run(folder / "clean", sizes.random_rows, latency)
    figures = []
    for fault, most in (("429=0.1", 1.3), ("503=0.05", 1.3), ("429=0.3", 2.0)):
        wall_s, stats = _timed_run(folder / fault.replace("=", "-"), sizes.random_rows, [*latency, "--fault", fault])
        ratio = wall_s / clean_s
        figures.append(
            Figure(
                f"random {fault.replace('=', ' at ')}",
                "wall / fault-free",
                round(ratio, 2),
                f"<= {most}",
                ratio <= most,
                f"{wall_s:.1f} s vs {clean_s:.1f} s; {stats['requests']} requests for {sizes.random_rows} rows",
            )
        )
    return figures


def _rate_limit(folder: Path, sizes: Sizes) -> list[Figure]:
    n = sizes.limit_per_s
    rows = round(n * sizes.limit_s)
    args = ["--latency-ms", "100", "--rpm-limit", str(n), "--rpm-window-s", "1"]
    wall_s, stats = _timed_run(folder, rows, args)
    seconds = stats["timeline"][2:-1]  # past the first discovery, without the last partial second
    ok = sum(s[1] - s[2] for s in seconds) / max(len(seconds), 1)
    refused = sum(s[2] for s in stats["timeline"]) / stats["requests"]
    note = f"{rows} rows in {wall_s:.1f} s; {ok:.1f} ok/s from the third second on"
    return [
        Figure(f"rate limit {n}/s", "ok per s / N", round(ok / n, 2), ">= 0.85", ok / n >= 0.85, note),
        Figure(f"rate limit {n}/s", "429 share", round(refused, 3), "<= 0.10", refused <= 0.10),
    ]


def _halved_and_restored(folder: Path, sizes: Sizes) -> list[Figure]:
    n, phase = sizes.limit_per_s, sizes.phase_s
    rows = round(n * phase + n / 2 * phase + n * phase * 0.8)
    args = ["--latency-ms", "100", "--rpm-limit", str(n), "--rpm-window-s", "1"]
    changes: list[float] = []

    def change_limits(url: str) -> None:
        for limit in (n // 2, n):
            time.sleep(phase)
            changes.append(time.time())
            _post(url + "/_emulator/limits", {"rpm_limit": limit})

    wall_s, stats = _timed_run(folder, rows, args, during=change_limits)
    figures = []
    for at, limit, what in zip(changes, (n // 2, n), ("halved", "restored")):
        settled = _settled_after(stats["timeline"], int(at), limit)
        refused = sum(s[2] for s in stats["timeline"] if int(at) <= s[0] < int(at) + phase)
        sent = sum(s[1] for s in stats["timeline"] if int(at) <= s[0] < int(at) + phase)
        note = f"N {limit}/s; {refused} of {sent} requests answered 429 in the {phase:g} s after"
        figures.append(Figure(f"rate limit {what}", "s to settle", settled, "<= 5", settled <= 5, note))
    return figures


def _settled_after(timeline: list[list[int]], start: int, limit: int) -> float:
    """Seconds from `start` until 3 seconds in a row average >= SETTLED_SHARE * limit ok, <= 10 % answered 429."""
    seconds = {t: (sent, refused) for t, sent, refused in timeline}
    for t in range(start, max(seconds, default=start) - 1):
        sent = sum(seconds.get(t + i, (0, 0))[0] for i in range(3))
        refused = sum(seconds.get(t + i, (0, 0))[1] for i in range(3))
        if (sent - refused) / 3 >= SETTLED_SHARE * limit and refused <= 0.1 * sent:
            return float(t - start)
    return math.inf


def _concurrency_limit(folder: Path, sizes: Sizes) -> list[Figure]:
    allowed, latency_s = sizes.concurrency_limit, 0.2
    rows = round(allowed / latency_s * sizes.limit_s)
    args = ["--latency-ms", str(latency_s * 1000), "--max-concurrency", str(allowed)]
    wall_s, stats = _timed_run(folder, rows, args)
    ideal = allowed / latency_s
    share = rows / wall_s / ideal
    refused = stats["by_status"].get("429", 0) / stats["requests"]
    note = f"{rows} rows in {wall_s:.1f} s; the limit allows {ideal:.0f}/s"
    return [
        Figure(f"{allowed} in flight at most", "ok per s / allowed", round(share, 2), ">= 0.85", share >= 0.85, note),
        Figure(f"{allowed} in flight at most", "429 share", round(refused, 3), "<= 0.05", refused <= 0.05),
    ]


def _timed_run(folder: Path, rows: int, emulator_args: list[str], during: Any = None) -> tuple[float, dict[str, Any]]:
    """One run of the bench job against an emulator with these options: wall seconds and what the emulator saw."""
    folder.mkdir(parents=True)
    with emulator_process(extra=emulator_args) as url:
        job = write_job(folder, write_input(folder / "input.parquet", rows), url, CONCURRENCY, attempts=MAX_ATTEMPTS)
        if during is not None:
            threading.Thread(target=during, args=(url,), daemon=True).start()
        started = time.perf_counter()
        summary = eventloop.run(run_job, job, RunOptions(quiet=True))
        wall_s = time.perf_counter() - started
        if summary["ok"] != rows:
            raise RuntimeError(f"bench --push-back: only {summary['ok']} of {rows} rows ended ok")
        stats = _get(url + "/_emulator/stats")
        stats["timeline"] = _get(url + "/_emulator/timeline")
    return wall_s, stats


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def format_figures(figures: list[Figure]) -> str:
    lines = [
        "push-back (each against the same job in this run; docs/backoff.md):",
        f"{'scenario':<24}{'measured':<20}{'value':>8}{'target':>10}  {'met':<4} note",
    ]
    for f in figures:
        lines.append(
            f"{f.scenario:<24}{f.measured:<20}{f.value:>8g}{f.target:>10}  {'yes' if f.met else 'NO':<4} {f.note}"
        )
    return "\n".join(lines)


def main(quick: bool, json_path: str | None) -> int:
    """`batchrun bench --push-back`: a different measure (wall time under faults, not CPU), its own table."""
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-") as tmp:
        figures = run_push_back(quick, Path(tmp))
    print(format_figures(figures))
    if json_path:
        data = {"quick": quick, "machine": machine(), "push_back": [asdict(f) for f in figures]}
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0

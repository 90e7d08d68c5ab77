"""`--engine ray` on a local Ray, against the emulator, checked at the server.

Ray starts once for the module: a simulated cluster of two nodes on this machine
(`ray.cluster_utils.Cluster`) that the runs join with --ray-address, as they would join
a real one; Ray Data spreads the sending actors over the nodes. The comparison with the
local engine starts its own local Ray, as `--engine ray` does when no address is given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import REPO, Emulator, cli_env, run_cli, write_job
from test_resume import (  # noqa: F401  (slow_emulator is a fixture)
    assert_every_row_once_in_order,
    assert_resumed_without_paying_twice,
    in_flight_reported,
    many_reviews,
    slow_emulator,
    wait_for_requests,
)
from test_spend import PRICING

# Without the ray extra (the README's quick start) the module is skipped, not a collection error; the
# tests of a missing extra are in test_ray_extra_missing.py, which runs everywhere.
pytest.importorskip("ray")

from batchrun.engines.coordinator import DRIVER_GRACE_S  # noqa: E402

# A cluster started by ray.init takes token authentication; its clients say so.
RAY_CLIENT = {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": None}
# Two nodes: the head (2 CPUs: an actor and a read task) and a worker node (1 CPU: an actor).
HOLD_RAY = """
import os, time
os.environ["RAY_worker_niceness"] = "0"  # as batchrun's own local Ray
from ray.cluster_utils import Cluster
node = {"object_store_memory": 100 * 2**20}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False, **node})
cluster.add_node(num_cpus=1, **node)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
time.sleep(3600)
"""
# How many nodes the sending actors of the cluster's latest job ran on (from Ray's actor table).
SENDER_NODES = """
import logging, sys, ray
from ray._private.state import actors
ray.init(address=sys.argv[1], logging_level=logging.ERROR)
senders = [a for a in actors().values() if "RowSender" in a["ActorClassName"]]
latest = max(a["JobID"] for a in senders)
print(len({a["Address"]["NodeID"] for a in senders if a["JobID"] == latest}))
"""


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A simulated two-node Ray cluster for the module's runs; stopped with its process group."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_RAY],
        env=cli_env(RAY_CLIENT),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert holder.stdout is not None
    address = holder.stdout.readline().strip()
    if not address:
        holder.kill()
        raise RuntimeError("the local Ray cluster did not start")
    yield address
    os.killpg(holder.pid, signal.SIGKILL)  # the nodes are in the holder's process group; SIGTERM takes 30 s
    holder.wait()


def sender_nodes(address: str) -> int:
    found = subprocess.run(
        [sys.executable, "-c", SENDER_NODES, address], env=cli_env(RAY_CLIENT), capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr[-2000:]
    return int(found.stdout.split()[-1])


def ray_run(job: Path, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "run", str(job), "--quiet", "--engine", "ray", "--ray-address", address, *args, env=RAY_CLIENT, timeout=180
    )


def start_ray_driver(job: Path, address: str, own_group: bool = False) -> subprocess.Popen[str]:
    """`batchrun run --engine ray` with two actors, as a process of its own (in a new process group: `own_group`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(job), "--quiet", "--engine", "ray"]
        + ["--ray-actors", "2", "--ray-address", address],
        env=cli_env(RAY_CLIENT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=own_group,
    )


# --- the same output --------------------------------------------------------------------


def demo_like_job(folder: Path, base_url: str, output: str) -> Path:
    """jobs/demo.yaml on the test's emulator, over the demo's reviews plus two the relay refuses."""
    rows = pl.read_csv(REPO / "sample_data" / "reviews.csv")
    refused = pl.DataFrame(
        {
            "review_id": ["X1", "X2"],
            "product": ["kettle", "lamp"],
            "rating": [1, 5],
            "text": ["[[emulator: prompt_blocked]] Terrible.", "[[emulator: prompt_blocked]] Lovely."],
        }
    )
    pl.concat([rows.head(150), refused, rows.tail(150)]).write_csv(folder / "reviews.csv")
    job = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text(encoding="utf-8"))
    job["input"]["path"] = "reviews.csv"
    job["provider"].update(base_url=base_url, api_key_env="TEST_RELAY_KEY")
    job["output"]["path"] = output
    path = folder / f"{Path(output).stem}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def sharing_groups(df: pl.DataFrame) -> set[frozenset[str]]:
    """Rows whose identical request was asked once: the asked row and those sharing its answer."""
    groups: defaultdict[str, set[str]] = defaultdict(set)
    for row_id, source in zip(df["review_id"], df["shared_from"]):
        groups[source or row_id].add(row_id)
    return {frozenset(group) for group in groups.values()}


@pytest.mark.ray
def test_ray_output_equals_the_local_engines(tmp_path: Path, emulator: Emulator) -> None:
    local_job = demo_like_job(tmp_path, emulator.url, "out/local.parquet")
    assert run_cli("run", str(local_job), "--quiet").returncode == 5  # finished, with two refused rows
    local_requests = emulator.stats()["requests"]
    emulator.reset()

    ray_job = demo_like_job(tmp_path, emulator.url, "out/ray.parquet")
    started = run_cli("run", str(ray_job), "--engine", "ray", env={"RAY_ADDRESS": None}, timeout=180)
    assert started.returncode == 5, started.stderr  # the same exit code as the local engine's
    assert "302 rows: 300 ok, 2 error" in started.stdout  # refused rows are error rows; the job went on
    assert emulator.stats()["requests"] == local_requests  # identical requests asked once across actors

    # Timings and the relay's request ids (in error messages) belong to each request, not to the row.
    request_id = pl.col("error").str.replace(r" \(request id: \w+\)$", "")
    local = pl.read_parquet(tmp_path / "out" / "local.parquet").drop("latency_s").with_columns(request_id)
    ray = pl.read_parquet(tmp_path / "out" / "ray.parquet").drop("latency_s").with_columns(request_id)
    assert ray.schema == local.schema
    # Which row of a group of identical requests is the one asked depends on which actor got there
    # first; everything else, every value of every row in input order, is the same.
    asked = ["shared_from", "prompt_tokens", "completion_tokens", "cost", "attempts"]
    assert ray.drop(asked).equals(local.drop(asked))
    assert sharing_groups(ray) == sharing_groups(local)
    alone = pl.col("review_id").is_in([r for g in sharing_groups(local) if len(g) == 1 for r in g])
    assert ray.filter(alone).equals(local.filter(alone))
    assert ray.select(pl.col(asked[1:]).sum()).equals(local.select(pl.col(asked[1:]).sum()))
    assert (ray.filter(pl.col("status") == "error")["error_class"] == "blocked").all()

    status = run_cli("status", str(ray_job))
    assert "302 of 302 rows done: 300 ok, 2 failed (blocked 2); 0 pending" in status.stdout, status.stdout


# --- limits for the whole job ----------------------------------------------------------------


@pytest.mark.ray
def test_limits_hold_for_the_whole_job_across_two_nodes(
    tmp_path: Path,
    slow_emulator: Emulator,  # noqa: F811
    ray_address: str,
) -> None:
    ids = many_reviews(tmp_path, 120)
    pl.read_csv(tmp_path / "reviews.csv").write_parquet(tmp_path / "reviews.parquet")  # read as ranges of rows
    parquet = {"path": "reviews.parquet", "id_column": "review_id"}
    job = write_job(tmp_path, slow_emulator.url, input=parquet, run={"concurrency": 3, "timeout_s": 30})
    slow_emulator.reset()
    done = ray_run(job, ray_address, "--ray-actors", "2")
    assert done.returncode == 0, done.stderr
    assert_every_row_once_in_order(tmp_path, ids)
    stats = slow_emulator.stats()
    assert stats["requests"] == 120
    assert stats["peak_in_flight"] <= 3, stats  # two actors, three requests in flight between them
    assert sender_nodes(ray_address) == 2  # one actor on each node

    # 600 a minute is 10 a second for the job; paced per actor (Ray's own HTTP processor) it would be 20.
    write_job(tmp_path, slow_emulator.url, input=parquet, run={"concurrency": 16, "requests_per_minute": 600})
    slow_emulator.reset()
    done = ray_run(job, ray_address, "--ray-actors", "2", "--restart", "--limit", "40")
    assert done.returncode == 0, done.stderr
    stats = slow_emulator.stats()
    print(f"requests per minute 600: at most {stats['max_per_second']} in a second")
    assert stats["requests"] == 40 and stats["max_per_minute"] <= 600
    assert stats["max_per_second"] <= 14, stats  # 10 paced, plus arrival jitter; never the 20 of two actors


# --- the same resume promise ------------------------------------------------------------


def settled_stats(emulator: Emulator, quiet_s: float = 3.0, most_s: float = 30.0) -> dict:
    """The emulator's counts once no request has arrived for `quiet_s`.

    Ray ends a killed driver's actors a moment after the driver: requests they sent meanwhile
    belong to the killed run (the rerun sends them again, like rows in flight at the kill).
    """
    deadline = time.time() + most_s
    last = emulator.stats()
    while time.time() < deadline:
        time.sleep(quiet_s)
        now = emulator.stats()
        if now["requests"] == last["requests"]:
            return now
        last = now
    return last


@pytest.mark.ray
def test_kill_the_driver_then_rerun_each_row_once(
    tmp_path: Path,
    slow_emulator: Emulator,  # noqa: F811
    ray_address: str,
) -> None:
    ids = many_reviews(tmp_path)
    job = write_job(tmp_path, slow_emulator.url)
    slow_emulator.reset()
    process = start_ray_driver(job, ray_address, own_group=True)
    wait_for_requests(slow_emulator, 60, process)
    killed_at = time.time()
    os.killpg(process.pid, signal.SIGKILL)  # the driver and everything in its process group
    process.wait()
    first = settled_stats(slow_emulator)
    slow_emulator.reset()
    last_answer = max(first["answered_at"].values()) - killed_at
    print(f"the last request of the killed run was answered {last_answer:.2f} s after the kill")

    status = run_cli("status", str(job))
    assert "rows were in flight when the last run stopped" in status.stdout, status.stdout
    rerun = ray_run(job, ray_address, "--ray-actors", "2")
    assert rerun.returncode == 0, rerun.stderr
    second = slow_emulator.stats()
    again = assert_resumed_without_paying_twice(tmp_path, ids, first, second, killed_at, rerun.stdout)
    reported = in_flight_reported(rerun.stdout)
    print(f"killed after {first['requests']} requests; {len(again)} asked again, {reported} reported in flight")


@pytest.mark.ray
def test_actors_send_only_while_the_driver_lives(
    tmp_path: Path,
    slow_emulator: Emulator,  # noqa: F811
    ray_address: str,
) -> None:
    """A driver that stops answering (here SIGSTOP; a killed one, before Ray ends its actors) stops the sending."""
    ids = many_reviews(tmp_path)
    job = write_job(tmp_path, slow_emulator.url, run={"concurrency": 4})  # 240 rows: about 3 s of sending
    slow_emulator.reset()
    process = start_ray_driver(job, ray_address)
    wait_for_requests(slow_emulator, 30, process)
    process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(DRIVER_GRACE_S + 1.0)  # the actors' leases run out
        frozen = slow_emulator.stats()["requests"]
        time.sleep(2.0)
        assert slow_emulator.stats()["requests"] == frozen, "actors sent while the driver was stopped"
    finally:
        process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert_every_row_once_in_order(tmp_path, ids)
    assert set(slow_emulator.stats()["by_prompt"].values()) == {1}  # and the run went on, each row once
    print(f"{frozen} of {len(ids)} rows sent when the driver stopped; none while it was stopped")


# --- the budget, held for the whole job ------------------------------------------------------


@pytest.mark.ray
def test_a_budget_stops_the_ray_run_and_raising_it_finishes(
    tmp_path: Path, emulator: Emulator, ray_address: str
) -> None:
    ids = many_reviews(tmp_path, 60)
    run = {"concurrency": 4, "max_attempts": 2, "timeout_s": 30, "max_cost": 1.0}
    job = write_job(tmp_path, emulator.url, pricing=PRICING, run=run)
    stopped = ray_run(job, ray_address, "--ray-actors", "2")
    assert stopped.returncode == 4, stopped.stderr
    assert "budget reached: spent" in stopped.stderr and "of max_cost 1.0000 USD" in stopped.stderr
    assert "rows are pending" in stopped.stderr
    assert not (tmp_path / "out" / "result.parquet").exists()
    first = emulator.stats()["requests"]
    assert 0 < first < 60

    status = run_cli("status", str(job))
    spent = float(re.search(r"cost so far: (\d+\.\d+) USD", status.stdout).group(1))  # type: ignore[union-attr]
    assert spent <= 1.0, "the budget was crossed"
    assert f"{first} of 60 rows done: {first} ok, 0 failed; {60 - first} pending" in status.stdout

    again = ray_run(job, ray_address, "--ray-actors", "2", "--max-cost", "100")
    assert again.returncode == 0, again.stderr
    assert_every_row_once_in_order(tmp_path, ids)
    assert emulator.stats()["requests"] == 60  # every row asked exactly once over both runs
    assert set(emulator.stats()["by_prompt"].values()) == {1}
    print(f"budget 1.0 USD: {first} of 60 rows sent, {spent:.4f} USD spent; the rerun sent the other {60 - first}")


@pytest.mark.ray
def test_the_ray_progress_bar_counts_per_image_cost(tmp_path: Path, ray_address: str) -> None:
    """jobs/posters.yaml priced per image: the bar's final cost is the summary's, images included."""
    for folder in ("jobs", "sample_data"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    job = tmp_path / "jobs" / "posters.yaml"
    job.write_text(job.read_text() + "pricing: {input_per_million: 1, output_per_million: 2, per_image: 0.25}\n")
    done = run_cli("run", str(job), "--engine", "ray", "--ray-address", ray_address, env=RAY_CLIENT, timeout=180)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "posters.summary.json").read_text())
    assert summary["cost"] >= 6 * 0.25  # six posters
    bar = re.findall(r"tokens, (\d+\.\d+) USD", done.stderr)
    assert bar and float(bar[-1]) == pytest.approx(summary["cost"], abs=1e-4), done.stderr[-500:]

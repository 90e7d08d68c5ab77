"""Input and output on S3: the CLI as a real process against moto's S3 server, started on loopback.

moto runs in server mode (a real HTTP server, not a mock of the client) with IAM checks on,
so a wrong secret is refused as AWS would refuse it; requests are counted at the emulator.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import polars as pl
import pytest
from botocore.exceptions import ClientError
from conftest import (
    EXPECTED_LABELS,
    REVIEWS,
    Emulator,
    cli_env,
    die_with_parent,
    free_port,
    run_cli,
    run_here,
    start_emulator,
    stop_emulator,
    write_job,
)
from test_resume import in_flight_reported

ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
# The IAM calls moto lets through unsigned: create_user, create_policy, attach_user_policy, create_access_key.
SETUP_CALLS = 4


@dataclass
class S3Server:
    url: str
    key_id: str
    secret: str

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, state: Path, **changes: str | None) -> dict[str, str | None]:
        """The standard AWS variables a user would set for an S3-compatible store, and batchrun's state folder."""
        env: dict[str, str | None] = {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
            "BATCHRUN_STATE_DIR": str(state),
        }
        env.update(changes)
        return env

    def read_parquet(self, bucket: str, key: str) -> pl.DataFrame:
        body = self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return pl.read_parquet(io.BytesIO(body))

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.client().head_object(Bucket=bucket, Key=key)
        except ClientError:
            return False
        return True


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS)}  # then every call must be signed
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process)
        iam = boto3.client(
            "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        iam.create_user(UserName="batchrun")
        policy = iam.create_policy(PolicyName="all", PolicyDocument=json.dumps(ADMIN_POLICY))["Policy"]["Arn"]
        iam.attach_user_policy(UserName="batchrun", PolicyArn=policy)
        key = iam.create_access_key(UserName="batchrun")["AccessKey"]
        yield S3Server(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
            return
        except OSError:
            assert process.poll() is None, "moto's server exited"
            assert time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.1)


def reviews_frame(rows: list[list[Any]] = REVIEWS) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["review_id", "text", "stars"], orient="row")


def upload(s3: S3Server, bucket: str, key: str, frame: pl.DataFrame) -> str:
    data = io.BytesIO()
    if key.endswith(".csv"):
        frame.write_csv(data)
    else:
        frame.write_parquet(data, row_group_size=64)
    s3.client().put_object(Bucket=bucket, Key=key, Body=data.getvalue())
    return f"s3://{bucket}/{key}"


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_input_and_output_on_s3(tmp_path: Path, s3: S3Server, emulator: Emulator, suffix: str) -> None:
    bucket = s3.bucket()
    source = upload(s3, bucket, f"in/reviews.{suffix}", reviews_frame())
    job = write_job(
        tmp_path,
        emulator.url,
        input={"path": source, "id_column": "review_id"},
        output={"path": f"s3://{bucket}/out/labels.parquet"},
    )
    state = tmp_path / "state"
    result = run_here("run", str(job), "--quiet", env=s3.env(state))
    assert result.returncode == 0, result.stderr
    assert f"output: s3://{bucket}/out/labels.parquet" in result.stdout
    df = s3.read_parquet(bucket, "out/labels.parquet")
    assert df["review_id"].to_list() == [r[0] for r in REVIEWS]
    assert set(df["status"]) == {"ok"}
    assert emulator.stats()["requests"] == len(REVIEWS)

    # The checkpoint is on local disk, at a place derived from the output URL, and status says where.
    checkpoint = state / "objects" / "s3" / bucket / "out" / "labels.parquet.batchrun"
    assert (checkpoint / "checkpoint.sqlite").is_file()
    status = run_here("status", str(job), env=s3.env(state))
    assert f"checkpoint: {checkpoint}" in status.stdout, status.stdout
    assert "6 of 6 rows done: 6 ok" in status.stdout
    beside = {p.name for p in tmp_path.iterdir()} - {".job.yaml.checkpoint"}  # the old pointer: see engines/resume.py
    assert beside == {"job.yaml", "state"}  # no output, summary or checkpoint beside the job file

    emulator.reset()  # a rerun resumes from the local checkpoint: nothing is sent again
    again = run_here("run", str(job), "--quiet", env=s3.env(state))
    assert again.returncode == 0, again.stderr
    assert emulator.stats()["requests"] == 0


def test_credentials_in_storage_options_and_a_wrong_secret_masked(
    tmp_path: Path, s3: S3Server, emulator: Emulator
) -> None:
    """input.storage_options / output.storage_options in the job, with no AWS_* variable set: a CSV input
    (read by pyarrow, whose option names differ) and the output; a wrong secret there is masked from the message."""
    bucket = s3.bucket()
    source = upload(s3, bucket, "in/reviews.csv", reviews_frame())

    def options(secret: str) -> dict[str, str]:
        return {
            "aws_endpoint_url": s3.url,
            "aws_access_key_id": s3.key_id,
            "aws_secret_access_key": secret,
            "aws_region": "us-east-1",
            "aws_allow_http": "true",
        }

    no_aws = {name: None for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    env = s3.env(tmp_path / "state", **no_aws)
    output = {"path": f"s3://{bucket}/out/labels.parquet", "storage_options": options(s3.secret)}
    job = write_job(
        tmp_path,
        emulator.url,
        input={"path": source, "id_column": "review_id", "storage_options": options(s3.secret)},
        output=output,
    )
    result = run_here("run", str(job), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert s3.read_parquet(bucket, "out/labels.parquet")["review_id"].to_list() == [r[0] for r in REVIEWS]

    wrong = "wrong-" + s3.secret[6:]
    job = write_job(
        tmp_path,
        emulator.url,
        input={"path": source, "id_column": "review_id", "storage_options": options(wrong)},
        output=output,
    )
    emulator.reset()
    result = run_here("run", str(job), "--quiet", env=env)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "credentials" in result.stderr, result.stderr
    assert wrong not in result.stderr and emulator.stats()["requests"] == 0


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun(tmp_path: Path, s3: S3Server) -> None:
    """Every row once; nothing answered more than a second before the kill is asked again; no partial object."""
    rows = [[f"K{i:04d}", f"Review number {i}: it does what it says.", 1 + i % 5] for i in range(240)]
    bucket = s3.bucket()
    source = upload(s3, bucket, "in/reviews.parquet", reviews_frame(rows))
    emulator = start_emulator("--latency-ms", "40")
    try:
        job = write_job(
            tmp_path,
            emulator.url,
            input={"path": source, "id_column": "review_id"},
            output={"path": f"s3://{bucket}/out/labels.parquet"},
        )
        env = s3.env(tmp_path / "state")
        process = subprocess.Popen(
            [sys.executable, "-m", "batchrun", "run", str(job), "--quiet"],
            env=cli_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while emulator.stats()["requests"] < 60:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run sent nothing"
            time.sleep(0.05)
        killed_at = time.time()
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        first = emulator.stats()
        assert first["requests"] < len(rows), "the run finished before the kill"
        assert not s3.exists(bucket, "out/labels.parquet")  # nothing at the key until the output is complete
        emulator.reset()

        rerun = run_cli("run", str(job), "--quiet", env=env)
        assert rerun.returncode == 0, rerun.stderr
        second = emulator.stats()
    finally:
        stop_emulator(emulator)
    df = s3.read_parquet(bucket, "out/labels.parquet")
    assert df["review_id"].to_list() == [r[0] for r in rows]
    assert set(df["status"]) == {"ok"}
    assert set(second["by_prompt"].values()) <= {1}
    assert len(set(first["by_prompt"]) | set(second["by_prompt"])) == len(rows)
    again = [p for p in second["by_prompt"] if p in first["by_prompt"]]
    for prompt in again:
        answered = first["answered_at"].get(prompt)
        assert answered is None or answered > killed_at - 1.0, f"answered {killed_at - answered:.2f} s before the kill"
    assert len(again) <= in_flight_reported(rerun.stdout)


def test_bad_credentials_and_missing_buckets_are_one_line_and_send_nothing(
    tmp_path: Path, s3: S3Server, emulator: Emulator, reviews: Path
) -> None:
    """In one process, as the Python API would run them: each run's credentials are the environment's as it is
    then (polars keeps the object store it built for a URL, and with it the credentials it read first)."""
    bucket = s3.bucket()
    source = upload(s3, bucket, "in/reviews.parquet", reviews_frame())
    state = tmp_path / "state"
    cases = [
        (source, "out/labels.parquet", {}, None),
        (source, "out/labels.parquet", {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "wrong secret"),
        (source, "out/labels.parquet", {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY"}, "unknown access key"),
        (f"s3://no-such-bucket-{bucket}/reviews.parquet", "out/labels.parquet", {}, "the bucket does not exist"),
        ("reviews.csv", f"s3://no-such-bucket-{bucket}/labels.parquet", {}, "the bucket does not exist"),
        ("reviews.csv", f"s3://{bucket}/labels.parquet", {"AWS_SECRET_ACCESS_KEY": "x"}, "wrong secret"),
    ]
    for source_path, output_path, changes, expected in cases:
        job = write_job(
            tmp_path, emulator.url, input={"path": source_path, "id_column": "review_id"}, output={"path": output_path}
        )
        result = run_here("run", str(job), "--quiet", env=s3.env(state, **changes))
        if expected is None:  # good credentials first, so that a later wrong one could reuse them
            assert result.returncode == 0, result.stderr
            emulator.reset()
            continue
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert "Traceback" not in result.stderr and s3.secret not in result.stderr
    # An object batchrun did not write is never written over.
    s3.client().put_object(Bucket=bucket, Key="theirs.parquet", Body=b"someone else's data")
    job = write_job(tmp_path, emulator.url, output={"path": f"s3://{bucket}/theirs.parquet"})
    result = run_here("run", str(job), "--quiet", env=s3.env(state))
    assert result.returncode == 2 and "an object is already there" in result.stderr, result.stderr
    assert s3.client().get_object(Bucket=bucket, Key="theirs.parquet")["Body"].read() == b"someone else's data"
    assert emulator.stats()["requests"] == 0


def test_a_store_in_trouble_is_not_taken_for_an_object_at_the_key(
    tmp_path: Path, emulator: Emulator, reviews: Path
) -> None:
    """A store that answers 500 says so: it must not be reported as someone else's object at the output key."""

    class Failing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_PUT = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job = write_job(tmp_path, emulator.url, output={"path": "s3://some-bucket/out/labels.parquet"})
        env = {
            "AWS_ACCESS_KEY_ID": "AKIATEST",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
            "BATCHRUN_STATE_DIR": str(tmp_path / "state"),
            # object_store's retries of a 500, without their ~10 s of back-off; polars reads these once
            # per process, so this run is a process of its own
            "POLARS_CLOUD_RETRY_INIT_BACKOFF_MS": "1",
            "POLARS_CLOUD_RETRY_MAX_BACKOFF_MS": "10",
        }
        result = run_cli("run", str(job), "--quiet", env=env)
    finally:
        server.shutdown()
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "500" in lines[0] and "already there" not in lines[0], result.stderr
    assert emulator.stats()["requests"] == 0


def test_a_storage_option_of_the_wrong_type_is_named_not_shown(tmp_path: Path, emulator: Emulator) -> None:
    """A secret YAML read as a number is refused by name; its value appears in no message."""
    secret = "98765432101"
    options = {"aws_access_key_id": "AKIATEST", "aws_secret_access_key": int(secret)}
    job = write_job(tmp_path, emulator.url, output={"path": "s3://b/out.parquet", "storage_options": options})
    result = run_here("validate", str(job))
    assert result.returncode == 2, result.stderr
    assert "output.storage_options.aws_secret_access_key" in result.stderr, result.stderr
    assert secret not in result.stderr + result.stdout


def test_an_option_polars_refuses_is_named_not_taken_for_an_object_at_the_key(
    tmp_path: Path, emulator: Emulator, reviews: Path
) -> None:
    options = {"aws_access_key_id": "AKIATEST", "aws_secret_access_key": "a-secret-of-the-job", "max_retries": "many"}
    job = write_job(tmp_path, emulator.url, output={"path": "s3://b/out.parquet", "storage_options": options})
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "output.storage_options" in lines[0] and "'max_retries'" in lines[0], result.stderr
    assert "already there" not in lines[0] and "a-secret-of-the-job" not in lines[0]
    assert emulator.stats()["requests"] == 0


@pytest.mark.ray
def test_engine_ray_reads_its_ranges_from_s3_and_uploads_the_output(
    tmp_path: Path, s3: S3Server, emulator: Emulator
) -> None:
    pytest.importorskip("ray")
    rows = [[f"Y{i:04d}", f"Review number {i}: it does what it says.", 1 + i % 5] for i in range(400)]
    bucket = s3.bucket()
    source = upload(s3, bucket, "in/reviews.parquet", reviews_frame(rows))
    job = write_job(
        tmp_path,
        emulator.url,
        input={"path": source, "id_column": "review_id"},
        output={"path": f"s3://{bucket}/out/labels.parquet"},
    )
    result = run_cli("run", str(job), "--quiet", "--engine", "ray", env=s3.env(tmp_path / "state"), timeout=300)
    assert result.returncode == 0, result.stderr
    df = s3.read_parquet(bucket, "out/labels.parquet")
    assert df["review_id"].to_list() == [r[0] for r in rows]
    assert set(df["status"]) == {"ok"}
    assert sorted(emulator.stats()["by_prompt"].values()) == [1] * len(rows)  # every row asked once


def test_an_openai_batch_file_on_s3(tmp_path: Path, s3: S3Server, emulator: Emulator) -> None:
    """A Batch file is streamed from S3 like any JSONL (input.format says what it is: nothing is read to guess)."""
    bucket = s3.bucket()
    system = {"role": "system", "content": "You label product reviews. Answer positive, negative or neutral."}
    lines = [
        {
            "custom_id": f"q-{rid}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-5.4", "messages": [system, {"role": "user", "content": f"Review: {text}"}]},
        }
        for rid, text, _ in REVIEWS
    ]
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    s3.client().put_object(Bucket=bucket, Key="in/requests.jsonl", Body=body)
    job = {
        "name": "batch-on-s3",
        "input": {"path": f"s3://{bucket}/in/requests.jsonl", "format": "openai-batch"},
        "provider": {"base_url": emulator.url, "api_key_env": "TEST_RELAY_KEY"},
        "output": {"path": "out/result.parquet", "openai_batch": "out/result.output.jsonl"},
    }
    (tmp_path / "job.yaml").write_text(json.dumps(job), encoding="utf-8")
    result = run_here("run", str(tmp_path / "job.yaml"), "--quiet", env=s3.env(tmp_path / "state"))
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["custom_id"].to_list() == [line["custom_id"] for line in lines]
    assert df["response_text"].to_list() == [EXPECTED_LABELS[rid] for rid, _, _ in REVIEWS]
    assert emulator.stats()["requests"] == len(REVIEWS)
    output = (tmp_path / "out" / "result.output.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["custom_id"] for line in output] == df["custom_id"].to_list()

"""Peak memory of reading a job's input from S3 against the same file read locally.

Starts moto's S3 server on loopback (pip install 'moto[server]'), writes an input of
`--rows` rows, uploads it, and in a fresh process per case reads it the way a run does
(InputTable: the row count, every batch in order, and the content digest a remote input
is fingerprinted by). Prints each case's peak RSS (the kernel's VmHWM, of that process) and its
ratio to the local read of the same file.

    python scripts/s3_read_memory.py --rows 1000000
    python scripts/s3_read_memory.py --rows 1000000 --format csv
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def read_all(path: str) -> None:
    """In the measured process: read the input as a run does, then print the peak RSS."""
    from batchrun.job.inputs import InputTable

    started = time.perf_counter()
    table = InputTable(path, "review_id", Path("job.yaml"))
    rows = sum(batch.height for batch in table.batches())
    assert rows == table.count()
    table.content_digest()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (which made the input) across exec.
    status = Path("/proc/self/status").read_text()
    peak_mb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    print(json.dumps({"rows": rows, "peak_mb": round(peak_mb, 1), "seconds": round(time.perf_counter() - started, 1)}))


def measure(path: str, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--read", path], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    import boto3
    import polars as pl

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    parser.add_argument("--read", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        read_all(args.read)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / f"reviews.{args.format}"
            ids = pl.int_range(args.rows, eager=True).alias("review_id")
            noise = [pl.col("review_id").hash(seed).cast(pl.String) for seed in range(3)]  # text that does not compress
            frame = pl.DataFrame(ids).select(
                pl.col("review_id").cast(pl.String).str.zfill(9),
                pl.concat_str([pl.lit("The kettle boils fast; ref"), *noise], separator=" ").alias("text"),
            )
            frame.write_parquet(local) if args.format == "parquet" else frame.write_csv(local)
            del frame
            client = boto3.client(
                "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
            )
            client.create_bucket(Bucket="inputs")
            client.upload_file(str(local), "inputs", local.name)
            size_mb = local.stat().st_size / 2**20
            here = measure(str(local), env)
            remote = measure(f"s3://inputs/{local.name}", env)
    finally:
        server.terminate()
        server.wait()
    print(f"{args.rows:,} rows, {args.format}, {size_mb:.1f} MB file; peak RSS of reading it as a run does:")
    print(f"  local file        {here['peak_mb']:8.1f} MB  x1.00  ({here['seconds']} s)")
    ratio = remote["peak_mb"] / here["peak_mb"]
    print(f"  s3:// (moto)      {remote['peak_mb']:8.1f} MB  x{ratio:.2f}  ({remote['seconds']} s)")


if __name__ == "__main__":
    main()

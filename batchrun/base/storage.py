"""Object storage: which URLs batchrun takes, where their local state lives, and their errors.

Reading and writing go through polars' own cloud support (object_store, in Rust):
Parquet is read by byte ranges, a slice at a time, with credentials from the standard
environment (`AWS_*`, including `AWS_ENDPOINT_URL`; Google's and Azure's variables) or
the job's `storage_options`. CSV and JSONL are streamed from S3 by pyarrow's S3
filesystem and from https by the standard library, so they too are read in bounded
blocks (polars would fetch them whole). Why and what was measured: docs/object-storage.md.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import stat
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

import polars as pl

from batchrun.base.errors import JobError

INPUT_SCHEMES = ("s3", "gs", "az", "hf", "https")
OUTPUT_SCHEMES = ("s3", "gs", "az")
STREAMED_SCHEMES = ("s3", "https")  # CSV and JSONL read in blocks from these
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


def is_url(path: str) -> bool:
    return _URL.match(path) is not None


def scheme(url: str) -> str:
    found = _URL.match(url)
    return found.group(1).lower() if found else ""


def url_problem(path: str, output: bool) -> str | None:
    """Why batchrun cannot use this URL as an input (or output) path; None when it can (or it is a file path)."""
    if not is_url(path):
        return None
    schemes = OUTPUT_SCHEMES if output else INPUT_SCHEMES
    given = path.split("://", 1)[0]
    if given != given.lower() and scheme(path) in schemes:  # polars and pyarrow know the schemes in lower case only
        return f"write the scheme in lower case: {scheme(path)}://{path.split('://', 1)[1]}"
    if scheme(path) not in schemes:
        return f"{scheme(path)}:// is not supported; use a local path or {', '.join(s + '://' for s in schemes)}"
    if output and Path(path).suffix.lower() != ".parquet":
        return "an object-storage output must name a .parquet object"
    return None


def state_root() -> Path:
    """batchrun's own folder for state that has no place beside the user's files: BATCHRUN_STATE_DIR,
    else $XDG_STATE_HOME/batchrun, else ~/.local/state/batchrun."""
    if explicit := os.environ.get("BATCHRUN_STATE_DIR"):
        return Path(explicit).expanduser().resolve()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).expanduser().resolve() / "batchrun"


_TEMPORARY_BYTES = 6  # random bytes in a temporary's name, as hex


def remove_leftovers(target: Path) -> None:
    """Removes the temporaries of `target` a killed writer left (`new_file_beside`'s names, regular files only:
    a link is never followed). Only for a file one run writes at a time (under the checkpoint's lock)."""
    name = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{{2 * _TEMPORARY_BYTES}}}\.partial")
    for path in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        if name.fullmatch(path.name) and stat.S_ISREG(path.lstat().st_mode):
            path.unlink(missing_ok=True)


@contextmanager
def new_file_beside(target: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A new file of batchrun's own in `target`'s folder, open for writing, and its path.

    Created exclusively under a fresh name (O_CREAT | O_EXCL, which also refuses a symbolic link), so
    nothing planted there (a link to another file, a file of the user's) is ever written through or
    over. The block may rename it into place; whatever is left of it at the end is removed.
    """
    while True:
        path = target.with_name(f".{target.name}.{secrets.token_hex(_TEMPORARY_BYTES)}.partial")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue  # a name taken by chance or on purpose: another fresh one
    try:
        with os.fdopen(fd, "wb") as file:
            yield file, path
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def replacing(target: Path) -> Iterator[BinaryIO]:
    """Writes `target` whole or not at all: into a new file beside it (`new_file_beside`), renamed over it
    when the block ends. A rename replaces a link at `target` itself, never the file it points to."""
    with new_file_beside(target) as (file, path):
        yield file
        file.close()
        os.replace(path, target)


def local_stand_in(url: str) -> Path:
    """The output URL's place on this machine, derived from the URL alone: the checkpoint
    (`<stand-in>.batchrun/`), the summary and the output while it is written live beside it."""
    bucket_and_key = url.split("://", 1)[1].strip("/")
    parts = [p for p in bucket_and_key.split("/") if p not in ("", ".", "..")]
    return state_root().joinpath("objects", scheme(url), *parts)


# polars keeps the object store it built for a URL and its options for the life of the process, with
# the credentials it found in the environment then: a later run in the same process (the Python API)
# with other AWS_* values went on using the first ones. Named in the options, they are part of that key.
_AWS_CREDENTIALS_ENV = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
}


def storage_options(url: str, options: dict[str, str] | None) -> dict[str, str] | None:
    """The job's storage_options for polars, with S3 credentials from the environment as they are now
    when the job names none (None: polars reads the environment)."""
    given = dict(options or {})
    if scheme(url) == "s3":
        named = {k.lower() for k in given}
        for key, variable in _AWS_CREDENTIALS_ENV.items():
            if key not in named and os.environ.get(variable):
                given[key] = os.environ[variable]
    return given or None


@contextmanager
def open_stream(url: str, options: dict[str, str] | None) -> Iterator[IO[bytes]]:
    """The object's bytes as a stream read front to back (CSV and JSONL inputs)."""
    kind = scheme(url)
    if kind == "https":
        with urllib.request.urlopen(url, timeout=60) as response:
            yield response
    elif kind == "s3":
        from pyarrow import fs

        s3 = fs.S3FileSystem(**_pyarrow_s3_options(options))
        with s3.open_input_stream(url.split("://", 1)[1]) as stream:
            yield stream
    else:
        raise JobError(f"{url}: CSV and JSONL on {kind}:// are not supported yet; use Parquet there")


def _pyarrow_s3_options(options: dict[str, str] | None) -> dict[str, Any]:
    """storage_options in object_store's names (what polars takes), in pyarrow's S3FileSystem's names."""
    names = {
        "aws_access_key_id": "access_key",
        "aws_secret_access_key": "secret_key",
        "aws_session_token": "session_token",
        "aws_region": "region",
        "aws_endpoint_url": "endpoint_override",
        "aws_endpoint": "endpoint_override",
    }
    given = {k.lower(): v for k, v in (options or {}).items()}
    unknown = sorted(set(given) - set(names) - {"aws_allow_http"})
    if unknown:
        raise JobError(f"storage_options: {unknown[0]!r} is not one batchrun can pass on; see docs/object-storage.md")
    translated = {names[k]: v for k, v in given.items() if k in names}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_override" not in translated:  # pyarrow does not read these itself
        translated["endpoint_override"] = endpoint
    return translated


def check_output(url: str, options: dict[str, str] | None, fresh: bool) -> None:
    """Before anything is sent: the output's bucket exists, the credentials are good, and (for a job
    without a checkpoint, `fresh`) no object is at the key, as batchrun never writes over one it did not write.
    Nothing is written."""
    try:
        pl.scan_parquet(url, storage_options=storage_options(url, options)).collect_schema()
    except Exception as e:  # polars raises many kinds for cloud errors
        if (problem := explain(e)) is not None:
            raise JobError(f"output.path {url}: {problem}") from None
        if isinstance(e, FileNotFoundError):
            return  # nothing at the key yet
        if isinstance(e, ValueError):  # polars refused an option; its message holds the value, maybe a secret
            raise JobError(f"output.storage_options: {_refused_option(e)}; see docs/object-storage.md") from None
        if isinstance(e, OSError):  # the store did not answer as it should (polars' parse errors are not OSError)
            raise JobError(f"output.path {url}: cannot check the output key: {first_line(e)}") from None
    if fresh:
        raise JobError(
            f"output.path {url}: an object is already there and no checkpoint of this job wrote it; "
            "batchrun does not write over it: remove it or choose another output.path"
        )


def _refused_option(e: ValueError) -> str:
    named = re.search(r"for '([A-Za-z0-9_]+)'", str(e))
    return f"polars refused the value of {named.group(1)!r}" if named else "polars refused an option"


def upload(local: Path, url: str, options: dict[str, str] | None) -> None:
    """The finished local output to its URL. object_store puts it in one request or a multipart
    upload completed at the end, so nothing is at the key until the whole object is."""
    try:
        pl.scan_parquet(local).sink_parquet(url, storage_options=storage_options(url, options))
    except Exception as e:
        raise JobError(f"output.path {url}: could not upload the output: {explain(e) or first_line(e)}") from None


_PROBLEMS = [
    ("NoSuchBucket", "the bucket does not exist"),
    ("InvalidAccessKeyId", "the credentials were refused (unknown access key); check AWS_ACCESS_KEY_ID"),
    ("SignatureDoesNotMatch", "the credentials were refused (wrong secret); check AWS_SECRET_ACCESS_KEY"),
    ("AccessDenied", "access denied; check the credentials and the bucket's permissions"),
    ("ExpiredToken", "the credentials have expired"),
    ("403 Forbidden", "access denied; check the credentials and the bucket's permissions"),
    ("401 Unauthorized", "the credentials were refused"),
    ("Connection refused", "cannot connect to the storage endpoint (check AWS_ENDPOINT_URL)"),
    ("error sending request", "cannot connect to the storage endpoint"),
]


def explain(e: BaseException) -> str | None:
    """A storage error as one line a person can act on; None when it is not one of the known ones."""
    text = str(e)
    for marker, problem in _PROBLEMS:
        if marker.lower() in text.lower():
            return problem
    return None


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__

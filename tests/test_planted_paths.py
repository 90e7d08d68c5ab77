"""Planted paths and other people's files (issue 25, items 4-9 and 15): batchrun writes only files of its own.

Each test runs the CLI against the emulator (a real server on loopback) with something planted where
batchrun writes: a symbolic link at a temporary file's old fixed name, an output that doubles as another,
a folder of the user's images, another job's checkpoint, a link in the state folder, a read-only
checkpoint, an upper-case URL scheme. The planted file must come through unchanged, and a refusal must
cost nothing (no request sent, nothing moved).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import REVIEWS, Emulator, run_here, write_csv, write_job
from test_images import image_job, rows_csv
from test_request_files import batch_job, chat_line, write_lines

from batchrun.pipeline import images

PRECIOUS = b"the user's own file\n"


def victim(folder: Path) -> Path:
    path = folder / "precious.txt"
    path.write_bytes(PRECIOUS)
    return path


def batch_input(folder: Path) -> Path:
    return write_lines(folder / "requests.jsonl", [chat_line(f"c-{i}", text) for i, (_, text, _) in enumerate(REVIEWS)])


def test_temporary_files_are_never_written_through_a_planted_link(tmp_path: Path, emulator: Emulator) -> None:
    batch_input(tmp_path)
    precious = victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    old_names = ["result.parquet", "result.summary.json", "result.report.html", "result.output.jsonl"]
    for name in old_names:  # the fixed temporary names batchrun used to write through
        (out / f".{name}.partial").symlink_to(precious)
    leftover = out / ".result.parquet.0123456789ab.partial"  # what a run killed while writing leaves
    leftover.write_bytes(b"half a file")
    planted = out / ".result.output.jsonl.0123456789ab.partial"  # a link under such a name is not followed
    planted.symlink_to(precious)
    output = {"path": "out/result.parquet", "openai_batch": "out/result.output.jsonl"}
    job = batch_job(tmp_path, emulator.url, output=output)
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stderr
    report = run_here("report", str(job))
    assert report.returncode == 0, report.stderr
    assert precious.read_bytes() == PRECIOUS
    for name in old_names:
        assert (out / name).is_file() and not (out / name).is_symlink()
        assert (out / f".{name}.partial").is_symlink()  # left as planted, not written through or removed
    assert not leftover.exists() and planted.is_symlink()
    assert pl.read_parquet(out / "result.parquet")["status"].to_list() == ["ok"] * len(REVIEWS)
    assert len((out / "result.output.jsonl").read_text().splitlines()) == len(REVIEWS)


def test_an_image_is_never_written_through_a_planted_link(tmp_path: Path, emulator: Emulator) -> None:
    precious = victim(tmp_path)
    rows_csv(tmp_path, [["M1", ""]])
    job = image_job(tmp_path, emulator.url, "openai-chat", "gemini-2.5-flash-image", prompt={"user": "A cat."})
    folder = tmp_path / "out" / "result_images"
    folder.mkdir(parents=True)
    (folder / ".M1_0.png.partial").symlink_to(precious)
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 0, result.stderr
    assert precious.read_bytes() == PRECIOUS
    assert (folder / "M1_0.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("batch_path", "named"),
    [
        ("out/result.summary.json", "the summary of output.path"),
        ("out/result.report.html", "the report of output.path"),
        ("out/result.parquet", "output.path"),
    ],
)
def test_outputs_that_share_a_path_are_refused_up_front(
    tmp_path: Path, emulator: Emulator, batch_path: str, named: str
) -> None:
    batch_input(tmp_path)
    output = {"path": "out/result.parquet", "openai_batch": batch_path}
    job = batch_job(tmp_path, emulator.url, output=output)
    for command in ("validate", "run"):
        result = run_here(command, str(job))
        assert result.returncode == 2, result.stdout + result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and "output.openai_batch" in line and named in line, line
    assert emulator.stats()["requests"] == 0


POSTER_PARAMS = {"responseModalities": ["TEXT", "IMAGE"]}


def test_an_images_dir_holding_the_users_files_is_refused(tmp_path: Path, emulator: Emulator) -> None:
    rows_csv(tmp_path, [["r1", ""], ["r2", ""]])
    mine = tmp_path / "my_pictures"
    mine.mkdir()
    (mine / "r1_0.png").write_bytes(PRECIOUS)
    output = {"path": "out/result.parquet", "images_dir": "my_pictures"}
    job = image_job(
        tmp_path,
        emulator.url,
        "gemini",
        "gemini-2.5-flash-image",
        prompt={"user": "A poster."},
        params=POSTER_PARAMS,
        output=output,
    )
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 2, result.stderr
    assert "output.images_dir" in result.stderr and "did not write" in result.stderr
    assert (mine / "r1_0.png").read_bytes() == PRECIOUS and emulator.stats()["requests"] == 0

    (mine / "r1_0.png").unlink()  # an empty folder becomes batchrun's, and its own files are replaced on reruns
    assert run_here("run", str(job), "--quiet").returncode == 0
    assert (mine / images.OWN_FOLDER_MARK).is_file() and (mine / "r1_0.png").read_bytes().startswith(b"\x89PNG")
    again = run_here("run", str(job), "--quiet", "--restart")
    assert again.returncode == 0, again.stderr


def test_images_beside_the_output_are_no_reason_to_refuse_a_rerun(tmp_path: Path, emulator: Emulator) -> None:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "stars"], REVIEWS)
    job = write_job(tmp_path, emulator.url, output={"path": "out/result.parquet", "images_dir": "out"})
    for _ in range(2):  # the second run finds only the first one's output, summary and checkpoint there
        result = run_here("run", str(job), "--quiet")
        assert result.returncode == 0, result.stderr


def test_adopting_another_jobs_checkpoint_is_refused_before_anything_moves(tmp_path: Path, emulator: Emulator) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, rows in ((first, REVIEWS), (second, [[i, f"another {text}", s] for i, text, s in REVIEWS])):
        folder.mkdir()
        write_csv(folder / "reviews.csv", ["review_id", "text", "stars"], rows)
    first_job = write_job(first, emulator.url)
    second_job = write_job(second, emulator.url)
    assert run_here("run", str(first_job), "--quiet").returncode == 0
    checkpoint = first / "out" / "result.parquet.batchrun"
    sent = emulator.stats()["requests"]

    refused = run_here("run", str(second_job), "--quiet", "--adopt-checkpoint", str(checkpoint))
    assert refused.returncode == 2 and "not moved" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert (checkpoint / "checkpoint.sqlite").is_file() and not (second / "out" / "result.parquet.batchrun").exists()
    assert emulator.stats()["requests"] == sent
    status = run_here("status", str(first_job))
    assert f"{len(REVIEWS)} of {len(REVIEWS)} rows done" in status.stdout, status.stdout


def test_the_state_folders_note_is_not_written_through_a_link(tmp_path: Path, emulator: Emulator) -> None:
    precious = victim(tmp_path)
    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "stars"], REVIEWS)
    job = write_job(tmp_path, emulator.url)
    state = tmp_path / "state"
    note = state / "jobs" / hashlib.sha256(str(job.resolve()).encode()).hexdigest()[:24]
    note.parent.mkdir(parents=True)
    note.symlink_to(precious)
    result = run_here("run", str(job), "--quiet", env={"BATCHRUN_STATE_DIR": str(state)})
    assert result.returncode == 0, result.stderr
    assert precious.read_bytes() == PRECIOUS
    assert not note.is_symlink() and note.read_text().startswith(str(tmp_path / "out" / "result.parquet.batchrun"))


@pytest.fixture
def checkpoint_mount(tmp_path: Path) -> Iterator[Path]:
    """A small file system of its own where the checkpoint goes, so it can be made read-only alone."""
    folder = tmp_path / "out" / "result.parquet.batchrun"
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_status_and_report_read_a_read_only_checkpoint(
    tmp_path: Path, checkpoint_mount: Path, emulator: Emulator
) -> None:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "stars"], REVIEWS)
    job = write_job(tmp_path, emulator.url)
    assert run_here("run", str(job), "--quiet").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(checkpoint_mount)], check=True)
    status = run_here("status", str(job))
    assert status.returncode == 0, status.stderr
    assert f"{len(REVIEWS)} of {len(REVIEWS)} rows done: {len(REVIEWS)} ok" in status.stdout
    report = run_here("report", str(job))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "out" / "result.report.html").is_file()


@pytest.mark.parametrize("key", ["input", "output"])
def test_an_upper_case_url_scheme_is_refused_up_front(tmp_path: Path, emulator: Emulator, key: str) -> None:
    write_csv(tmp_path / "reviews.csv", ["review_id", "text", "stars"], REVIEWS)
    paths = {"input": {"path": "S3://bucket/reviews.parquet"}, "output": {"path": "S3://bucket/result.parquet"}}
    job = write_job(tmp_path, emulator.url, **{key: paths[key]})
    for command in ("validate", "run"):
        result = run_here(command, str(job))
        assert result.returncode == 2, result.stdout + result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and f"{key}.path" in line and "s3://bucket/" in line and "lower case" in line, line
    assert emulator.stats()["requests"] == 0

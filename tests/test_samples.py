"""The sample jobs of the README, each run with its one command on the built-in emulator."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import polars as pl
import pytest
from conftest import REPO, run_here
from PIL import Image

from batchrun.emulator.pictures import describe, main_colour
from batchrun.pipeline import images


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of jobs/ and sample_data/, so the samples write their out/ there."""
    for folder in ("jobs", "sample_data"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def run_sample(project: Path, name: str, output: str | None = None) -> pl.DataFrame:
    job = project / "jobs" / f"{name}.yaml"
    checked = run_here("validate", str(job))
    assert checked.returncode == 0 and not checked.stderr, checked.stderr
    result = run_here("run", str(job), "--quiet", cwd=project)
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(project / "out" / f"{output or name}.parquet")
    assert set(df["status"]) == {"ok"}, df["error"].unique().to_list()
    return df


def test_caption(project: Path) -> None:
    df = run_sample(project, "caption")
    assert df.height == 5
    for subject, caption in zip(df["subject"], df["response_text"]):
        colour = caption.removeprefix("A 64x48 PNG, mostly ").removesuffix(".")
        assert colour in subject, (subject, caption)


def test_posters(project: Path) -> None:
    df = run_sample(project, "posters")
    assert df.height == 6
    for row in df.iter_rows(named=True):
        (path,) = row["image_paths"]
        assert Path(path) == project / "out" / "posters" / f"{row['brief_id']}_0.png"
        with Image.open(path) as image:
            image.verify()
            assert image.size == (48, 64)  # aspectRatio 3:4
        if row["reference_image"]:
            reference = (project / "sample_data" / row["reference_image"]).read_bytes()
            assert describe(Path(path).read_bytes()).endswith(f"mostly {main_colour(reference)}")
    written = [p for p in (project / "out" / "posters").iterdir() if p.name != images.OWN_FOLDER_MARK]
    assert len(written) == 6  # the drafts were not kept


def test_extract(project: Path) -> None:
    df = run_sample(project, "extract")
    assert df.height == 300 and df["response_text"].null_count() == 300
    calls = {row_id: calls[0] for row_id, calls in zip(df["review_id"], df["tool_calls"].to_list())}
    assert {c["name"] for c in calls.values()} == {"record_review"}
    for call in calls.values():
        args = orjson.loads(call["arguments"])
        assert args["sentiment"] in ("positive", "negative", "neutral")
        assert isinstance(args["would_recommend"], bool) and 1 <= args["rating_guess"] <= 5
    assert orjson.loads(calls["R1001"]["arguments"])["sentiment"] == "positive"  # "I love this USB-C charger..."


def test_complete(project: Path) -> None:
    df = run_sample(project, "complete")
    assert df.height == 300 and set(df["finish_reason"]) == {"stop"}
    assert set(df["response_text"]) == {"positive", "negative", "neutral"}
    demo = run_sample(project, "demo", "review-sentiment")  # the same reviews labelled through chat
    assert df["response_text"].to_list() == demo["label"].to_list()


def test_per_image_pricing_counts_in_summary_status_and_output_alike(project: Path) -> None:
    job = project / "jobs" / "posters.yaml"
    text = job.read_text() + "pricing: {input_per_million: 1, output_per_million: 2, per_image: 0.25}\n"
    job.write_text(text)
    df = run_sample(project, "posters")
    summary = orjson.loads((project / "out" / "posters.summary.json").read_bytes())
    images = sum(len(paths) for paths in df["image_paths"])
    tokens = (df["prompt_tokens"].sum() * 1 + df["completion_tokens"].sum() * 2) / 1e6
    assert images == 6
    assert abs(df["cost"].sum() - (tokens + 0.25 * images)) < 1e-9
    assert abs(summary["cost"] - df["cost"].sum()) < 1e-6
    status = run_here("status", str(job))
    assert f"cost so far: {summary['cost']:.4f}" in status.stdout, status.stdout


def test_batch_file(project: Path) -> None:
    df = run_sample(project, "batch-file")
    assert df.height == 8 and set(df["url"]) == {"/v1/chat/completions", "/v1/completions"}
    lines = [orjson.loads(line) for line in (project / "out" / "batch-file.output.jsonl").read_bytes().splitlines()]
    assert [line["custom_id"] for line in lines] == df["custom_id"].to_list()
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in lines)


def test_conversations(project: Path) -> None:
    df = run_sample(project, "conversations")
    assert df["conversation_id"].to_list() == ["C1", "C2", "C3"]
    assert df["messages"].list.len().to_list() == [3, 3, 1]  # the conversations, kept as input columns

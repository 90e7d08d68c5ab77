"""OpenAI image generation and editing (provider.api: openai-images) end to end on the emulator, over loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import REPO, Emulator, assert_finished, run_cli, run_here, write_csv, write_job
from PIL import Image
from test_resume import start_run, wait_for_requests

from batchrun.emulator.pictures import main_colour, palette_rgb
from batchrun.results.output import summary_path

SAMPLES = REPO / "sample_data"
MASK = SAMPLES / "masks" / "centre.png"


def images_job(folder: Path, url: str, rows: list[list[str]], **overrides: Any) -> Path:
    """An openai-images job over `rows` (id, idea, photo) in `folder`/data/ideas.csv."""
    (folder / "data").mkdir(exist_ok=True)
    shutil.copytree(SAMPLES / "images", folder / "data" / "images", dirs_exist_ok=True)
    shutil.copy(MASK, folder / "data" / "mask.png")
    write_csv(folder / "data" / "ideas.csv", ["id", "idea", "photo"], rows)
    job: dict[str, Any] = {
        "input": {"path": "data/ideas.csv", "id_column": "id"},
        "provider": {"api": "openai-images", "base_url": url, "api_key_env": "TEST_RELAY_KEY"},
        "model": "gpt-image-1",
        "prompt": {"user": "{{ idea }}"},
        "params": {},
        "pricing": {"input_per_million": 0, "output_per_million": 0, "per_image": 0.25},
        "run": {"concurrency": 4, "max_attempts": 3, "timeout_s": 30},
    }
    job.update(overrides)
    return write_job(folder, url, **job)


def run_ok(job: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    output = job.parent / "out" / "result.parquet"
    result = run_here("run", str(job), "--quiet")
    assert_finished(result, output)
    return pl.read_parquet(output), json.loads(summary_path(output).read_text())


IDEAS = [["G1", "a red kite", ""], ["G2", "a blue boat", ""], ["G3", "a green hill", ""]]


def test_generation_saves_every_image_and_prices_each(tmp_path: Path, emulator: Emulator) -> None:
    job = images_job(tmp_path, emulator.url, IDEAS, params={"size": "1536x1024", "n": 2})
    df, summary = run_ok(job)
    assert df["status"].to_list() == ["ok"] * 3
    for row_id, paths in zip(df["id"], df["image_paths"]):
        assert [Path(p).name for p in paths] == [f"{row_id}_0.png", f"{row_id}_1.png"]
        with Image.open(paths[0]) as image:
            assert image.size == (64, 43)  # 1536x1024, scaled down by the emulator
    assert summary["cost"] == pytest.approx(3 * 2 * 0.25)
    assert emulator.stats()["by_route"] == {"/v1/images/generations": 3}


def test_edit_sends_the_image_and_the_mask_as_a_form(tmp_path: Path, emulator: Emulator) -> None:
    rows = [["E1", "make it glow", "images/rose.png"], ["E2", "add a moon", "images/sea.png"]]
    prompt = {"user": "{{ idea }}", "images": ["{{ photo }}", "mask.png"]}
    job = images_job(tmp_path, emulator.url, rows, prompt=prompt, params={"mask": "last", "size": "1024x1024"})
    df, _ = run_ok(job)
    assert df["status"].to_list() == ["ok", "ok"]
    for (_, idea, photo), text, (path,) in zip(rows, df["response_text"], df["image_paths"]):
        # The emulator read one image and a mask out of the multipart form, and says so.
        assert text.startswith(f"{idea} (a 64x48 PNG, mostly") and "; mask: a 64x48 PNG" in text
        with Image.open(path) as image:  # the photo lends the edit its background
            assert image.getpixel((0, 0)) == palette_rgb(main_colour((SAMPLES / photo).read_bytes()))
    assert emulator.stats()["by_route"] == {"/v1/images/edits": 2}


def test_edit_without_mask_and_url_answers_are_downloaded(tmp_path: Path, emulator: Emulator) -> None:
    rows = [["U1", "brighter", "images/forest.png"], ["U2", "nothing to edit", ""]]
    prompt = {"user": "{{ idea }}", "images": ["{{ photo or '' }}"]}  # an empty cell adds no image
    job = images_job(tmp_path, emulator.url, rows, prompt=prompt, params={"response_format": "url", "n": 2})
    df, summary = run_ok(job)
    assert df["response_text"][0] == "brighter (a 64x48 PNG, mostly green)"  # no mask sent
    for path in df["image_paths"][0]:
        with Image.open(path) as image:
            image.verify()
    assert summary["cost"] == pytest.approx(2 * 0.25)
    # A row with no image to edit is its own input error, and nothing is sent for it.
    assert df["error_class"][1] == "input" and "prompt.images are empty" in df["error"][1]
    assert emulator.stats()["by_prompt"] == {"brighter": 1}


def test_an_image_link_larger_than_the_cap_is_a_row_error(tmp_path: Path, emulator: Emulator) -> None:
    job = images_job(
        tmp_path,
        emulator.url,
        IDEAS[:1],
        params={"response_format": "url"},
        prompt={"user": "{{ idea }}", "max_image_mb": 0.0001},  # 104 bytes: less than the emulator's PNG
    )
    output = tmp_path / "out" / "result.parquet"
    result = run_here("run", str(job), "--quiet")
    assert_finished(result, output)
    df = pl.read_parquet(output)
    assert df["error_class"][0] == "image_download" and "prompt.max_image_mb" in df["error"][0]


BAD_JOBS: dict[str, tuple[dict[str, Any], str]] = {
    "stream": ({"stream": True}, "stream: openai-images does not stream; remove stream: true"),
    "system prompt": ({"prompt": {"system": "s", "user": "u"}}, "prompt.system: openai-images takes one prompt"),
    "mask without two images": ({"params": {"mask": "last"}}, "params.mask: mask: last needs two prompt.images"),
    "tools": ({"output": {"path": "o.parquet", "parse": "tool"}}, "output.parse: openai-images has no tools"),
    "owned param": ({"params": {"prompt": "x"}}, "params.prompt: batchrun sets this itself"),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_what_the_images_api_cannot_do_is_refused_in_one_line(case: str, tmp_path: Path, emulator: Emulator) -> None:
    overrides, expected = BAD_JOBS[case]
    job = images_job(tmp_path, emulator.url, IDEAS, **overrides)
    result = run_here("run", str(job), "--quiet")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr
    assert emulator.stats()["requests"] == 0


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_pays_each_row_once(tmp_path: Path, slow_emulator: Emulator) -> None:
    ideas = [[f"K{i:03d}", f"idea number {i}", ""] for i in range(120)]
    job = images_job(tmp_path, slow_emulator.url, ideas, run={"concurrency": 8, "timeout_s": 30})
    slow_emulator.reset()
    process = start_run(job)
    wait_for_requests(slow_emulator, 30, process)
    killed_at = time.time()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = slow_emulator.stats()
    slow_emulator.reset()
    rerun = run_cli("run", str(job), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    second = slow_emulator.stats()
    df = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert df["id"].to_list() == [row[0] for row in ideas] and set(df["status"]) == {"ok"}
    assert all(Path(paths[0]).is_file() for paths in df["image_paths"])
    assert 0 < first["requests"] < len(ideas) and set(second["by_prompt"].values()) == {1}
    again = [p for p in second["by_prompt"] if p in first["by_prompt"]]
    for prompt in again:  # only rows in flight at the kill are asked again
        answered = first["answered_at"].get(prompt)
        assert answered is None or answered > killed_at - 1.0


@pytest.fixture(scope="module")
def slow_emulator() -> Any:
    from conftest import start_emulator, stop_emulator

    emulator = start_emulator("--latency-ms", "40")
    yield emulator
    stop_emulator(emulator)


@pytest.mark.parametrize("name", ["images-openai", "images-openai-edit"])
def test_the_sample_jobs_run_on_the_emulator(name: str, tmp_path: Path) -> None:
    for folder in ("jobs", "sample_data"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    job = tmp_path / "jobs" / f"{name}.yaml"
    checked = run_here("validate", str(job))
    assert checked.returncode == 0 and not checked.stderr, checked.stderr
    result = run_here("run", str(job), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(tmp_path / "out" / f"{name}.parquet")
    assert df.height == 4 and set(df["status"]) == {"ok"}
    assert [Path(p).parent for (p,) in df["image_paths"]] == [tmp_path / "out" / name] * 4

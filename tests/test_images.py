"""Images in (paths, URLs, data URLs; escapes refused) and out (files, stable names) over loopback."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import REPO, Emulator, assert_finished, run_cli, run_here, write_csv, write_job
from PIL import Image

from batchrun.emulator import answers, pictures
from batchrun.pipeline import images

SAMPLES = REPO / "sample_data" / "images"


def image_job(folder: Path, url: str, api: str, model: str, **overrides: Any) -> Path:
    job: dict[str, Any] = {
        "input": {"path": "data/rows.csv", "id_column": "id"},
        "provider": {"api": api, "base_url": url, "api_key_env": "TEST_RELAY_KEY"},
        "model": model,
        "prompt": {"user": "Describe this image.", "images": ["{{ image }}"]},
        "params": {},
        "run": {"concurrency": 4, "max_attempts": 3, "timeout_s": 30},
    }
    job.update(overrides)
    return write_job(folder, url, **job)


def rows_csv(folder: Path, rows: list[list[str]]) -> None:
    (folder / "data").mkdir(exist_ok=True)
    write_csv(folder / "data" / "rows.csv", ["id", "image"], rows)


def run_ok(job: Path, *args: str) -> pl.DataFrame:
    result = run_here("run", str(job), "--quiet", *args)
    assert_finished(result, job.parent / "out" / "result.parquet")
    return pl.read_parquet(job.parent / "out" / "result.parquet")


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize(
    ("api", "model", "style"),
    [
        ("openai-chat", "gpt-5.4", "standard"),
        ("openai-chat", "gpt-5.4", "responses"),
        ("gemini", "gemini-2.5-flash", "standard"),
    ],
)
def test_images_by_path_url_and_data_url(api: str, model: str, style: str, tmp_path: Path, emulator: Emulator) -> None:
    shutil.copytree(SAMPLES, tmp_path / "data" / "pics")
    url = f"{emulator.url}/_emulator/images/cat.png"
    rows_csv(tmp_path, [["I1", "pics/sunset.png"], ["I2", url], ["I3", data_url(SAMPLES / "forest.png")]])
    provider = {"api": api, "base_url": emulator.url, "api_key_env": "TEST_RELAY_KEY", "image_part_style": style}
    df = run_ok(image_job(tmp_path, emulator.url, api, model, provider=provider))
    assert df["status"].to_list() == ["ok"] * 3, df["error"].to_list()
    served = pictures.describe(pictures.png(48, 48, answers.digest("cat.png")))
    # Chat passes the URL on for the upstream to fetch; for Gemini batchrun downloads it and sends the bytes.
    second = f"The image at {url}." if api == "openai-chat" else served[0].upper() + served[1:] + "."
    assert df["response_text"].to_list() == ["A 64x48 PNG, mostly orange.", second, "A 64x48 PNG, mostly green."]
    assert emulator.stats()["requests"] == 3


def test_paths_outside_the_job_folders_and_bad_images_are_row_errors_and_nothing_is_sent(
    tmp_path: Path, emulator: Emulator
) -> None:
    shutil.copy(SAMPLES / "rose.png", tmp_path / "beside-the-job.png")  # the job file's folder is allowed too
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    os.symlink("/etc/hostname", tmp_path / "data" / "link.png")
    rows = [
        ["OK", "../beside-the-job.png"],
        ["UP", "../../../../etc/passwd"],
        ["ABS", "/etc/hostname"],
        ["LINK", "link.png"],
        ["MISSING", "nope.png"],
        ["TEXT", "notes.txt"],
        ["FTP", "ftp://example.com/a.png"],
        ["BAD64", "data:image/png;base64,%%%"],
    ]
    rows_csv(tmp_path, rows)
    df = run_ok(image_job(tmp_path, emulator.url, "openai-chat", "gpt-5.4"))
    by_id = {r["id"]: r for r in df.iter_rows(named=True)}
    assert by_id["OK"]["status"] == "ok" and by_id["OK"]["response_text"] == "A 64x48 PNG, mostly red."
    for row_id in ("UP", "ABS", "LINK"):
        assert by_id[row_id]["error_class"] == "input" and "outside the job's folders" in by_id[row_id]["error"]
    assert "nope.png: file not found" in by_id["MISSING"]["error"]
    assert "not an image" in by_id["TEXT"]["error"]
    assert "unsupported URL scheme" in by_id["FTP"]["error"]
    assert "base64 is invalid" in by_id["BAD64"]["error"]
    errors = df.filter(pl.col("status") == "error")
    assert errors.height == 7 and set(errors["error_class"]) == {"input"} and set(errors["attempts"]) == {0}
    assert emulator.stats()["requests"] == 1


def test_max_image_side_downscales_before_sending(tmp_path: Path, emulator: Emulator) -> None:
    shutil.copytree(SAMPLES, tmp_path / "data" / "pics")
    rows_csv(tmp_path, [["S1", "pics/sunset.png"], ["S2", data_url(SAMPLES / "sea.png")]])
    prompt = {"user": "Describe this image.", "images": ["{{ image }}"], "max_image_side": 32}
    df = run_ok(image_job(tmp_path, emulator.url, "gemini", "gemini-2.5-flash", prompt=prompt))
    assert df["response_text"].to_list() == ["A 32x24 PNG, mostly orange.", "A 32x24 PNG, mostly blue."]


def test_max_image_side_without_pillow_is_one_clear_line(tmp_path: Path, emulator: Emulator) -> None:
    hide = tmp_path / "no_pillow"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['PIL'] = None\n")
    rows_csv(tmp_path, [["S1", "a.png"]])
    prompt = {"user": "Describe.", "images": ["{{ image }}"], "max_image_side": 32}
    job = image_job(tmp_path, emulator.url, "openai-chat", "gpt-5.4", prompt=prompt)
    env = {"PYTHONPATH": f"{hide}{os.pathsep}{REPO}"}
    for command in ("validate", "run"):
        result = run_cli(command, str(job), env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
        assert "prompt.max_image_side" in result.stderr and "pip install 'batchrun[images]'" in result.stderr
    assert emulator.stats()["requests"] == 0


POSTER_PARAMS = {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": "3:4"}}


@pytest.mark.parametrize("stream", [False, True])
def test_generated_images_are_files_with_names_stable_across_a_restart(
    stream: bool, tmp_path: Path, emulator: Emulator
) -> None:
    shutil.copytree(SAMPLES, tmp_path / "data" / "pics")
    rows_csv(tmp_path, [["P1", "pics/sea.png"], ["P2", ""], ["team/x 3", ""]])
    job = image_job(
        tmp_path,
        emulator.url,
        "gemini",
        "gemini-3-pro-image-preview",  # thinks first: a thought text and a draft image that must not be kept
        prompt={"user": "A poster, row {{ id }}.", "images": ["{{ image or '' }}"]},
        params=POSTER_PARAMS,
        stream=stream,
        output={"path": "out/result.parquet", "images_dir": "out/posters"},
    )
    df = run_ok(job)
    assert df["status"].to_list() == ["ok"] * 3, df["error"].to_list()
    paths = [p[0] for p in df["image_paths"].to_list()]
    assert [len(p) for p in df["image_paths"].to_list()] == [1, 1, 1]
    names = [Path(p).name for p in paths]
    assert names[:2] == ["P1_0.png", "P2_0.png"] and names[2].startswith("team_x_3-") and names[2].endswith("_0.png")
    written = set(os.listdir(tmp_path / "out" / "posters")) - {images.OWN_FOLDER_MARK}
    assert sorted(written) == sorted(names)  # no drafts, no partial files
    for path in paths:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.size == (48, 64)
    assert pictures.describe(Path(paths[0]).read_bytes()).endswith("mostly blue")  # the reference's colour
    assert df["response_text"][0].startswith("Here is the image, after 1 reference image(s)")
    assert "Planning" not in "".join(df["response_text"])  # thought text stays out
    before = {p: Path(p).read_bytes() for p in paths}
    again = run_ok(job, "--restart")
    assert [p[0] for p in again["image_paths"].to_list()] == paths
    assert {p: Path(p).read_bytes() for p in paths} == before


@pytest.mark.parametrize("stream", [False, True])
def test_an_image_job_answered_without_an_image(stream: bool, tmp_path: Path, emulator: Emulator) -> None:
    rows_csv(
        tmp_path,
        [
            ["T1", "[[emulator: text-only x 1]]"],
            ["T2", "[[emulator: text-only]]"],
            ["T3", "[[emulator: image-safety]]"],
        ],
    )
    job = image_job(
        tmp_path,
        emulator.url,
        "gemini",
        "gemini-2.5-flash-image",
        prompt={"user": "A poster {{ image }}"},
        params=POSTER_PARAMS,
        stream=stream,
    )
    df = run_ok(job)
    assert df["status"].to_list() == ["ok", "error", "error"]
    assert df["attempts"].to_list() == [2, 2, 2]  # at most one retry
    assert df["error"][1].startswith("no image returned (request id: ") and df["error_class"][1] == "no_image"
    assert "IMAGE_SAFETY" in df["error"][2]
    assert len(df["image_paths"][0]) == 1 and df["image_paths"][1] is None


@pytest.mark.parametrize("stream", [False, True])
def test_a_gemini_model_on_the_chat_path_returns_markdown_images(
    stream: bool, tmp_path: Path, emulator: Emulator
) -> None:
    rows_csv(tmp_path, [["M1", ""]])
    job = image_job(
        tmp_path, emulator.url, "openai-chat", "gemini-2.5-flash-image", prompt={"user": "A cat."}, stream=stream
    )
    df = run_ok(job)
    assert df["response_text"][0] == "Emulated answer about: A cat\n\n[image 1]"  # reasoning_content left out
    (path,) = df["image_paths"][0]
    assert Path(path).parent == tmp_path / "out" / "result_images"  # the default images_dir
    with Image.open(path) as image:
        assert image.size == (32, 32)


def test_validate_shows_image_requests_shortened_and_sends_nothing(tmp_path: Path, emulator: Emulator) -> None:
    shutil.copytree(SAMPLES, tmp_path / "data" / "pics")
    rows_csv(tmp_path, [["V1", "pics/rose.png"], ["V2", "https://example.com/a.png"], ["V3", "../../x.png"]])
    chat = run_here("validate", str(image_job(tmp_path, emulator.url, "openai-chat", "gpt-5.4")), "--show", "3")
    assert chat.returncode == 0, chat.stderr
    assert '"url": "data:image/png;base64,iVBORw0KGgo' in chat.stdout and "characters)" in chat.stdout
    assert '"url": "https://example.com/a.png"' in chat.stdout
    assert "outside the job's folders" in chat.stdout
    gemini = run_here("validate", str(image_job(tmp_path, emulator.url, "gemini", "gemini-2.5-flash")), "--show", "3")
    assert gemini.returncode == 0, gemini.stderr
    assert '"mimeType": "image/png"' in gemini.stdout
    assert "downloaded and sent inline when the row runs: https://example.com/a.png" in gemini.stdout
    assert emulator.stats()["requests"] == 0


BAD_JOBS: dict[str, tuple[dict[str, Any], str]] = {
    "gemini model with a slash": ({"model": "models/gemini-2.5-flash"}, "model: 'models/gemini-2.5-flash'"),
    "gemini model with a colon": ({"model": "gemini-2.5-flash:generateContent"}, "bare id"),
    "gemini owned key": ({"params": {"contents": []}}, "params.contents: batchrun sets this itself"),
    "completions with images": (
        {"provider": {"api": "openai-completions", "base_url": "http://x"}, "model": "gpt-3.5-turbo-instruct"},
        "prompt.images: openai-completions takes no images",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_what_a_protocol_cannot_send_is_refused_in_one_line(case: str, tmp_path: Path, emulator: Emulator) -> None:
    overrides, expected = BAD_JOBS[case]
    rows_csv(tmp_path, [["B1", "a.png"]])
    job = image_job(tmp_path, emulator.url, **{"api": "gemini", "model": "gemini-2.5-flash", **overrides})
    result = run_here("validate", str(job))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "job.yaml:" in result.stderr and expected in result.stderr


WARNINGS: dict[str, tuple[dict[str, Any], str]] = {
    "completions without max_tokens": (
        {"api": "openai-completions", "model": "gpt-3.5-turbo-instruct"},
        "params: max_tokens is not set",
    ),
    "images_dir without IMAGE": (
        {
            "params": {"responseModalities": ["TEXT"]},
            "output": {"path": "out/result.parquet", "images_dir": "out/img"},
        },
        "output.images_dir: is set but params.responseModalities lacks IMAGE",
    ),
}


@pytest.mark.parametrize("case", sorted(WARNINGS))
def test_likely_mistakes_are_warnings(case: str, tmp_path: Path, emulator: Emulator) -> None:
    overrides, expected = WARNINGS[case]
    rows_csv(tmp_path, [["W1", "x"]])
    settings = {"api": "gemini", "model": "gemini-2.5-flash-image", "prompt": {"user": "Say {{ image }}"}}
    result = run_here("validate", str(image_job(tmp_path, emulator.url, **{**settings, **overrides})))
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("batchrun: warning: ") and expected in result.stderr


def test_a_gemini_image_url_that_cannot_be_downloaded_is_a_row_error(tmp_path: Path, emulator: Emulator) -> None:
    rows_csv(tmp_path, [["D1", f"{emulator.url}/_emulator/no-such-image.png"]])
    df = run_ok(image_job(tmp_path, emulator.url, "gemini", "gemini-2.5-flash"))
    assert df["error_class"][0] == "input" and "download failed: HTTP 404" in df["error"][0]
    assert emulator.stats()["requests"] == 0

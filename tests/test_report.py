"""`batchrun report`: the page opened from disk in headless chromium, checked against the run's summary.

The browser is Debian's `chromium` (CI installs it: .ci/run). Locally, without it, the browser
tests are skipped with that reason; the rest of the file runs either way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from conftest import REPO, TEST_KEY, assert_finished, run_here, write_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: .ci/run)")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
CHARTS = {"timeline", "latency", "tokens_in", "tokens_out"}


# --- the browser and the page's DOM ---------------------------------------------------------


def browse(page: Path, profile: Path, screenshot: Path | None = None) -> str:
    """The DOM chromium builds from the page (and a screenshot of it, when asked)."""
    assert CHROMIUM is not None
    base = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1000,3000"]
    url = page.resolve().as_uri()
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    done = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


class Dom(HTMLParser):
    """Elements as (tag, attributes, text inside), flat, in document order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[list[str]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        texts: list[str] = []
        self.elements.append((tag, {k: v or "" for k, v in attrs}, texts))
        if tag not in ("img", "meta", "br", "rect", "line", "polyline", "i", "input", "link"):
            self._open.append(texts)

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag not in ("img", "meta", "br", "rect", "line", "polyline", "i", "input", "link"):
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for texts in self._open:
            texts.append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict[str, str], str]]:
        return [
            (a, "".join(t))
            for name, a, t in self.elements
            if name == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())
        ]


def chart_texts(dom: Dom, name: str) -> tuple[list[tuple[str, dict[str, str], str]], set[str]]:
    """One chart's elements (tag, attributes, text) and the texts it writes."""
    inside, elements = False, []
    for tag, attrs, texts in dom.elements:
        if tag == "svg":
            inside = attrs.get("data-chart") == name
        elif inside:
            elements.append((tag, attrs, "".join(texts)))
    return elements, {text for tag, _, text in elements if tag == "text"}


def assert_time_axis_and_legend(dom: Dom, name: str, *labels: str) -> None:
    """The chart's time axis writes clock times and times elapsed; its legend names each of `labels`."""
    elements, texts = chart_texts(dom, name)
    assert {"clock", "elapsed"} <= texts
    assert [t for t in texts if re.fullmatch(r"\d\d:\d\d:\d\d", t)], texts
    elapsed = [t for t in texts if re.fullmatch(r"\+(\d+(\.\d)? s|\d+:\d\d(:\d\d)?)", t)]
    assert len(elapsed) >= 3 and {"+0.0 s", "+0 s", "+0:00"} & set(elapsed), texts
    legend = {text for tag, attrs, text in elements if tag == "text" and attrs.get("class") == "legend-label"}
    assert set(labels) <= legend, legend


def charts(dom: Dom) -> dict[str, int]:
    """Each chart's name and how many data marks it drew (bars, lines, bands)."""
    found: dict[str, int] = {}
    current = None
    for tag, attrs, _ in dom.elements:
        if tag == "svg":
            current = attrs.get("data-chart")
            found[current or ""] = 0
        elif current and "datum" in attrs.get("class", "").split():
            found[current] += 1
    return found


def glance(dom: Dom) -> dict[str, str]:
    """The 'at a glance' figures: key -> its bold value (the first <b> after the key's element)."""
    result: dict[str, str] = {}
    key = None
    for tag, attrs, texts in dom.elements:
        if tag == "div" and "data-key" in attrs:
            key = attrs["data-key"]
        elif tag == "b" and key is not None:
            result[key] = "".join(texts)
            key = None
    return result


def external_references(html_text: str) -> list[str]:
    """Every URL the page could fetch: src/href/url() not pointing at a data: URI, srcset, <link>, <script>."""
    dom = Dom(html_text)
    found = []
    for tag, attrs, texts in dom.elements:
        if tag in ("script", "link", "iframe", "object", "embed", "base"):
            found.append(f"<{tag}>")
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = attrs.get(name)
            if value and not value.startswith("data:") and not value.startswith("#"):
                found.append(f"{tag} {name}={value}")
        styles = attrs.get("style", "") + ("".join(texts) if tag == "style" else "")
        found += [u for u in re.findall(r"url\(([^)]*)\)", styles) if not u.strip("'\" ").startswith("data:")]
    return found


def assert_page_is_sealed(html_text: str) -> None:
    dom = Dom(html_text)
    (meta,) = [a for a, _ in dom.find("meta") if a.get("http-equiv", "").lower() == "content-security-policy"]
    assert "default-src 'none'" in meta["content"]
    assert external_references(html_text) == []


# --- a run on the emulator: the posters job --------------------------------------------------


@pytest.fixture
def posters(tmp_path: Path) -> Path:
    """jobs/posters.yaml with its sample data, priced so the page shows a cost."""
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    shutil.copytree(REPO / "sample_data", tmp_path / "sample_data")
    job = tmp_path / "jobs" / "posters.yaml"
    spec = yaml.safe_load(job.read_text())
    spec["pricing"] = {"input_per_million": 1.25, "output_per_million": 10.0, "per_image": 0.04}
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    return job


@needs_chromium
def test_posters_report_in_a_real_browser(posters: Path, tmp_path: Path) -> None:
    ran = run_here("run", str(posters), "--quiet")
    assert ran.returncode == 0, ran.stderr
    assert f"report: batchrun report {posters}" in ran.stdout
    made = run_here("report", str(posters))
    assert made.returncode == 0, made.stderr
    page = Path(made.stdout.strip())
    out = tmp_path / "out"
    assert page == out / "posters.report.html"
    summary = json.loads((out / "posters.summary.json").read_text())
    html_text = page.read_text()
    assert_page_is_sealed(html_text)

    shot = tmp_path / "report.png"
    dom = Dom(browse(page, tmp_path / "profile", screenshot=shot))
    assert_page_is_sealed("".join(f"<{t} {' '.join(f'{k}={v!r}' for k, v in a.items())}>" for t, a, _ in dom.elements))
    drawn = charts(dom)
    assert CHARTS | {"cost"} <= set(drawn)
    assert all(n > 0 for n in drawn.values()), drawn

    # An unquoted value before "/>" (stroke-width=2/>) takes the slash: the element then swallows the rest of the chart.
    assert not [(t, a) for t, a, _ in dom.elements if any(v.endswith("/") for v in a.values())]
    assert_time_axis_and_legend(dom, "timeline", "rows ok", "requests answered/s", "paced rate")
    assert_time_axis_and_legend(dom, "cost", "cost so far")

    figures = glance(dom)
    assert figures["ok"] == str(summary["ok"])
    assert figures["error"] == str(summary["error"])
    assert figures["tokens"] == f"{summary['prompt_tokens']} in / {summary['completion_tokens']} out"
    assert figures["cost"] == f"{summary['cost']:.4f} USD"
    assert figures["rows"] == str(summary["rows"])
    assert figures["exit state"] == "finished"

    df = pl.read_parquet(out / "posters.parquet")
    expected = {
        (row_id, Path(p).name) for row_id, paths in df.select("brief_id", "image_paths").iter_rows() for p in paths
    }
    shown = {(a["data-row"], a["data-image"]) for a, _ in dom.find("figure") if "generated" in a.get("class", "")}
    assert shown == expected and expected
    assert all(a["src"].startswith("data:image/") for a, _ in dom.find("img"))
    with_reference = {r for r, ref in df.select("brief_id", "reference_image").iter_rows() if ref}
    pairs = {a["data-row"] for a, _ in dom.find("div") if a.get("class") == "pair"}
    assert pairs == with_reference and pairs  # each reference image beside its answer

    _assert_not_blank(shot)
    # The README's picture: BATCHRUN_UPDATE_SCREENSHOT=1 pytest tests/test_report.py -k posters
    if os.environ.get("BATCHRUN_UPDATE_SCREENSHOT"):
        _save_small(shot, REPO / "docs" / "report.png")


def test_a_huge_generated_image_is_left_out_not_a_crash(posters: Path, tmp_path: Path) -> None:
    """A relay may send any image: one too large to decode (a decompression bomb) is left out of the page."""
    from PIL import Image

    ran = run_here("run", str(posters), "--quiet")
    assert ran.returncode == 0, ran.stderr
    df = pl.read_parquet(tmp_path / "out" / "posters.parquet")
    first = next(p for paths in df["image_paths"] for p in paths)
    bomb = posters.parent / first
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")  # ~50 KB of file, 400 M pixels
    made = run_here("report", str(posters))
    assert made.returncode == 0, made.stderr
    page = Path(made.stdout.strip()).read_text()
    assert "1 images not shown" in page


def _assert_not_blank(png: Path) -> None:
    from PIL import Image

    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, bars, thumbnails; a blank page has one colour


def _save_small(png: Path, target: Path) -> None:
    from PIL import Image

    target.parent.mkdir(exist_ok=True)
    with Image.open(png) as image:
        image = image.convert("RGB")
        image.thumbnail((640, 2000))
        image.quantize(colors=64).save(target, optimize=True)


# --- hostile answers, 429s and a pause: a test server of our own -----------------------------


class HostileRelay(ThreadingHTTPServer):
    """A chat relay whose answers try to make the page fetch from it; counts every request it gets."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HostileHandler)
        self.paths: list[str] = []
        self.refused_once: set[str] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def hostile_text(url: str) -> str:
    return (
        f"<img src='{url}/leak-img'><script>fetch('{url}/leak-script')</script>"
        f"<style>body{{background:url({url}/leak-css)}}</style><a href='{url}/leak-link'>x</a> key {TEST_KEY}"
    )


class _HostileHandler(BaseHTTPRequestHandler):
    server: HostileRelay

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.paths.append(self.path)
        self._reply(200, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        text = body["messages"][-1]["content"]
        text = text if isinstance(text, str) else json.dumps(text)
        hostile = hostile_text(self.server.url)
        with self.server.lock:
            self.server.paths.append(self.path)
            first = "Tuesday" in text and "R3" not in self.server.refused_once  # review R3
            if first:
                self.server.refused_once.add("R3")
        if first:  # one push-back with a hint: a pause and a 429 on the timeline
            self._reply(429, {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}, {"Retry-After": "1"})
        elif "lid broke" in text or "Leaks" in text:  # reviews R2 and R5
            self._reply(400, {"error": {"message": hostile, "code": "bad_thing"}})
        else:
            message = {"role": "assistant", "content": hostile}
            usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
            self._reply(
                200,
                {
                    "id": "x",
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                },
            )

    def _reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def hostile_relay() -> Iterator[HostileRelay]:
    server = HostileRelay()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_hostile_answers_are_text_and_the_key_is_masked(
    reviews: Path, tmp_path: Path, hostile_relay: HostileRelay
) -> None:
    job = write_job(tmp_path, hostile_relay.url, run={"concurrency": 2, "max_attempts": 3, "timeout_s": 30})
    ran = run_here("run", str(job), "--quiet")
    assert ran.returncode == 5, ran.stderr  # finished, with two error rows
    made = run_here("report", str(job))
    assert made.returncode == 0, made.stderr
    html_text = Path(made.stdout.strip()).read_text()
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert glance(Dom(html_text))["error"] == str(summary["error"]) == "2"
    assert "bad_request 2" in html_text
    assert_page_is_sealed(html_text)
    assert TEST_KEY not in html_text and TEST_KEY.removeprefix("sk-") not in html_text
    assert "&lt;script&gt;fetch(" in html_text  # shown as text
    dom = Dom(html_text)
    statuses = [a["data-status"] for a, _ in dom.find("tr") if "sample" in a.get("class", "")]
    assert statuses[0] == "error" and "ok" in statuses  # errors first
    drawn = charts(dom)
    timeline_marks = [a for t, a, _ in dom.elements if t == "rect" and a.get("fill") == "#f97316"]
    assert timeline_marks, "the 429 is on the timeline"
    assert [a for t, a, _ in dom.elements if t == "rect" and a.get("fill") == "#fde68a"], "the pause is on the timeline"
    assert drawn["timeline"] > 0 and drawn["latency"] > 0


def test_over_time_charts_have_a_time_axis_a_legend_and_the_paced_rate(
    reviews: Path, tmp_path: Path, hostile_relay: HostileRelay
) -> None:
    """A 429 with Retry-After makes the limiter pace: the requests/s panel draws that rate and the learned limit."""
    job = write_job(tmp_path, hostile_relay.url, run={"concurrency": 2, "max_attempts": 3, "timeout_s": 30})
    assert run_here("run", str(job), "--quiet").returncode == 5  # two rows end as errors (see above)
    db = sqlite3.connect(tmp_path / "out" / "result.parquet.batchrun" / "checkpoint.sqlite")
    learned = [{"key": "TEST_RELAY_KEY", "requests": 120, "window_s": 60.0, "source": "learned"}]
    db.execute("INSERT OR REPLACE INTO meta VALUES ('learned_limits', ?)", (json.dumps(learned),))
    paced = db.execute("SELECT COUNT(*) FROM limiter WHERE rate IS NOT NULL").fetchone()[0]
    db.commit()
    db.close()
    assert paced > 0  # the paced rate was recorded, second by second
    made = run_here("report", str(job))
    assert made.returncode == 0, made.stderr
    dom = Dom(Path(made.stdout.strip()).read_text())
    labels = ("429 answers", "requests answered/s", "paced rate", "learned limit", "in-flight limit (lowest)")
    assert_time_axis_and_legend(dom, "timeline", *labels)
    elements, texts = chart_texts(dom, "timeline")
    assert {"requests per second", "in-flight limit"} & texts
    series = {a.get("data-series"): a for tag, a, _ in elements if "datum" in a.get("class", "")}
    assert {"paced", "learned", "in_flight"} <= set(series)
    assert float(series["learned"]["data-value"]) == 2.0  # 120 requests per 60 s
    figures = glance(dom)
    assert figures["learned limit"] == "120 per 60 s" and figures["429 answers"] == "1"


@needs_chromium
def test_the_browser_fetches_nothing_a_hostile_answer_names(
    reviews: Path, tmp_path: Path, hostile_relay: HostileRelay
) -> None:
    job = write_job(tmp_path, hostile_relay.url)
    assert_finished(run_here("run", str(job), "--quiet"), tmp_path / "out" / "result.parquet")
    page = Path(run_here("report", str(job)).stdout.strip())
    before = list(hostile_relay.paths)
    dom = Dom(browse(page, tmp_path / "profile"))
    assert hostile_relay.paths == before  # not one request reached the server the answers name
    assert not dom.find("script") and not [a for a, _ in dom.find("img") if "leak" in a.get("src", "")]


# --- checkpoints without the report's records; stopped runs -----------------------------------


def test_an_older_checkpoint_resumes_and_reports(reviews: Path, tmp_path: Path, emulator: Any) -> None:
    job = write_job(tmp_path, emulator.url)
    assert run_here("run", str(job), "--quiet", "--limit", "3").returncode == 0
    db = tmp_path / "out" / "result.parquet.batchrun" / "checkpoint.sqlite"
    _make_older(db)
    made = run_here("report", str(job))
    assert made.returncode == 0, made.stderr
    dom = Dom(Path(made.stdout.strip()).read_text())
    figures = glance(dom)
    assert figures["ok"] == "3" and figures["exit state"].startswith("unknown")
    assert charts(dom)["timeline"] > 0
    resumed = run_here("run", str(job), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert emulator.stats()["requests"] == 6  # 3, then the 3 left: the older checkpoint's rows were kept
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["status"].to_list() == ["ok"] * 6


def _make_older(db: Path) -> None:
    """The checkpoint as batchrun wrote it before the report's records: no such columns, table or meta."""
    con = sqlite3.connect(db)
    columns = [
        r[1]
        for r in con.execute("PRAGMA table_info(rows)")
        if r[1] not in ("started_at", "attempt_log", "cached_tokens")
    ]
    con.executescript(
        f"CREATE TABLE rows_old AS SELECT {', '.join(columns)} FROM rows; DROP TABLE rows;"
        "ALTER TABLE rows_old RENAME TO rows; DROP TABLE limiter; DELETE FROM meta WHERE key = 'last_run';"
    )
    con.close()


def test_a_run_stopped_by_the_server_says_so(reviews: Path, tmp_path: Path) -> None:
    from conftest import start_emulator, stop_emulator

    emulator = start_emulator("--api-key-env", "OTHER_KEY", env={"OTHER_KEY": "sk-not-the-test-key"})
    try:
        job = write_job(tmp_path, emulator.url)
        assert run_here("run", str(job), "--quiet").returncode != 0
    finally:
        stop_emulator(emulator)
    made = run_here("report", str(job))
    assert made.returncode == 0, made.stderr
    assert glance(Dom(Path(made.stdout.strip()).read_text()))["exit state"] == "stopped by the server"


def test_report_before_any_run_is_one_line(reviews: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    made = run_here("report", str(job))
    assert made.returncode == 2
    assert made.stderr.strip().startswith("batchrun: error:") and "run the job first" in made.stderr
    assert len(made.stderr.strip().splitlines()) == 1


def test_a_killed_run_reports_what_it_finished(reviews: Path, tmp_path: Path) -> None:
    import signal
    import sys
    import time

    from conftest import cli_env, start_emulator, stop_emulator

    emulator = start_emulator("--latency-ms", "700")
    try:
        job = write_job(tmp_path, emulator.url, run={"concurrency": 2, "max_attempts": 3, "timeout_s": 30})
        process = subprocess.Popen(
            [sys.executable, "-m", "batchrun", "run", str(job), "--quiet"], env=cli_env(), start_new_session=True
        )
        db = tmp_path / "out" / "result.parquet.batchrun" / "checkpoint.sqlite"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _finished_rows(db) < 2:
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        stop_emulator(emulator)
    made = run_here("report", str(job))
    assert made.returncode == 0, made.stderr
    dom = Dom(Path(made.stdout.strip()).read_text())
    figures = glance(dom)
    assert figures["exit state"] == "interrupted (the run was killed)"
    assert 2 <= int(figures["ok"]) < 6
    assert charts(dom)["timeline"] > 0 and charts(dom)["latency"] > 0


def _finished_rows(db: Path) -> int:
    try:
        con = sqlite3.connect(db, timeout=1)
        try:
            return int(con.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0

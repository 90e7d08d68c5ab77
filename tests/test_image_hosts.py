"""Image URLs batchrun downloads (for Gemini) come only from hosts they may come from: never link-local
(169.254.0.0/16, fe80::/10: cloud metadata), and loopback or private ones only when the job allows them;
checked on the addresses actually connected to, and again on every redirect."""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import Emulator, run_here, write_csv, write_job

from batchrun.pipeline.images import refused_address

LOOPBACK_ONLY = "is a loopback, private or reserved address; refused unless the job sets "
LINK_LOCAL = "is a link-local address (where cloud metadata services answer); refused"


def _gemini_job(folder: Path, url: str, rows: list[list[str]], allow: bool | None = None) -> Path:
    write_csv(folder / "rows.csv", ["id", "image"], rows)
    prompt: dict[str, Any] = {"user": "Describe this image.", "images": ["{{ image }}"]}
    if allow is not None:
        prompt["allow_private_image_hosts"] = allow
    provider = {"api": "gemini", "base_url": url, "api_key_env": "TEST_RELAY_KEY"}
    return write_job(
        folder,
        url,
        input={"path": "rows.csv", "id_column": "id"},
        provider=provider,
        model="gemini-2.5-flash",
        prompt=prompt,
        params={},
    )


def _errors(job: Path) -> dict[str, str | None]:
    result = run_here("run", str(job), "--quiet")
    assert result.returncode in (0, 5), result.stdout + result.stderr
    out = pl.read_parquet(job.parent / "out" / "result.parquet")
    return dict(zip(out["id"], out["error"]))


def test_loopback_image_hosts_are_refused_unless_allowed(tmp_path: Path, emulator: Emulator) -> None:
    port = emulator.url.rsplit(":", 1)[1]
    rows = [
        ["literal", f"http://127.0.0.1:{port}/_emulator/images/cat.png"],
        ["name", f"http://localhost:{port}/_emulator/images/cat.png"],  # refused as it resolves
        ["mapped", f"http://[::ffff:127.0.0.1]:{port}/_emulator/images/cat.png"],
    ]
    errors = _errors(_gemini_job(tmp_path, emulator.url, rows))
    for row_id, error in errors.items():
        assert error is not None and LOOPBACK_ONLY + "prompt.allow_private_image_hosts: true" in error, row_id
    assert emulator.stats()["requests"] == 0  # each row an input error: nothing sent

    (tmp_path / "out").rename(tmp_path / "refused")
    allowed = _errors(_gemini_job(tmp_path, emulator.url, rows[:2], allow=True))
    assert allowed == {"literal": None, "name": None}


class _Redirector(BaseHTTPRequestHandler):
    """Redirects /to/<target> to http://<target>/latest/meta-data (an allowed host sending the client on)."""

    def do_GET(self) -> None:
        self.send_response(302)
        target = urllib.parse.unquote(self.path.removeprefix("/to/"))
        self.send_header("Location", f"http://{target}/latest/meta-data")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def redirector() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_link_local_is_refused_always_and_on_every_redirect(
    tmp_path: Path, emulator: Emulator, redirector: str
) -> None:
    rows = [
        ["direct", "http://169.254.169.254/latest/meta-data"],
        ["mapped", "http://[::ffff:169.254.169.254]/latest/meta-data"],
        ["v6", "http://[fe80::1]/latest/meta-data"],
        ["redirect", f"{redirector}/to/169.254.169.254"],
        ["redirect-v6", f"{redirector}/to/[fe80::a9fe:a9fe]"],
    ]
    errors = _errors(_gemini_job(tmp_path, emulator.url, rows, allow=True))
    for row_id, error in errors.items():
        assert error is not None and LINK_LOCAL in error, (row_id, error)
    assert emulator.stats()["requests"] == 0


@pytest.mark.parametrize(
    "address,link_local,private",
    [
        ("169.254.169.254", True, True),
        ("fe80::1", True, True),
        ("fe80::1%eth0", True, True),
        ("::ffff:169.254.169.254", True, True),
        ("::169.254.169.254", True, True),
        ("64:ff9b::169.254.169.254", True, True),
        ("127.0.0.1", False, True),
        ("::1", False, True),
        ("::ffff:10.0.0.1", False, True),
        ("10.1.2.3", False, True),
        ("192.168.1.1", False, True),
        ("172.16.0.1", False, True),
        ("100.64.0.1", False, True),
        ("0.0.0.0", False, True),
        ("fc00::1", False, True),
        ("93.184.215.14", False, False),
        ("2606:4700::1111", False, False),
    ],
)
def test_which_addresses_are_refused(address: str, link_local: bool, private: bool) -> None:
    assert (refused_address(address, allow_private=True) is not None) == link_local
    assert (refused_address(address, allow_private=False) is not None) == private

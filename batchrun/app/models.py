"""`batchrun models`: the relay's models, from its OpenAI-compatible `GET /v1/models`."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from batchrun.app.checks import load_job
from batchrun.base.errors import JobError
from batchrun.base.redaction import for_terminal, redact, register_secret
from batchrun.job.spec import DEFAULT_BASE_URL, EMULATOR, check_base_url

TIMEOUT_S = 30
MAX_BODY = 8 << 20  # a listing of thousands of models is far smaller


def list_models(job_file: str | None, base_url: str | None, api_key_env: str | None) -> list[str]:
    """One line per model id, sorted; the relay's address and key variable come from the options, else the job."""
    provider = load_job(job_file).spec.provider if job_file else None
    url = base_url or (provider.base_url if provider else DEFAULT_BASE_URL)
    if url != EMULATOR:
        try:
            url = check_base_url(url)
        except ValueError as e:
            raise JobError(f"batchrun models: --base-url: {e}") from None
    env = api_key_env or (provider.key_variables[0] if provider else "KUAIMA_API_KEY")  # a list: its first key
    key = os.environ.get(env, "").strip()
    register_secret(key)
    if not key and url != EMULATOR:
        raise JobError(f"batchrun models: the variable {env} is not set; export {env}=<your key>")
    with _relay(url) as address:
        listing = _get(address + "/v1/models", key)
    # A relay may name a model after the key (echoing it), or with escape sequences: each id is masked and
    # cleaned like every text from a relay, and one masked id is listed once.
    return sorted({for_terminal(model) for model in _ids(listing, address)})


@contextmanager
def _relay(base_url: str) -> Iterator[str]:
    if base_url != EMULATOR:
        yield base_url
        return
    from batchrun.emulator.server import EmulatorConfig, running_in_thread

    with running_in_thread(EmulatorConfig()) as url:
        yield url


def _get(url: str, key: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            body = response.read(MAX_BODY + 1)
    except urllib.error.HTTPError as e:
        detail = e.read(500).decode("utf-8", "replace")
        raise JobError(redact(f"GET {url}: HTTP {e.code}: {' '.join(detail.split())[:200]}")) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise JobError(redact(f"GET {url}: cannot connect: {reason}")) from None
    if len(body) > MAX_BODY:
        raise JobError(f"GET {url}: the answer is larger than {MAX_BODY >> 20} MB")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise JobError(f"GET {url}: the answer is not JSON") from None


def _ids(listing: Any, url: str) -> Iterator[str]:
    """OpenAI's `{"data": [{"id": ...}]}`; Google's `{"models": [{"name": "models/..."}]}` too."""
    if isinstance(listing, dict):
        for item in listing.get("data") or []:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                yield item["id"]
        for item in listing.get("models") or []:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                yield item["name"].removeprefix("models/")
        return
    raise JobError(f"GET {url}/v1/models: the answer is not a model listing")

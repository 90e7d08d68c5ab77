"""Limits learned for a relay, key and model, kept in the state folder for the next run (docs/backoff.md).

The key itself is never kept: a fingerprint of it, a salted SHA-256 cut to 16 hex digits.
The salt is random, made once per state folder and readable only by its owner, so the
fingerprint cannot be matched against guessed keys by anyone without that folder, and
no fragment of the key can be read from it. Files are written atomically (a new file,
then a rename) and never opened through a symlink.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

import orjson

from batchrun.base.storage import state_root
from batchrun.flow.keys import KeyPool
from batchrun.flow.limits import Limits
from batchrun.flow.pace import LearnedWindow

STORE = "learned_limits.json"
SALT = "key_salt"
META_KEY = "learned_limits"  # the checkpoint's meta: what this job's run learned, for `status` and the report
FINGERPRINT_HEX = 16
KEPT_ENTRIES = 1000  # the oldest are dropped beyond this
KEPT_SOURCES = {"said", "learned"}  # a header's window is a guess (per minute, or per day?): not kept


def lanes(limits: Limits) -> list[Limits]:
    """One limiter per key: the pool's lanes, or the one limiter of a single key."""
    return limits.lanes if isinstance(limits, KeyPool) else [limits]


class KeptLimits:
    """The learned windows of one relay and model, for the keys of a run: read before it, written after."""

    def __init__(self, base_url: str, model: str, keys: list[tuple[str, str]], root: Path | None = None) -> None:
        """`keys`: each key's variable and the key (only its fingerprint is kept)."""
        self._root = root or state_root()
        salt = _salt(self._root)
        self._entries = {name: f"{base_url} {fingerprint(key, salt)} {model}" for name, key in keys}

    def seed(self, limits: Limits) -> None:
        """Windows kept from earlier runs, set before the first request."""
        kept = _read(self._root / STORE)
        for lane in lanes(limits):
            entry = kept.get(self._entries.get(lane.key, ""))
            if isinstance(entry, dict) and _positive(entry.get("requests")) and _positive(entry.get("window_s")):
                lane.learn(LearnedWindow(int(entry["requests"]), float(entry["window_s"]), "remembered"))

    def keep(self, limits: Limits, meta: str | None = None) -> str:
        """Windows learned in this run saved for the next; returns the checkpoint meta's JSON: `meta` (what
        earlier runs of the job wrote) with this run's windows in place of theirs for the same key."""
        learned = [(lane.key, lane.learned) for lane in lanes(limits) if lane.learned is not None]
        fresh = {
            self._entries[name]: {"requests": w.requests, "window_s": w.window_s, "at": time.time()}
            for name, w in learned
            if w.source in KEPT_SOURCES and name in self._entries
        }
        if fresh:
            kept = _read(self._root / STORE) | fresh
            newest = sorted(kept.items(), key=lambda item: _at(item[1]))[-KEPT_ENTRIES:]
            _write_atomically(self._root, STORE, orjson.dumps(dict(newest), option=orjson.OPT_INDENT_2))
        said = {
            name: {"key": name, "requests": w.requests, "window_s": w.window_s, "source": w.source}
            for name, w in learned
        }
        earlier = [entry for entry in _entries(meta) if entry.get("key") not in said]
        return orjson.dumps([*earlier, *said.values()]).decode()


def _entries(meta: str | None) -> list[dict[str, Any]]:
    try:
        entries = orjson.loads(meta or "[]")
    except orjson.JSONDecodeError:
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def fingerprint(key: str, salt: bytes) -> str:
    return hashlib.sha256(salt + key.encode()).hexdigest()[:FINGERPRINT_HEX]


def _salt(root: Path) -> bytes:
    path = root / SALT
    try:
        return _read_bytes(path)
    except FileNotFoundError:
        pass
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        _write_atomically(root, SALT, secrets.token_hex(32).encode(), replace=False)
    except FileExistsError:  # another run made it first: use theirs
        pass
    return _read_bytes(path)


def _read_bytes(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _read(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(_read_bytes(path))
    except (OSError, orjson.JSONDecodeError):  # none yet, unreadable or a symlink: start afresh
        return {}
    return data if isinstance(data, dict) else {}


def _write_atomically(root: Path, name: str, data: bytes, replace: bool = True) -> None:
    """A new file beside the old, then renamed over it (`replace`) or linked as it only if none is there."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, root / name)  # a symlink at the name is replaced, never followed
        else:
            os.link(temporary, root / name)  # FileExistsError if another run made it first
    finally:
        temporary.unlink(missing_ok=True)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and value > 0


def _at(entry: Any) -> float:
    at = entry.get("at") if isinstance(entry, dict) else None
    return float(at) if isinstance(at, (int, float)) else 0.0

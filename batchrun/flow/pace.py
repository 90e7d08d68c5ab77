"""What the limiter tells the people watching a run: for each key, the pace kept now and the window learned."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LearnedWindow:
    """A relay's limit for one key: `requests` per `window_s` seconds.

    `source` says where it came from: "said" (the relay's answer stated it), "header" (a 429's
    x-ratelimit-limit-requests, read as per minute: used in the run, not kept), "learned" (inferred from its
    push-back), "remembered" (kept in the state folder from an earlier run)."""

    requests: int
    window_s: float
    source: str


@dataclass(frozen=True)
class KeyPace:
    """One key's state for the bar, the summary and the report. `key` is the variable's name, never its value."""

    key: str
    rate_per_s: float | None  # the paced rate now; None while not pacing
    window: LearnedWindow | None
    retired: str | None = None  # why the key left the run (quota used up, refused as invalid), else None

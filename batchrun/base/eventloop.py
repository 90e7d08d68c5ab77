"""The event loop the CLI runs on: anyio over asyncio, on uvloop where it is installed (measured faster)."""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


def has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def run(fn: Callable[..., Awaitable[T]], *args: object, uvloop: bool | None = None) -> T:
    """`anyio.run` on uvloop unless `uvloop=False` (or it is not installed)."""
    use = has_uvloop() if uvloop is None else uvloop and has_uvloop()
    return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": use})

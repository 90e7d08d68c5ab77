"""How a message names a setting of the run: as a flag on the command line, as a keyword argument in Python.

The same run is started from either (cli.py, app/api.py); a message that says what to do next
names the setting the way the person gave, or can give, it.
"""

from __future__ import annotations

from typing import Protocol


class Naming(Protocol):
    def __call__(self, name: str, value: object = None) -> str: ...


def flag(name: str, value: object = None) -> str:
    """`--max-cost`, `--adopt-checkpoint OLD`; a switch (True) is the flag alone: `--rerun-changed`."""
    shown = "--" + name.replace("_", "-")
    return shown if value is None or value is True else f"{shown} {value}"


def keyword(name: str, value: object = None) -> str:
    """`max_cost=`, `rerun_changed=True`, `adopt_checkpoint='old'`."""
    if value is None:
        return f"{name}="
    shown = value if isinstance(value, (bool, int, float)) else str(value)  # a path as the string it is
    return f"{name}={shown!r}"

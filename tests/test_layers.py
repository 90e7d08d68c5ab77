"""The package's imports flow one way (ARCHITECTURE.md): no cycles, nothing imported from a lower layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "batchrun"
ARCHITECTURE = REPO / "ARCHITECTURE.md"

# ARCHITECTURE.md's layers, top (imported by all) to bottom (imports all).
LAYERS: list[list[str]] = [
    ["errors", "redaction", "stops", "eventloop", "storage", "openai_batch", "emulator"],
    ["spec"],
    ["structured", "render", "inputs", "checkpoint"],
    ["settings"],
    ["protocols"],
    ["images", "breaker", "adaptive", "limits", "spend", "sharing", "seams"],
    ["checks", "transport", "fingerprint", "output", "progress"],
    ["resume", "repair", "rows", "timeline"],
    ["runner", "ray_coordinator", "report"],
    ["engine_ray", "report_page"],
    ["commands", "api", "models", "bench", "bench_pushback", "bench_ray", "cli", "__main__", "__init__"],
]
LAYER = {name: n for n, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The batchrun modules a file imports, anywhere in it (functions and TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "batchrun")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "batchrun":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {name for name in found if name in MODULES}


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    """A module's layer, by its first name below `batchrun` (protocols.gemini is in `protocols`)."""
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if module == "batchrun.__main__":
        key = "__main__"
    assert key in LAYER, f"{module} is in no layer: add it to ARCHITECTURE.md and LAYERS"
    return LAYER[key]


def test_every_module_has_a_layer_and_a_line_in_architecture() -> None:
    documented = ARCHITECTURE.read_text(encoding="utf-8")
    for module, path in MODULES.items():
        layer_of(module)
        if module.split(".")[:2] != ["batchrun", "emulator"]:
            shown = str(path.relative_to(PACKAGE))
            assert re.search(rf"`{re.escape(shown)}`", documented), f"ARCHITECTURE.md does not list {shown}"


def test_imports_go_against_no_layer() -> None:
    wrong = [
        f"{module} (layer {layer_of(module) + 1}) imports {target} (layer {layer_of(target) + 1})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not wrong, "imports against ARCHITECTURE.md's order:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks above can fail: a made-up graph with both faults is caught."""
    global GRAPH
    saved = GRAPH
    GRAPH = {**saved, "batchrun.errors": {"batchrun.cli"}, "batchrun.cli": saved["batchrun.cli"] | {"batchrun.errors"}}
    try:
        for check in (test_imports_go_against_no_layer, test_no_import_cycle):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} missed a planted fault")
    finally:
        GRAPH = saved

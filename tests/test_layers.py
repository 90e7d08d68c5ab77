"""The package's imports flow one way and each module sits in its package (ARCHITECTURE.md is the one source)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "batchrun"
ARCHITECTURE = REPO / "ARCHITECTURE.md"


def floors_from_architecture() -> tuple[dict[str, int], dict[str, str]]:
    """ARCHITECTURE.md is the one source: each "### N. `pkg/`" heading is a package on floor N, and the files
    named in backticks under it are where they belong. The last heading holds the top-level modules."""
    floor_of: dict[str, int] = {}
    placed: dict[str, str] = {}
    text = ARCHITECTURE.read_text(encoding="utf-8").split("## Packages, in floors", 1)[1]
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        number, package = re.match(r"(\d+)\. (?:`(\w+)/`)?", heading).groups()  # type: ignore[union-attr]
        floor_of[package or ""] = int(number)
        for shown in re.findall(r"`([\w/]+\.py)`", body):
            placed[shown] = package or ""
    return floor_of, placed


FLOOR_OF_PACKAGE, PLACED = floors_from_architecture()


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The batchrun modules a file imports, anywhere in it (functions and TYPE_CHECKING blocks too).
    `from batchrun import x` imports `batchrun` itself (the bottom floor) unless x is a module."""
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


def package_of(module: str) -> str:
    """The package a module lives in ("" for the top-level modules: cli, __main__, batchrun itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def layer_of(module: str) -> int:
    package = package_of(module)
    assert package in FLOOR_OF_PACKAGE, f"{module}: package {package!r} has no floor in ARCHITECTURE.md"
    return FLOOR_OF_PACKAGE[package]


def test_every_module_is_listed_under_its_own_package() -> None:
    wrong = []
    for module, path in MODULES.items():
        shown = str(path.relative_to(PACKAGE))
        if path.name == "__init__.py" and path.parent != PACKAGE and shown not in PLACED:
            continue  # a package's docstring file; its package's heading places it
        if PLACED.get(shown) != package_of(module):
            where = f"under `{PLACED[shown]}/`" if shown in PLACED else "nowhere"
            wrong.append(f"{shown} is in {package_of(module) or 'the top level'}/ but ARCHITECTURE.md lists it {where}")
    assert not wrong, "\n".join(wrong)


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for package in FLOOR_OF_PACKAGE:
        if package:
            doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8")))
            assert doc, f"batchrun/{package}/__init__.py has no docstring saying what the package owns"


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
    GRAPH = {
        **saved,
        "batchrun.base.errors": {"batchrun.cli"},
        "batchrun.cli": saved["batchrun.cli"] | {"batchrun.base.errors"},
    }
    try:
        for check in (test_imports_go_against_no_layer, test_no_import_cycle):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} missed a planted fault")
    finally:
        GRAPH = saved

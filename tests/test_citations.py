"""The code, the tests and the docs cite only what is in the repository.

A reader of a clone has nothing else: a document named in a comment must be a file of the
repository, a section cited as `§N` must be a section of docs/protocol.md, and a fact is
written into docs/ rather than cited by the number of an issue in a tracker the clone does
not have. The READMEs' links are checked by tests/test_readme_sync.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from conftest import REPO

CITING = [
    *(REPO / "batchrun").rglob("*.py"),
    *(REPO / "tests").rglob("*.py"),
    *(REPO / "scripts").rglob("*.py"),
    *(REPO / "jobs").glob("*.yaml"),
    *(REPO / "docs").glob("*.md"),
    REPO / "ARCHITECTURE.md",
    REPO / "pyproject.toml",
    REPO / ".ci" / "run",
]
PROTOCOL = REPO / "docs" / "protocol.md"
URL = re.compile(r"\b[a-z]+://\S+")
DOCUMENT = re.compile(r"(?<![\w./-])((?:\.\./|[\w-]+/)*[\w.-]+\.md)\b")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)(?: items? ((?:\d+(?:-\d+)?(?:, | and )?)+))?")
ISSUE = re.compile(r"\bissues? #?\d+", re.IGNORECASE)


def _lines() -> Iterator[tuple[str, int, str]]:
    """(file, line number, text without URLs) of every citing file."""
    for path in CITING:
        name = path.relative_to(REPO).as_posix()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            yield name, n, URL.sub("", line)


def _exists(cited: str, citing: str) -> bool:
    """Whether the name is a file beside the citing file, from the top of the repository, or a page of docs/."""
    bases = ((REPO / citing).parent, REPO, REPO / "docs")
    return any((base / cited).resolve().is_file() for base in bases)


def test_every_document_cited_is_in_the_repository() -> None:
    problems = [
        f"{name} line {n}: cites {cited}, which is not a file of the repository: write the fact into a page "
        "of docs/ and cite that page"
        for name, n, line in _lines()
        for cited in DOCUMENT.findall(line)
        if not _exists(cited, name)
    ]
    assert not problems, "\n".join(problems)


def test_every_section_cited_is_a_section_of_the_protocol_page() -> None:
    text = PROTOCOL.read_text(encoding="utf-8")
    sections = set(re.findall(r"(?m)^#{2,3} (\d+(?:\.\d+)?)\.? ", text))
    edge_cases = re.split(r"(?m)^## 7\.", text, maxsplit=1)[1].split("\n## ", 1)[0]
    items = len(re.findall(r"(?m)^\d+\. ", edge_cases))
    problems = []
    for name, n, line in _lines():
        for section, numbers in SECTION.findall(line):
            if section not in sections:
                problems.append(f"{name} line {n}: cites §{section}, which docs/protocol.md does not have")
            cited = [int(x) for x in re.findall(r"\d+", numbers)]
            problems += [
                f"{name} line {n}: cites §{section} item {item}; docs/protocol.md §7 has items 1-{items}"
                for item in cited
                if section != "7" or not 1 <= item <= items
            ]
    assert sections and items, "docs/protocol.md: no numbered sections, or §7 lost its numbered items"
    assert not problems, "\n".join(problems)


def test_no_fact_is_cited_by_an_issue_number() -> None:
    problems = [
        f"{name} line {n}: cites '{match}', which a clone of the repository cannot look up: say the fact "
        "itself, or cite the page of docs/ that says it"
        for name, n, line in _lines()
        for match in ISSUE.findall(line)
    ]
    assert not problems, "\n".join(problems)


def test_the_citing_files_are_found() -> None:
    assert all(path.is_file() for path in CITING), [str(p) for p in CITING if not p.is_file()]
    assert len([p for p in CITING if p.suffix == ".py"]) > 50

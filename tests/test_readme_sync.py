"""README.md and README.zh-CN.md stay in step, the reference pages stay true, and links lead somewhere.

README.md is a short front page; the reference is in docs/ (REFERENCE below) and ARCHITECTURE.md.
The two READMEs are compared by their code, never by their prose:

* every section of README.md has its counterpart in README.zh-CN.md: a translated
  heading with `<!-- en: <the English heading> -->` on the line before it;
* every command line, every option of a batchrun command and every job-file key
  found in README.md's code (fenced blocks and `code spans`) appears in
  README.zh-CN.md's code too;
* the other way round, a code span or batchrun command the Chinese file shows (outside
  its own sections and its top, and not written in Chinese) is still in README.md or in
  batchrun's code, and its job-file keys are README.md's: a passage README.md changed
  or dropped does not live on in Chinese;
* both stay front pages: at most FRONT_PAGE_CHARS characters each.

The reference pages:

* every subcommand of the CLI's own parser has its section in docs/cli.md, and each of
  its options appears in that section's code (so a new command or option is documented
  there, with an example); every key of the job model (JobSpec) appears in
  docs/job-file.md's code;
* every command block of the READMEs and of the reference pages runs, or is marked
  illustrative, and so does every ```python block;
* every relative link of these pages, of the other pages of docs/ and of ARCHITECTURE.md
  leads to a file of the repository and, with a `#fragment`, to a heading of it (GitHub's
  anchors.

A command block is a fenced block holding command lines: lines starting with
`batchrun <subcommand>`, `pip`, `pytest` or `python`, or, in a block written as
a terminal session, the lines starting with `$ ` (the others are output). What
follows `  # ` on a line is a comment, not part of the command: it may be translated.

Marker convention: a block that cannot run here (a server that runs until
stopped, a Ray cluster, the four-minute bench, the real relay) carries the HTML
comment

    <!-- illustrative -->

on the line right before its opening fence (it renders as nothing). Its batchrun
lines are still checked by batchrun's own argument parser, so a renamed or removed
option fails the test either way. Unmarked blocks are run, in this process, in
order (the READMEs, then REFERENCE), against one copy of jobs/ and sample_data/:
`pip install ...`, `python -m venv`, `. .venv/bin/activate` and `pytest` are skipped
(the environment is installed, and the suite is what is running), every
`batchrun` command must exit 0 (the jobs use the built-in emulator; `batchrun emulator`,
`batchrun bench` and `--engine ray` are never run, so their blocks need the marker), every
`python -c CODE` and every ```python block must run without an exception (they may read
what earlier commands wrote; a block may `await` at its top level, as in a notebook).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import inspect
import re
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO
from pydantic import BaseModel

from batchrun.cli import _parser, main
from batchrun.job.spec import JobSpec

EN = REPO / "README.md"
ZH = REPO / "README.zh-CN.md"
CLI = REPO / "docs" / "cli.md"
JOB_FILE = REPO / "docs" / "job-file.md"
REFERENCE = [
    REPO / "docs" / name
    for name in (
        "cli.md",
        "job-file.md",
        "python-api.md",
        "request-files.md",
        "relays.md",
        "object-storage.md",
        "performance.md",
        "development.md",
    )
]
FRONT_PAGE_CHARS = 12_000
MARKER = "<!-- illustrative -->"
COUNTERPART = re.compile(r"<!-- en: (.+?) -->")  # before a heading of README.zh-CN.md
PROGRAMS = ("batchrun", "pip", "pytest", "python", "python3")
JOB_SECTIONS = ("name", "input", "provider", "model", "prompt", "params", "stream", "output", "run", "pricing")
NOT_RUN = {"emulator": "a server that runs until stopped", "bench": "it takes seconds to minutes"}
# Values in the API's, JSON Schema's or object_store's own words, not job-file keys.
FREE_FORM = ("params", "output.schema", "input.storage_options", "output.storage_options")


def _commands() -> dict[str, argparse.ArgumentParser]:
    """The CLI's subcommands and their parsers, from its own argument parser."""
    (action,) = (a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = set(_commands())
OPTIONS = {option for command in _commands().values() for a in command._actions for option in a.option_strings}


@dataclass(frozen=True)
class Section:
    line: int
    title: str  # as written
    english: str  # the README.md heading it stands for ("" for a section only this file has)
    level: int  # 2 for ##, 3 for ###, …


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    info: str  # the fence's language
    lines: list[str]
    illustrative: bool

    def commands(self) -> list[tuple[int, str]]:
        """(line, command) of each command line, comments dropped and whitespace collapsed."""
        session = any(line.startswith("$ ") for line in self.lines)
        found = []
        for n, line in enumerate(self.lines, start=self.line + 1):
            if session and not line.startswith("$ "):
                continue
            command = _strip_comment(line.removeprefix("$ "))
            if _is_command(command):
                found.append((n, command))
        return found


@dataclass
class Readme:
    path: Path
    sections: list[Section] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    spans: list[tuple[int, str]] = field(default_factory=list)  # (line, code)
    anchors: list[str] = field(default_factory=list)  # GitHub's ids of every heading, title included
    links: list[tuple[int, str]] = field(default_factory=list)  # (line, target) of the links outside code

    @classmethod
    def read(cls, path: Path) -> Readme:
        readme = cls(path)
        prose: list[str] = []  # the text outside fenced blocks (blocks blanked, so line numbers hold)
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            before = lines[i - 1].strip() if i else ""
            opening = re.match(r" {0,3}(`{3,})([^`]*)$", line)
            if opening:
                j = i + 1
                while j < len(lines) and not re.match(rf" {{0,3}}{opening.group(1)}`*\s*$", lines[j]):
                    j += 1
                readme.blocks.append(Block(i + 1, opening.group(2).strip(), lines[i + 1 : j], before == MARKER))
                prose += [""] * (j + 1 - i)
                i = j + 1
                continue
            heading = re.match(r"(#{1,6})\s+(.*)", line)
            if heading:
                title = heading.group(2).strip()
                readme.anchors.append(_anchor(title, readme.anchors))
            if heading and len(heading.group(1)) > 1:
                counterpart = COUNTERPART.fullmatch(before)
                english = counterpart.group(1) if counterpart else ""
                readme.sections.append(Section(i + 1, title, title if path != ZH else english, len(heading.group(1))))
            prose.append(line)
            i += 1
        readme.spans = list(_spans(prose))
        readme.links = list(_links(prose))
        return readme

    def where(self, line: int) -> str:
        section = next((s.title for s in reversed(self.sections) if s.line <= line), "(top)")
        return f"{self.path.relative_to(REPO).as_posix()} line {line}, section '{section}'"

    def lines_of(self, section: Section) -> range:
        """The lines of a section, its subsections included."""
        after = (s.line for s in self.sections if s.line > section.line and s.level <= section.level)
        return range(section.line, next(after, 1 << 30))

    def section_of(self, line: int) -> str:
        return next((s.english for s in reversed(self.sections) if s.line <= line), "")

    def command_lines(self) -> dict[str, int]:
        """Each command line of the command blocks and the line it first appears on."""
        found: dict[str, int] = {}
        for block in self.blocks:
            for line, command in block.commands():
                found.setdefault(command, line)
        return found

    def options(self, lines: range | None = None) -> dict[str, int]:
        """The options of batchrun's commands shown in the code (an option the CLI lacks is prose, not checked),
        in the given lines only if given."""
        found: dict[str, int] = {}
        for line, code in self._code():
            if lines is not None and line not in lines:
                continue
            for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code):
                if option in OPTIONS:
                    found.setdefault(option, line)
        return found

    def subcommands(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for line, code in self._code():
            for name in re.findall(r"\bbatchrun ([a-z]+)\b", code):
                if name in SUBCOMMANDS:
                    found.setdefault(f"batchrun {name}", line)
        return found

    def job_keys(self) -> dict[str, int]:
        """Dotted job-file keys: from the YAML blocks (commented-out keys too) and from spans like `run.max_cost`."""
        found: dict[str, int] = {}
        for block in self.blocks:
            if block.info in ("yaml", "yml"):
                for line, key in _yaml_keys(block.lines, block.line + 1):
                    found.setdefault(key, line)
        sections = "|".join(JOB_SECTIONS)
        for line, code in self.spans:
            if re.fullmatch(rf"(?:{sections})(?:\.[a-z_]+)+", code):
                found.setdefault(code, line)
        return found

    def _code(self) -> Iterator[tuple[int, str]]:
        for block in self.blocks:
            for n, line in enumerate(block.lines, start=block.line + 1):
                yield n, _strip_comment(line)
        yield from self.spans


def _spans(prose: list[str]) -> Iterator[tuple[int, str]]:
    """Code spans (CommonMark: a run of n backticks up to the next run of exactly n) and their lines."""
    text = "\n".join(prose)
    pos = 0
    while (opening := re.compile(r"`+").search(text, pos)) is not None:
        closing = re.compile(rf"(?<!`){opening.group(0)}(?!`)").search(text, opening.end())
        if closing is None:
            pos = opening.end()
            continue
        yield text.count("\n", 0, opening.start()) + 1, " ".join(text[opening.end() : closing.start()].split())
        pos = closing.end()


def _anchor(title: str, taken: list[str]) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces as hyphens; -1, -2 … when taken."""
    base = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
    anchor, n = base, 0
    while anchor in taken:
        n += 1
        anchor = f"{base}-{n}"
    return anchor


def _links(prose: list[str]) -> Iterator[tuple[int, str]]:
    """The targets of Markdown links and images, outside code blocks and code spans."""
    for n, line in enumerate(prose, start=1):
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`+[^`]*`+", "", line)):
            yield n, target


def _strip_comment(line: str) -> str:
    """The line without a trailing `  # comment`, whitespace collapsed."""
    return " ".join(re.split(r"(?:^|\s)#(?:\s|$)", line, maxsplit=1)[0].split())


def _is_command(line: str) -> bool:
    words = line.split()
    if not words or words[0] not in PROGRAMS:
        return False
    return words[0] != "batchrun" or (len(words) > 1 and (words[1] in SUBCOMMANDS or words[1].startswith("-")))


def _yaml_keys(lines: list[str], first_line: int) -> Iterator[tuple[int, str]]:
    stack: list[tuple[int, str]] = []  # (indent, dotted key) of the keys enclosing this line
    text_above: int | None = None  # the indent of a key whose value is a block of text (`user: |`)
    for n, line in enumerate(lines, start=first_line):
        indent = len(line) - len(line.lstrip())
        if text_above is not None and (indent > text_above or not line.strip()):
            continue
        text_above = None
        match = re.match(r"(\s*)(#\s*)?([A-Za-z_][A-Za-z0-9_]*):(?:\s|$)", line)
        if not match:
            continue
        if re.match(r"[|>][-+]?\s*(#.*)?$", line[match.end() :].strip()):
            text_above = indent
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        if parent in FREE_FORM or parent.startswith(tuple(f"{f}." for f in FREE_FORM)):
            continue
        key = f"{parent}.{match.group(3)}" if parent else match.group(3)
        stack.append((indent, key))
        yield n, key
        if key not in FREE_FORM:
            yield from ((n, f"{key}.{inner}") for inner in _flow_keys(line[match.end() :]))


def _flow_keys(value: str) -> list[str]:
    """The keys of a one-line mapping such as `{input_per_million: 2.5, currency: USD}` (none for other values)."""
    value = re.split(r"\s#\s", f" {value.strip()} ", maxsplit=1)[0].strip()
    if not (value.startswith("{") and value.endswith("}")):
        return []
    inner = value[1:-1]
    while re.search(r"[{\[][^{}\[\]]*[}\]]", inner):
        inner = re.sub(r"[{\[][^{}\[\]]*[}\]]", "", inner)  # nested mappings and lists: their keys are not ours
    return re.findall(r"(?:^|,)\s*([A-Za-z_][A-Za-z0-9_]*)\s*:", inner)


@pytest.fixture(scope="module")
def readmes() -> tuple[Readme, Readme]:
    return Readme.read(EN), Readme.read(ZH)


@pytest.fixture(scope="module")
def pages(readmes: tuple[Readme, Readme]) -> list[Readme]:
    """The two READMEs, then the reference pages, in the order their blocks run."""
    return [*readmes, *(Readme.read(path) for path in REFERENCE)]


def _alike(page: Readme) -> str:
    return " in README.md and README.zh-CN.md alike" if page.path in (EN, ZH) else ""


def test_the_two_files_link_each_other() -> None:
    assert "(README.zh-CN.md)" in EN.read_text(encoding="utf-8").split("\n## ", 1)[0], (
        "README.md: link README.zh-CN.md at the top, before the first section"
    )
    assert "(README.md)" in ZH.read_text(encoding="utf-8").split("\n## ", 1)[0], (
        "README.zh-CN.md: link README.md at the top, before the first section"
    )


def test_every_section_has_its_chinese_counterpart(readmes: tuple[Readme, Readme]) -> None:
    en, zh = readmes
    have = {s.english for s in zh.sections}
    problems = []
    for before, section in zip([None, *en.sections], en.sections):
        if section.english in have:
            continue
        after = next((s for s in zh.sections if before and s.english == before.english), None)
        place = f"after the section at README.zh-CN.md line {after.line}" if after else "in the matching place"
        problems.append(
            f"README.zh-CN.md has no section for README.md's '{section.title}' (line {section.line}): add a "
            f"translated heading {place}, with <!-- en: {section.title} --> on the line before it"
        )
    order = [s.english for s in zh.sections if s.english]
    expected = [s.english for s in en.sections if s.english in order]
    assert not problems, "\n".join(problems)
    assert order == expected, (
        "README.zh-CN.md's sections are not in README.md's order; expected (by their <!-- en: --> names):\n"
        + "\n".join(expected)
    )


def test_the_chinese_readme_has_every_command_option_and_key(readmes: tuple[Readme, Readme]) -> None:
    en, zh = readmes
    checks = [
        ("command", en.command_lines(), zh.command_lines(), "copy the line into a command block there"),
        ("option", en.options(), zh.options(), "show it there in a command line or a `code span`"),
        ("job-file key", en.job_keys(), zh.job_keys(), "add it to the job file block, or name it as a `code span`"),
        ("command", en.subcommands(), zh.subcommands(), "document the command there"),
    ]
    problems = [
        f"README.zh-CN.md lacks the {what} `{item}` (README.md line {line}): {hint}, "
        f"{_counterpart(zh, en.section_of(line))}"
        for what, wanted, present, hint in checks
        for item, line in wanted.items()
        if item not in present
    ]
    assert not problems, "\n".join([*problems, "(comments after `  # ` in code blocks may be in Chinese)"])


def test_the_chinese_readme_shows_nothing_the_readme_dropped(readmes: tuple[Readme, Readme]) -> None:
    """What the Chinese file shows as code, outside its own sections, README.md or batchrun's code still says."""
    en, zh = readmes
    english = EN.read_text(encoding="utf-8")
    en_code = {code for _, code in en.spans} | set(en.command_lines())
    source = "".join(path.read_text(encoding="utf-8") for path in (REPO / "batchrun").rglob("*.py"))
    shown = [
        (line, code)
        for line, code in zh.spans
        if zh.section_of(line) and not re.search(r"[\u3000-\u9fff\uff00-\uffef]", code)  # not its own, not Chinese
    ]
    shown += [
        (line, command)
        for command, line in zh.command_lines().items()
        if zh.section_of(line) and command.startswith("batchrun ")
    ]
    problems = [
        f"{zh.where(line)} shows `{code}`, which README.md no longer has: update or remove that passage "
        f"to match README.md's section '{zh.section_of(line)}'"
        for line, code in shown
        if code not in english and code not in source and code not in en_code
    ]
    problems += [
        f"{zh.where(line)} has the job-file key `{key}`, which README.md no longer has: remove or rename it"
        for key, line in zh.job_keys().items()
        if key not in en.job_keys()
    ]
    assert not problems, "\n".join(problems)


def _counterpart(zh: Readme, english: str) -> str:
    section = next((s for s in zh.sections if english and s.english == english), None)
    if section is None:
        return f"in its section for '{english or '(top)'}'"
    counterpart = "" if section.title == english else f", the counterpart of '{english}'"
    return f"in its section '{section.title}' (line {section.line}{counterpart})"


def test_the_readmes_stay_front_pages() -> None:
    for path in (EN, ZH):
        size = len(path.read_text(encoding="utf-8"))
        assert size <= FRONT_PAGE_CHARS, (
            f"{path.name} has {size} characters, more than a front page's {FRONT_PAGE_CHARS}: move reference text "
            "to a page of docs/ (see REFERENCE in tests/test_readme_sync.py) and link it from a line"
        )


def test_the_cli_page_documents_every_command_and_option() -> None:
    cli = Readme.read(CLI)
    problems = [
        f"docs/cli.md lacks `batchrun {name}`: document the command there, with an example"
        for name in sorted(SUBCOMMANDS)
        if f"batchrun {name}" not in cli.subcommands()
    ]
    for name, parser in sorted(_commands().items()):
        options = {s for action in parser._actions for s in action.option_strings if s.startswith("--")}
        section = next((s for s in cli.sections if s.title.startswith(f"`batchrun {name}")), None)
        if section is None:
            problems.append(f"docs/cli.md has no section '## `batchrun {name} …`': add one, with examples")
            continue
        problems += [
            f"docs/cli.md lacks the `batchrun {name}` option `{option}` in its section '{section.title}' "
            f"(line {section.line}): add an example line to a command block there"
            for option in sorted(options - {"--help"} - set(cli.options(cli.lines_of(section))))
        ]
    assert not problems, "\n".join(problems)


def _spec_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """The job file's keys, dotted, from the job model itself (as written in YAML)."""
    for name, info in model.model_fields.items():
        key = prefix + (info.alias or name)
        yield key
        for inner in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from _spec_keys(inner, f"{key}.")


def test_the_job_file_page_documents_every_key() -> None:
    shown = Readme.read(JOB_FILE).job_keys()
    missing = [key for key in _spec_keys(JobSpec) if key not in shown]
    assert not missing, "\n".join(
        f"docs/job-file.md lacks the job-file key `{key}`: add it, with a comment saying what it does, to the "
        "job file block under '## Every key' (commented out if it is optional), or name it as a `code span`"
        for key in missing
    )


def test_every_link_leads_somewhere(pages: list[Readme]) -> None:
    """In the READMEs, the reference pages, every other page of docs/ and ARCHITECTURE.md."""
    others = [*sorted((REPO / "docs").glob("*.md")), REPO / "ARCHITECTURE.md"]
    pages = [*pages, *(Readme.read(path) for path in others if path not in REFERENCE)]
    anchors = {page.path: page.anchors for page in pages}
    problems = []
    for page in pages:
        for line, target in page.links:
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto: … are not checked here
            file, _, fragment = target.partition("#")
            path = (page.path.parent / file).resolve() if file else page.path
            name = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
            if not path.exists():
                problems.append(f"{page.where(line)}: the link to {target} leads to no file ({name})")
                continue
            if fragment and path.suffix == ".md":
                if path not in anchors:
                    anchors[path] = Readme.read(path).anchors
                if fragment not in anchors[path]:
                    problems.append(
                        f"{page.where(line)}: the link to {target}: {name} has no heading with the id "
                        f"'{fragment}' (its ids: {', '.join(anchors[path])})"
                    )
    assert not problems, "\n".join(problems)


def _command_blocks(pages: list[Readme]) -> Iterator[tuple[Readme, Block]]:
    return ((page, block) for page in pages for block in page.blocks if block.commands())


def _parts(command: str) -> Iterator[list[str]]:
    """The words of each command of a line (commands joined by `&&`)."""
    part: list[str] = []
    for word in [*shlex.split(command), "&&"]:
        if word != "&&":
            part.append(word)
        elif part:
            yield part
            part = []


def test_every_batchrun_line_parses(pages: list[Readme], capsys: pytest.CaptureFixture[str]) -> None:
    problems = []
    for page, block in _command_blocks(pages):
        for line, command in block.commands():
            for part in _parts(command):
                if part[0] != "batchrun":
                    continue
                try:
                    _parser().parse_args(part[1:])
                except SystemExit as e:
                    if not e.code:
                        continue  # --version, --help
                    why = capsys.readouterr().err.strip().splitlines()[-1:]
                    problems.append(
                        f"{page.where(line)}: batchrun refuses `{shlex.join(part)}` ({' '.join(why)}): "
                        f"fix the line{_alike(page)}"
                    )
    assert not problems, "\n".join(problems)


def test_every_command_block_runs_or_is_marked_illustrative(
    pages: list[Readme], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder in ("jobs", "sample_data"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KUAIMA_API_KEY", raising=False)  # a command that would reach the real relay fails instead
    monkeypatch.setenv("BROWSER", "true")  # a command that opens a page in the browser opens nothing
    problems = []
    ran: set[str] = set()
    for page, block in ((p, b) for p in pages for b in p.blocks if not b.illustrative):
        if block.info == "python":
            problem = _run_python("\n".join(block.lines))
            err = capsys.readouterr().err.strip()
            if problem:
                problems.append(f"{page.where(block.line)}: the python block {problem}" + _stderr(err))
            continue
        parts = [(line, part) for line, command in block.commands() for part in _parts(command) if not _is_setup(part)]
        unrunnable = [(line, part, why) for line, part in parts if (why := _why_not_runnable(part, tmp_path))]
        if unrunnable:
            line, part, why = unrunnable[0]
            problems.append(
                f"{page.where(line)}: `{shlex.join(part)}` cannot run in this test ({why}): put {MARKER} on the "
                f"line before the block's opening fence (line {block.line}){_alike(page)}, or make the block runnable"
            )
            continue
        for line, part in parts:
            if " ".join(part) in ran:
                continue  # the same command on another page
            ran.add(" ".join(part))
            problem = _run_here(part)
            err = capsys.readouterr().err.strip()
            if problem:
                problems.append(
                    f"{page.where(line)}: `{shlex.join(part)}` {problem}{_stderr(err)}. If it cannot run here, "
                    f"move it to a block with {MARKER} before it{_alike(page)}"
                )
    assert not problems, "\n".join(problems)


def _stderr(err: str) -> str:
    return f"; stderr: {err[-500:]}" if err else ""


def _is_setup(words: list[str]) -> bool:
    """pip, a venv and its activation (this environment is installed), and pytest (the suite is what is running)."""
    return words[0] in ("pip", "pytest", ".", "source") or words[1:3] == ["-m", "venv"]


def _why_not_runnable(words: list[str], project: Path) -> str | None:
    if words[0] in ("python", "python3"):
        return None if len(words) == 3 and words[1] == "-c" else "of python, only `python -c CODE` is run"
    if words[0] != "batchrun":
        return f"only batchrun, python -c, pip and pytest commands are run, not {words[0]}"
    if words[1] in NOT_RUN:
        return NOT_RUN[words[1]]
    if "--engine" in words:
        return "it starts Ray"
    missing = [w for w in words[2:] if w.endswith((".yaml", ".yml")) and not (project / w).is_file()]
    return f"{missing[0]} is not a job file of the repository" if missing else None


def _run_here(words: list[str]) -> str | None:
    """Runs a command in this process (the current folder is the project copy); what went wrong, if anything."""
    if words[0] != "batchrun":  # python -c CODE
        return _run_python(words[2])
    code: int | str | None
    try:
        code = main(words[1:])
    except SystemExit as e:  # argparse refused it
        code = e.code
    return None if code == 0 else f"exited {code}"


def _run_python(source: str) -> str | None:
    """Runs Python as a notebook cell would (an `await` at the top level included); what went wrong, if anything."""
    try:
        code = compile(source, "<block>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        awaited = eval(code, {"__name__": "__main__"})
        if inspect.iscoroutine(awaited):
            asyncio.run(awaited)
    except Exception as e:
        return f"failed: {type(e).__name__}: {e}"
    return None

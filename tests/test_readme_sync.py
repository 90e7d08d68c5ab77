"""README.md and README.zh-CN.md stay in step, and their command blocks stay true.

The two files are compared by their code, never by their prose:

* every command line, every `--option` and every job-file key found in README.md's
  code (fenced blocks and `code spans`) must appear in README.zh-CN.md's code too;
* every subcommand and every `batchrun run` option of the CLI's own parser must
  appear in README.md's code (so a new option is documented, then copied over);
* every command block of either file runs, or is marked illustrative.

A command block is a fenced block holding command lines: lines starting with
`batchrun <subcommand>`, `pip`, `pytest` or `python`, or, in a block written as
a terminal session, the lines starting with `$ ` (the other lines are output).
Comments after `  #` are not part of a command, so they may be translated.

Marker convention: a command block that cannot run here (a server that runs until
stopped, a Ray cluster, the four-minute bench) carries the HTML comment

    <!-- illustrative -->

on the line right before its opening fence (it renders as nothing). Its command
lines are still parsed by batchrun's own argument parser, so a renamed or removed
option fails the test either way. Unmarked blocks are run, in one process against
a copy of jobs/ and sample_data/: `pip install ...` and `pytest` are skipped (the
environment is installed, and the suite is what is running), and every `batchrun`
command must exit 0.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

from batchrun.cli import _parser, main

EN = REPO / "README.md"
ZH = REPO / "README.zh-CN.md"
MARKER = "<!-- illustrative -->"
PROGRAMS = ("batchrun", "pip", "pytest", "python", "python3")
JOB_SECTIONS = ("name", "input", "provider", "model", "prompt", "params", "stream", "output", "run", "pricing")
FREE_FORM = ("params", "output.schema")  # values in the API's or JSON Schema's own words, not job-file keys


def _commands() -> dict[str, argparse.ArgumentParser]:
    """The CLI's subcommands and their parsers, from its own argument parser."""
    (action,) = (a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = set(_commands())


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    info: str  # the fence's language
    lines: list[str]
    section: str  # the heading it is under
    illustrative: bool

    def commands(self) -> list[str]:
        session = any(line.startswith("$ ") for line in self.lines)
        found = []
        for line in self.lines:
            if session and not line.startswith("$ "):
                continue
            command = _strip_comment(line.removeprefix("$ "))
            if _is_command(command):
                found.append(command)
        return found


@dataclass
class Readme:
    path: Path
    blocks: list[Block] = field(default_factory=list)
    spans: list[tuple[str, int, str]] = field(default_factory=list)  # (code, line, section)

    @classmethod
    def read(cls, path: Path) -> Readme:
        readme = cls(path)
        text_lines: list[str] = []  # the prose, fenced blocks blanked (line numbers kept)
        section = "(top)"
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            opening = re.match(r" {0,3}(`{3,})([^`]*)$", line)
            if opening:
                fence, body = opening.group(1), []
                j = i + 1
                while j < len(lines) and not re.match(rf" {{0,3}}{fence}`*\s*$", lines[j]):
                    body.append(lines[j])
                    j += 1
                marked = i > 0 and lines[i - 1].strip() == MARKER
                readme.blocks.append(Block(i + 1, opening.group(2).strip(), body, section, marked))
                text_lines += [""] * (j + 1 - i)
                i = j + 1
                continue
            heading = re.match(r"#{1,6}\s+(.*)", line)
            if heading:
                section = heading.group(1).strip()
            text_lines.append(line)
            i += 1
        readme.spans = list(_spans(text_lines))
        return readme

    def where(self, line: int, section: str) -> str:
        return f"{self.path.name} line {line}, section '{section}'"

    def command_lines(self) -> dict[str, str]:
        """Each command line of a command block, normalised, and where it first appears."""
        found: dict[str, str] = {}
        for block in self.blocks:
            for command in block.commands():
                found.setdefault(command, self.where(block.line, block.section))
        return found

    def options(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for code, where in self._code():
            for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code):
                found.setdefault(option, where)
        return found

    def subcommands(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for code, where in self._code():
            for name in re.findall(r"\bbatchrun ([a-z]+)\b", code):
                if name in SUBCOMMANDS:
                    found.setdefault(name, where)
        return found

    def job_keys(self) -> dict[str, str]:
        """Dotted job-file keys: from the YAML blocks (commented-out keys too) and from spans like `run.max_cost`."""
        found: dict[str, str] = {}
        for block in self.blocks:
            if block.info in ("yaml", "yml"):
                for key in _yaml_keys(block.lines):
                    found.setdefault(key, self.where(block.line, block.section))
        sections = "|".join(JOB_SECTIONS)
        for code, line, section in self.spans:
            if re.fullmatch(rf"(?:{sections})(?:\.[a-z_]+)+", code):
                found.setdefault(code, self.where(line, section))
        return found

    def _code(self) -> Iterator[tuple[str, str]]:
        for block in self.blocks:
            yield "\n".join(_strip_comment(line) for line in block.lines), self.where(block.line, block.section)
        for code, line, section in self.spans:
            yield code, self.where(line, section)


def _spans(text_lines: list[str]) -> Iterator[tuple[str, int, str]]:
    """Code spans (CommonMark: a run of n backticks up to the next run of exactly n), with line and section."""
    text = "\n".join(text_lines)
    starts = [0]
    sections: list[str] = []
    section = "(top)"
    for line in text_lines:
        heading = re.match(r"#{1,6}\s+(.*)", line)
        section = heading.group(1).strip() if heading else section
        sections.append(section)
        starts.append(starts[-1] + len(line) + 1)
    pos = 0
    while (opening := re.compile(r"`+").search(text, pos)) is not None:
        ticks = opening.group(0)
        closing = re.compile(rf"(?<!`){ticks}(?!`)").search(text, opening.end())
        if closing is None:
            pos = opening.end()
            continue
        code = " ".join(text[opening.end() : closing.start()].split())
        line = next(n for n, start in enumerate(starts) if start > opening.start())
        yield code, line, sections[line - 1]
        pos = closing.end()


def _strip_comment(line: str) -> str:
    """The line without a trailing `  # comment`, whitespace collapsed."""
    return " ".join(re.split(r"(?:^|\s)#(?:\s|$)", line, maxsplit=1)[0].split())


def _is_command(line: str) -> bool:
    words = line.split()
    if not words or words[0] not in PROGRAMS:
        return False
    return words[0] != "batchrun" or (len(words) > 1 and words[1] in SUBCOMMANDS)


def _yaml_keys(lines: list[str]) -> Iterator[str]:
    stack: list[tuple[int, str]] = []  # (indent, dotted key) of the keys enclosing this line
    for line in lines:
        match = re.match(r"(\s*)(#\s*)?([A-Za-z_][A-Za-z0-9_]*):(?:\s|$)", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        if parent in FREE_FORM or parent.startswith(tuple(f"{f}." for f in FREE_FORM)):
            continue
        key = f"{parent}.{match.group(3)}" if parent else match.group(3)
        stack.append((indent, key))
        yield key


@pytest.fixture(scope="module")
def readmes() -> tuple[Readme, Readme]:
    return Readme.read(EN), Readme.read(ZH)


def _missing(what: str, en: dict[str, str], zh_has: set[str], hint: str) -> list[str]:
    return [
        f"README.zh-CN.md lacks the {what} `{item}` (from {where}): {hint}"
        for item, where in en.items()
        if item not in zh_has
    ]


def test_the_two_files_link_each_other() -> None:
    assert "(README.zh-CN.md)" in EN.read_text(encoding="utf-8").split("\n## ", 1)[0], (
        "README.md: link README.zh-CN.md at the top, before the first section"
    )
    assert "(README.md)" in ZH.read_text(encoding="utf-8").split("\n## ", 1)[0], (
        "README.zh-CN.md: link README.md at the top, before the first section"
    )


def test_the_chinese_readme_has_every_command_option_and_key(readmes: tuple[Readme, Readme]) -> None:
    en, zh = readmes
    zh_code = {code for code, _ in zh._code()}
    problems = _missing(
        "command",
        en.command_lines(),
        set(zh.command_lines()),
        "copy the line into the matching command block of README.zh-CN.md (comments may be translated)",
    )
    problems += _missing(
        "option",
        en.options(),
        set(zh.options()),
        "show it in README.zh-CN.md's matching section, in a command block or a `code span`",
    )
    problems += _missing(
        "job-file key",
        en.job_keys(),
        set(zh.job_keys()),
        "add it to the job file block of README.zh-CN.md (or name it as a `code span` like `run.max_cost`)",
    )
    problems += [
        f"README.zh-CN.md lacks `batchrun {name}` (from {where}): document the command in README.zh-CN.md"
        for name, where in en.subcommands().items()
        if not any(f"batchrun {name}" in code for code in zh_code)
    ]
    assert not problems, "\n".join(problems)


def test_the_readme_documents_every_command_and_run_option(readmes: tuple[Readme, Readme]) -> None:
    en, _ = readmes
    run_options = {s for action in _commands()["run"]._actions for s in action.option_strings if s.startswith("--")}
    run_options.discard("--help")
    problems = [
        f"README.md lacks `batchrun {name}`: document the command (with an example) in README.md, "
        "then in README.zh-CN.md"
        for name in sorted(SUBCOMMANDS - set(en.subcommands()))
    ]
    problems += [
        f"README.md lacks the `batchrun run` option `{option}`: add an example line to the block under "
        "'### `batchrun run JOB.yaml`' in README.md, then the same line to README.zh-CN.md"
        for option in sorted(run_options - set(en.options()))
    ]
    assert not problems, "\n".join(problems)


def _command_blocks(readmes: tuple[Readme, Readme]) -> list[tuple[Readme, Block]]:
    return [(readme, block) for readme in readmes for block in readme.blocks if block.commands()]


def test_every_command_line_parses(readmes: tuple[Readme, Readme]) -> None:
    problems = []
    for readme, block in _command_blocks(readmes):
        for command in block.commands():
            words = shlex.split(command)
            for part in _parts(words):
                if part[0] != "batchrun" or "JOB" in " ".join(part):
                    continue
                try:
                    _parser().parse_args(part[1:])
                except SystemExit:
                    problems.append(
                        f"{readme.where(block.line, block.section)}: `{' '.join(part)}` is refused by "
                        "batchrun's argument parser: fix the command in both README files"
                    )
    assert not problems, "\n".join(problems)


def _parts(words: list[str]) -> Iterator[list[str]]:
    """A command line split at `&&`."""
    part: list[str] = []
    for word in [*words, "&&"]:
        if word == "&&":
            if part:
                yield part
            part = []
        else:
            part.append(word)


def test_every_command_block_runs_or_is_marked_illustrative(
    readmes: tuple[Readme, Readme], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder in ("jobs", "sample_data"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    problems = []
    ran: set[str] = set()
    for readme, block in _command_blocks(readmes):
        if block.illustrative:
            continue
        where = readme.where(block.line, block.section)
        parts = [
            part
            for command in block.commands()
            for part in _parts(shlex.split(command))
            if part[0] not in ("pip", "pytest")  # the environment is installed; the suite is what is running
        ]
        why_not = next(((part, why) for part in parts if (why := _why_not_runnable(part, tmp_path))), None)
        if why_not:
            problems.append(
                f"{where}: the command block starting at this line cannot run in this test "
                f"(`{' '.join(why_not[0])}`: {why_not[1]}): put {MARKER} on the line before its opening fence "
                "(in README.md and README.zh-CN.md alike), or make its commands runnable"
            )
            continue
        for part in parts:
            if " ".join(part) in ran:
                continue  # the same command in the other file
            ran.add(" ".join(part))
            code = main(part[1:])
            err = capsys.readouterr().err
            if code != 0:
                problems.append(f"{where}: `{' '.join(part)}` exited {code}: {err.strip()[-500:]}")
    assert not problems, "\n".join(problems)


def _why_not_runnable(words: list[str], project: Path) -> str | None:
    if words[0] != "batchrun":
        return f"only batchrun, pip and pytest commands are run, not {words[0]}"
    if words[1] not in ("run", "validate", "status"):
        return f"`batchrun {words[1]}` is not run here"
    if "--engine" in words:
        return "it needs Ray"
    if len(words) < 3 or not (project / words[2]).is_file():
        return f"{words[2] if len(words) > 2 else 'the job'} is not a file of the repository"
    return None

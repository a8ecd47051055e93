"""The checked documentation: every fenced shell command of ``README.md`` and ``docs/*.md`` that calls an entry
point of this project is compared with the code.

A command is checked when it runs a script of this repository (``python pipeline/X.py ...``, ``torchrun ...
main.py ...``, ``srun python ...``, from the folder the block's ``cd`` lines lead to) or ``make X``. A problem is
reported when

- a flag is not one the entry point's parser (its ``build_parser()``) accepts, or a literal value is not one of
  the flag's choices; torchrun's own flags are checked against torchrun's parser;
- a script, config or other repository file named in the command does not exist (paths with a folder part and a
  source or config suffix, resolved from the block's folder, and for configs also from ``pipeline/`` as
  ``--base`` finds them);
- an ``inference.<key>=value`` override names no setting of :class:`inference.options.InferenceOptions`;
- a ``make`` target is not in the Makefile;
- a relative Markdown link names a file that does not exist, or a ``#heading`` the page does not have.

Placeholders are skipped: ``<...>``, ``$VARIABLES``, ``a|b`` alternatives, ``...``; ``[...]`` brackets of optional
parts are removed. Blocks marked ``bash``, ``sh``, ``shell`` or unmarked are commands line by line; in ``console``
and ``text`` blocks only the lines starting with ``$ `` are.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
ENTRY_FOLDERS = ("pipeline", "demo", "bench")
# Top-level folders of the repository: a path that resolves into one of them must exist.
REPOSITORY_FOLDERS = ("pipeline", "demo", "bench", "tests", "docs")
CHECKED_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml", ".md")
COMMAND_LANGUAGES = ("", "bash", "sh", "shell")
PROMPT_LANGUAGES = ("console", "text")
SEPARATORS = ("&&", "||", ";", "|")
PYTHONS = ("python", "python3")
LAUNCHERS = PYTHONS + ("torchrun",)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<language>[\w-]*)[ \t]*$")
INFERENCE_OVERRIDE = re.compile(r"^inference\.(?P<key>\w+)(\.[\w.]+)?=")
WRAPPERS = ("srun", "nice", "env", "time", "timeout")


@dataclass(frozen=True)
class Command:
    """One command of a fenced block: where it is written, the folder it runs in, its words."""

    source: str
    line: int
    cwd: PurePosixPath
    words: tuple[str, ...]

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """``(language, line number of the first line, lines)`` of every fenced block of a Markdown text."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, body, first_line, index = len(opening["indent"]), [], index + 2, index + 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index][indent:] if lines[index][:indent].strip() == "" else lines[index])
            index += 1
        blocks.append((opening["language"].lower(), first_line, body))
        index += 1
    return blocks


def logical_lines(language: str, first_line: int, lines: list[str]) -> list[tuple[int, str]]:
    """The command lines of a block with their line numbers: continuations joined, prompts removed."""
    joined: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in enumerate(lines, start=first_line):
        if language in PROMPT_LANGUAGES and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + line))
        pending = ""
    if pending:
        joined.append((start, pending))
    return joined


def _change_folder(cwd: PurePosixPath, target: str) -> PurePosixPath:
    """The folder after ``cd target`` (a leading ``"$VARIABLE/"`` stands for the repository root)."""
    target = re.sub(r"^\$\{?\w+\}?/?", "", target)
    return _normalise(cwd / target) if target else PurePosixPath(".")


def _normalise(path: PurePosixPath) -> PurePosixPath:
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            else:
                parts.append(part)
        elif part != ".":
            parts.append(part)
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def commands(text: str, source: str) -> list[Command]:
    """Every command of the shell blocks of a Markdown text, split at ``&&``, ``;``, ``|``."""
    found = []
    for language, first_line, lines in fenced_blocks(text):
        if language not in COMMAND_LANGUAGES + PROMPT_LANGUAGES:
            continue
        cwd = PurePosixPath(".")
        for number, line in logical_lines(language, first_line, lines):
            try:
                words = shlex.split(line, comments=True)
            except ValueError as error:
                found.append(Command(source, number, cwd, ("#unparsable", str(error))))
                continue
            for words in _split_commands(words):
                if words[0] == "cd" and len(words) > 1:
                    cwd = _change_folder(cwd, words[1])
                else:
                    found.append(Command(source, number, cwd, tuple(words)))
    return found


def _split_commands(words: list[str]) -> list[list[str]]:
    parts, current = [], []
    for word in words:
        if word in SEPARATORS:
            parts.append(current)
            current = []
        elif word.endswith(";") and len(word) > 1:
            current.append(word[:-1])
            parts.append(current)
            current = []
        else:
            current.append(word)
    parts.append(current)
    return [part for part in parts if part]


@lru_cache(maxsize=None)
def entry_point_parser(script: str) -> argparse.ArgumentParser:
    """``build_parser()`` of a script of the repository (``pipeline/test.py``), imported without running it."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location("_documented_" + re.sub(r"\W", "_", script), path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if not hasattr(module, "build_parser"):
        raise AssertionError(f"{script}: an entry point must define build_parser() (the doc checker reads it)")
    return module.build_parser()


def entry_points() -> list[str]:
    """Every script of the repository with a command line: ``pipeline/*.py``, ``demo/*.py``, ``bench/*.py``."""
    scripts = []
    for folder in ENTRY_FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            if "build_parser" in path.read_text() or "__main__" in path.read_text():
                scripts.append(f"{folder}/{path.name}")
    return scripts


@lru_cache(maxsize=None)
def torchrun_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    return get_args_parser()


@lru_cache(maxsize=None)
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([^\s:=#][^:=]*):(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return frozenset(targets)


@lru_cache(maxsize=None)
def inference_keys() -> frozenset[str]:
    from inference.options import InferenceOptions

    return frozenset(item.name for item in fields(InferenceOptions))


def _placeholder(word: str) -> bool:
    return any(mark in word for mark in ("<", ">", "$", "|", "...", "*")) or word in ("options", "flags")


def _unbracket(word: str) -> str:
    return word.lstrip("[").rstrip("]")


def _repository_path(cwd: PurePosixPath, word: str) -> PurePosixPath | None:
    """``word`` as a path relative to the repository root, when it lies inside one of its folders."""
    path = _normalise(cwd / word)
    return path if path.parts and path.parts[0] in REPOSITORY_FOLDERS else None


def _path_problem(command: Command, word: str) -> str | None:
    if _placeholder(word) or "/" not in word or not word.endswith(CHECKED_SUFFIXES) or word.startswith("/"):
        return None
    candidates = [_repository_path(command.cwd, word)]
    if word.endswith((".yaml", ".yml")):
        candidates.append(_repository_path(PurePosixPath("pipeline"), word))
    inside = [path for path in candidates if path is not None]
    if not inside or any((ROOT / path).exists() for path in inside):
        return None
    return f"{command.where()}: {word}: no such file in the repository (looked for {', '.join(map(str, inside))})"


def _flag_problems(command: Command, parser: argparse.ArgumentParser, words: list[str], program: str) -> list[str]:
    problems, actions = [], parser._option_string_actions
    for index, word in enumerate(words):
        word = _unbracket(word)
        if not word.startswith("-") or word == "-" or re.fullmatch(r"-\d+(\.\d*)?", word) or _placeholder(word):
            continue
        flag = word.split("=", 1)[0]
        if flag not in actions:
            problems.append(f"{command.where()}: {program}: {flag} is not a flag of its command line")
            continue
        action = actions[flag]
        values = [word.split("=", 1)[1]] if "=" in word else words[index + 1:index + 2]
        if action.choices and action.nargs is None and values:
            value = _unbracket(values[0])
            if not value.startswith("-") and not _placeholder(value) and value not in [str(c) for c in action.choices]:
                problems.append(f"{command.where()}: {program}: {flag} {value}: not one of "
                                f"{', '.join(map(str, action.choices))}")
    return problems


def _script_index(words: list[str]) -> int | None:
    """Where the script stands in ``python [options] SCRIPT ...`` / ``torchrun [options] SCRIPT ...``; None for
    ``python -m module`` and ``python -c code``."""
    for index, word in enumerate(words[1:], start=1):
        if word in ("-m", "-c"):
            return None
        if word.endswith(".py"):
            return index
        if not word.startswith("-") and PurePosixPath(words[0]).name in PYTHONS:
            return None
    return None


def check_command(command: Command) -> list[str]:
    """The problems of one documented command (an empty list when it matches the code or is not ours)."""
    words = list(command.words)
    if words[0] == "#unparsable":
        return [f"{command.where()}: cannot read the command: {words[1]}"]
    if words[0] == "make":
        return [f"{command.where()}: make {target}: no such target in the Makefile"
                for target in words[1:] if not target.startswith("-") and "=" not in target
                and target not in make_targets()]
    if PurePosixPath(words[0]).name in WRAPPERS:  # srun python ..., nice -n 10 python ...
        launchers = [index for index, word in enumerate(words) if PurePosixPath(word).name in LAUNCHERS]
        words = words[launchers[0]:] if launchers else []
    if not words or PurePosixPath(words[0]).name not in LAUNCHERS:
        return []
    problems = [problem for word in words[1:] if (problem := _path_problem(command, _unbracket(word)))]
    at = _script_index(words)
    if at is None:
        return problems
    if PurePosixPath(words[0]).name == "torchrun":
        problems += _flag_problems(command, torchrun_parser(), words[1:at], "torchrun")
    script = _normalise(command.cwd / words[at])
    if words[at].startswith("/") or script.parts[0] == ".." or _placeholder(words[at]):
        return problems
    if not (ROOT / script).is_file():
        return problems + [f"{command.where()}: {words[at]}: no such script from the block's folder "
                           f"({command.cwd}; each block starts at the repository root, `cd` lines move it)"]
    if script.parts[0] not in ENTRY_FOLDERS or len(script.parts) != 2:
        return problems
    arguments = words[at + 1:]
    problems += _flag_problems(command, entry_point_parser(str(script)), arguments, str(script))
    for word in arguments:
        match = INFERENCE_OVERRIDE.match(word)
        if match and match["key"] not in inference_keys():
            problems.append(f"{command.where()}: inference.{match['key']}: no such inference setting")
    return problems


def documentation_pages(root: Path = ROOT) -> list[Path]:
    """``README.md`` and every ``docs/*.md`` under ``root``, whoever added them."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _anchors(text: str) -> set[str]:
    """The link targets of a page: its headings as GitHub slugs them, and its ``<a id="...">`` anchors."""
    headings = re.findall(r"^#+ (.*)$", text, flags=re.M)
    slugs = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}
    return slugs | set(re.findall(r'<a id="([\w-]+)"></a>', text))


def link_problems(text: str, source: str, folder: Path) -> list[str]:
    """Relative Markdown links of a page (in ``folder``) whose file or ``#anchor`` does not exist."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        for path, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([\w-]+))?\)", line):
            if re.match(r"^[a-z]+:", path) or path.startswith("<"):
                continue
            target = (folder / path) if path else None
            if target is not None and not target.exists():
                problems.append(f"{source}:{number}: link to {path}: no such file")
            elif anchor and (target is None or target.suffix == ".md"):
                page = text if target is None else target.read_text(encoding="utf-8")
                if anchor not in _anchors(page):
                    problems.append(f"{source}:{number}: link to {path}#{anchor}: no such heading or anchor")
    return problems


def check_text(text: str, source: str, folder: Path | None = None) -> list[str]:
    """The problems of a page's commands, and of its links when its ``folder`` is given."""
    problems = [problem for command in commands(text, source) for problem in check_command(command)]
    return problems + (link_problems(text, source, folder) if folder is not None else [])


def check_pages(pages: list[Path] | None = None) -> list[str]:
    """Every problem of every documented command, one line each."""
    return [problem for page in (pages or documentation_pages())
            for problem in check_text(page.read_text(encoding="utf-8"),
                                      str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name,
                                      page.parent)]


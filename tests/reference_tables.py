"""Print the command-line sections of ``docs/reference.md`` from the entry points' parsers.

    .venv/bin/python tests/reference_tables.py                           # every entry point
    .venv/bin/python tests/reference_tables.py pipeline/synthesize.py    # one section, e.g. after adding a flag

Paste the output into ``docs/reference.md`` (``tests/test_docs.py`` fails while a flag is missing there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "pipeline"), str(Path(__file__).resolve().parent)]

from doc_commands import entry_point_parser, entry_points  # noqa: E402

# The order a user meets them in; other entry points follow in folder order.
FIRST = ("pipeline/main.py", "pipeline/preprocess.py", "pipeline/test.py", "pipeline/synthesize.py",
         "pipeline/evaluate.py", "pipeline/export_nnunet.py", "pipeline/prepare_dataset.py",
         "pipeline/convert_checkpoint.py")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return "|".join(map(str, action.choices))
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        return " ".join(metavar)
    shapes = {None: metavar, "?": f"[{metavar}]", "*": f"[{metavar} ...]", "+": f"{metavar} [...]"}
    return shapes.get(action.nargs, f"{metavar} ×{action.nargs}")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default in (None, False, [], argparse.SUPPRESS):
        return ""
    return " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)


def section(script: str) -> str:
    """The ``## `script` `` section: the parser's description and one table row per argument."""
    parser = entry_point_parser(script)
    description = (parser.description or "").strip().split("\n\n")[0].replace("\n", " ").replace("``", "`")
    rows = [f"## `{script}`", "", description, "", "| argument | value | default | what |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._VersionAction):
            rows.append("| `--version` | | | print the version and exit |")
            continue
        names = (", ".join(f"`{flag}`" for flag in action.option_strings) if action.option_strings
                 else f"`{action.metavar or action.dest}` (positional)")
        if action.help == argparse.SUPPRESS:
            rows.append(f"| {names} | | | internal (the benchmark's worker processes) |")
            continue
        rows.append(f"| {names} | {_cell(_value(action))} | {_cell(_default(action))} | {_cell(action.help or '')} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    scripts = list(sys.argv[1:] if argv is None else argv)
    if not scripts:
        known = entry_points()
        scripts = [script for script in FIRST if script in known] + [s for s in known if s not in FIRST]
    print("\n".join(section(script) for script in scripts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

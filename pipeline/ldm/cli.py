"""Pieces every command line shares: ``key.sub=value`` overrides, ``--gpus`` ids, one-line warnings and errors."""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ldm import __version__
from ldm.errors import ConfigError, LesionDiffusionError
from ldm.util import PIPELINE_DIR

OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, and the description and the examples printed as written."""


def examples(*commands: str) -> str:
    """An argparse epilog: ``examples:`` and one indented command per line."""
    return "examples:\n" + "\n".join(f"  {command}" for command in commands)


def add_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` with ``--version``, which prints the one project version (``ldm.__version__``) and exits."""
    parser.add_argument("--version", action="version", version=f"%(prog)s (LesionDiffusion) {__version__}")
    return parser


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(arguments for argparse, key.sub=value overrides)``: overrides may stand anywhere on the command line."""
    overrides = [item for item in argv if OVERRIDE.match(item)]
    return [item for item in argv if not OVERRIDE.match(item)], overrides


def parse_gpus(text: str | None) -> list[int]:
    """GPU ids of ``--gpus``: ``'0,1'`` -> ``[0, 1]``, ``'10,11'`` -> ``[10, 11]`` (ids, not a digit count);
    ``None`` (flag not given) -> ``[]``."""
    if text is None:
        return []
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise ConfigError(f"--gpus {text!r}: expected GPU ids separated by commas, such as 0,1")
    ids = [int(part) for part in parts]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {text!r}: a GPU id is listed twice")
    return ids


def find_config(path: str | Path) -> str:
    """A ``--base``-style config path: as given when it exists from the current directory, else relative to
    ``pipeline/`` (so ``configs/demo/lmnet_test.yaml`` works from the repository root too); ConfigError if neither."""
    given = Path(path).expanduser()
    if given.is_file():
        return str(given.resolve())
    inside = PIPELINE_DIR / given
    if not given.is_absolute() and inside.is_file():
        return str(inside)
    raise ConfigError(f"{path}: config file not found (looked in the current directory and in pipeline/)")


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within the block, warnings raised by this project's code print as one ``warning: ...`` line; warnings of
    third-party libraries keep Python's format."""
    with warnings.catch_warnings():
        library_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if Path(filename).resolve().is_relative_to(PIPELINE_DIR):
                print(f"warning: {message}", file=sys.stderr)
            else:
                library_show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str = "") -> int:
    """``run(args)``'s exit status, with :func:`one_line_warnings`; a LesionDiffusionError prints as one line
    ``[prog: ]error: ...`` and gives status 1 (it is raised instead when ``args.debug`` is set)."""
    with one_line_warnings():
        try:
            return run(args)
        except LesionDiffusionError as error:
            if getattr(args, "debug", False):
                raise
            print(f"{prog + ': ' if prog else ''}error: {error}", file=sys.stderr)
            return 1

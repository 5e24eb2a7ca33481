"""The `unimatch` command: a thin dispatcher over the packages' own command modules.

Each package owns a ``cli`` module with ``register(cli: CommandRegistry) -> None`` that declares its
subcommands and binds each to a handler taking the parsed ``argparse.Namespace``. Handlers import
their heavy dependencies (torch, onnxruntime, hnswlib) lazily, so ``unimatch --help`` is instant
and ``unimatch serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unimatch import __version__

# Modules that contribute commands, in help order, with the top-level commands each one adds. A module
# that is absent from this install is skipped (the slim serving image has no model/ or index_builder/).
# A command line naming a command imports only the modules that add it, so `unimatch serve` loads the
# service and the contracts alone; `unimatch --help` imports them all to list every command.
COMMAND_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model.data.cli", ("data",)),
    ("model.cli", ("train", "eval", "export")),
    ("index_builder.cli", ("index",)),
    ("service.index_cli", ("index",)),
    ("service.cli", ("serve", "features")),
    ("service.bench.cli", ("bench",)),
    ("loadtests.cli", ("loadtest",)),
    ("experiments.cli", ("experiment",)),
)

Handler = Callable[[argparse.Namespace], int | None]


class CommandRegistry:
    """Hands out argparse sub-parsers: top-level commands and two-word groups (``data synth``)."""

    def __init__(self, root: argparse._SubParsersAction) -> None:
        self._root = root
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def command(self, name: str, *, help: str, handler: Handler, description: str | None = None) -> argparse.ArgumentParser:
        parser = self._root.add_parser(
            name, help=help, description=description or help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        parser.set_defaults(handler=handler)
        return parser

    def group_command(
        self, group: str, name: str, *, help: str, handler: Handler, group_help: str = "", description: str | None = None
    ) -> argparse.ArgumentParser:
        if group not in self._groups:
            gp = self._root.add_parser(group, help=group_help or f"{group} commands", description=group_help)
            self._groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="COMMAND", required=True)
        parser = self._groups[group].add_parser(
            name, help=help, description=description or help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        parser.set_defaults(handler=handler)
        return parser


def int_list(text: str, *, positive: bool = False) -> tuple[int, ...]:
    """argparse ``type`` for comma-separated integers ("50,200,1000"); ``positive`` refuses values <= 0."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if positive and min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def check_out_file(out: Path | None, flag: str) -> None:
    """Refuse an unwritable output file before minutes of work, not after (one line, exit 2)."""
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise CliError(f"{flag} {out}: {'is a directory' if out.is_dir() else 'its folder does not exist'}")


def wide_console() -> Any:
    """A rich console; off a terminal rich assumes 80 columns and folds tables into unreadable cells, so
    log lines are wide there."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


class CliError(Exception):
    """Bad input detected by a handler: printed as one line, exit status 2."""


def _modules_for(argv: Sequence[str] | None) -> list[str]:
    """The command modules a command line needs: those adding its command, or all of them."""
    words = [a for a in (argv or ()) if not a.startswith("-")]
    wanted = [m for m, commands in COMMAND_MODULES if words and words[0] in commands]
    return wanted or [m for m, _ in COMMAND_MODULES]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``unimatch`` parser with the commands ``argv`` needs (every command when None or unknown)."""
    parser = argparse.ArgumentParser(
        prog="unimatch",
        description="UniMatch: user in, top-k ads out. Data, training, export, index, search benchmark and service.",
    )
    parser.add_argument("--version", action="version", version=f"unimatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    registry = CommandRegistry(sub)
    for module_name in _modules_for(argv):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # this part is not installed / not written
            raise
        module.register(registry)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        rc = args.handler(args)
    except CliError as exc:
        print(f"unimatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unimatch: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        if _debug():
            raise
        # Domain errors (DatasetError, SchemaError, BundleError ... are ValueErrors): one line, no traceback.
        print(f"unimatch: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, not bad input
        if _debug():
            raise
        # Not the user's fault and not theirs to read as a wall of frames: one line saying so, and the
        # full traceback kept in a file for the bug report.
        report = _save_traceback(exc)
        where = f"; traceback in {report}" if report is not None else ""
        print(
            f"unimatch: internal error: {type(exc).__name__}: {exc}{where} (UNIMATCH_DEBUG=1 shows it here)",
            file=sys.stderr,
        )
        return 1
    return int(rc or 0)


def _debug() -> bool:
    return os.environ.get("UNIMATCH_DEBUG", "").lower() in {"1", "true", "yes"}


def _save_traceback(exc: BaseException) -> Path | None:
    """Write ``exc``'s traceback to a fresh file in the temp directory; None if that fails too."""
    try:
        fd, name = tempfile.mkstemp(prefix="unimatch-error-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"unimatch {__version__}, argv {sys.argv!r}\n")
            fh.write("".join(traceback.format_exception(exc)))
        return Path(name)
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())

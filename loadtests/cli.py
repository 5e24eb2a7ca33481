"""`unimatch loadtest`: the headless Locust run of loadtests/run.py (locust is imported only when it runs)."""

from __future__ import annotations

import argparse

from unimatch.cli import CliError, CommandRegistry


def register(cli: CommandRegistry) -> None:
    p = cli.command(
        "loadtest",
        help="stepped open-loop Locust run against a service, plus the engine alone: markdown report + plot",
        handler=_run,
    )
    from loadtests.run import build_parser

    build_parser(p)


def _run(args: argparse.Namespace) -> int:
    from loadtests.run import run

    try:
        return run(args)
    except RuntimeError as exc:  # locust itself failed: one line, like every other command
        raise CliError(str(exc)) from None

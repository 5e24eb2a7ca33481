"""Shared helpers of the deployment tests (tests/e2e/test_deploy_*.py): paths, tool lookup, and the
check that a command line a container runs is accepted by the real `unimatch` argument parser."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def venv_tool(name: str) -> str:
    """A console script of the running interpreter's environment (hadolint, check-jsonschema ...)."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        pytest.fail(f"{name} is not installed (it is in the `dev` extra of pyproject.toml)")
    return path


def unimatch_argv(command_line: str, env: dict[str, str] | None = None) -> list[str] | None:
    """Split a shell line that runs `unimatch ...` into argv (without `unimatch`); None for other lines.

    `$VAR`, `$$VAR` and `${VAR}` are replaced by ``env[VAR]`` (or a placeholder) so the result can be
    handed to argparse.
    """
    words = shlex.split(command_line.replace("$$", "$"))
    if not words or words[0] != "unimatch":
        return None
    out = []
    for w in words[1:]:
        for key, value in (env or {}).items():
            w = w.replace("${" + key + "}", value).replace("$" + key, value)
        out.append(w)
    return out


def check_cli_argv(argvs: list[list[str]]) -> None:
    """Parse each argv with the real CLI parser (no handler runs): flags and choices must exist.

    Commands whose module is not written yet are skipped with their names, not passed silently.
    """
    from unimatch.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = set(sub.choices)
    missing = sorted({argv[0] for argv in argvs if argv[0] not in known})
    for argv in argvs:
        if argv[0] in known:
            try:
                parser.parse_args(argv)
            except SystemExit as exc:  # argparse reports bad flags by exiting
                pytest.fail(f"`unimatch {' '.join(argv)}` is rejected by the CLI parser (exit {exc.code})")
    if missing:
        pytest.skip(f"CLI commands not registered yet, their flags are unchecked: {missing}")


def torchrun_argv(container: dict[str, Any]) -> list[str]:
    """The `torchrun ...` line of the PyTorchJob container's shell script, split into words."""
    assert container["command"] == ["/bin/sh", "-ec"], container["command"]
    (line,) = [x.strip() for x in container["args"][0].splitlines() if x.strip().startswith("torchrun ")]
    return shlex.split(line)


def declared_metrics() -> set[str]:
    """Every metric family service/metrics.py declares, read from its source (no import, no registry)."""
    text = (ROOT / "service/metrics.py").read_text()
    declared = set(re.findall(r'(?:Histogram|Counter|Gauge)\(\s*"(unimatch_[a-z_]+)"', text))
    assert declared, "no metric declarations found in service/metrics.py"
    return declared

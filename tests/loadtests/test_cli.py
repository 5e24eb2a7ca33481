"""`unimatch loadtest` is registered, shares the runner's flags and rejects bad input with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.run import main
from unimatch.cli import build_parser
from unimatch.cli import main as unimatch_main


def test_loadtest_command_is_registered() -> None:
    args = build_parser().parse_args(
        ["loadtest", "--host", "http://h:1", "--users-file", "u.txt", "--steps", "5,10", "--step-seconds", "30"]
    )
    assert (args.steps, args.step_seconds, args.warmup, args.user_rate) == ("5,10", 30.0, 5.0, 1.0)
    assert args.out == Path("docs/loadtest")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bundle", "b"], "--bundle and --data go together"),
        (["--step-seconds", "3", "--warmup", "5"], "--step-seconds must exceed --warmup"),
        ([], "not found"),
        (["--users-file", __file__], "does not answer"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    argv = ["--host", "http://127.0.0.1:9", "--users-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert unimatch_main(["loadtest", *argv]) == 2

"""How `unimatch` reports failures: bad input in one line (2), a bug in one line plus a saved traceback (1)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from unimatch import cli


def _parser_raising(exc: BaseException) -> argparse.ArgumentParser:
    def handler(args: argparse.Namespace) -> int:
        raise exc

    parser = argparse.ArgumentParser(prog="unimatch")
    parser.set_defaults(handler=handler)
    return parser


def test_bad_input_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "build_parser", lambda argv=None: _parser_raising(ValueError("--k must be > 0")))
    assert cli.main([]) == 2
    assert capsys.readouterr().err == "unimatch: error: --k must be > 0\n"


def test_unexpected_error_is_one_line_with_the_traceback_saved(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(cli.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("UNIMATCH_DEBUG", raising=False)
    monkeypatch.setattr(cli, "build_parser", lambda argv=None: _parser_raising(RuntimeError("onnxruntime said no")))
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("unimatch: internal error: RuntimeError: onnxruntime said no; traceback in ")
    saved = list(tmp_path.glob("unimatch-error-*.log"))
    assert len(saved) == 1 and str(saved[0]) in err
    text = saved[0].read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: onnxruntime said no" in text


def test_debug_lets_the_exception_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIMATCH_DEBUG", "1")
    monkeypatch.setattr(cli, "build_parser", lambda argv=None: _parser_raising(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main([])

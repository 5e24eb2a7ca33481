"""`--out` never deletes what unimatch did not write (`data synth` once deleted a user's file given as --out).

A missing or empty directory is written; an earlier output of ours (its manifest is there) is replaced
only with ``--force``; a directory with any other files is refused, ``--force`` or not, before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.io import OutputDirError, atomic_directory, check_output_dir, is_ours
from unimatch.cli import main


def _foreign(tmp_path: Path, name: str = "mine") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "notes.txt").write_text("precious\n")
    return d


def test_synth_refuses_a_foreign_directory_even_with_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _foreign(tmp_path)
    for extra in ([], ["--force"]):
        assert main(["data", "synth", "--out", str(d), "--preset", "tiny", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not written by unimatch" in err
    assert (d / "notes.txt").read_text() == "precious\n"
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_synth_replaces_its_own_output_only_with_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(out), "--preset", "tiny", "--seed", "1"]) == 0
    before = json.loads((out / "dataset.json").read_text())
    assert main(["data", "synth", "--out", str(out), "--preset", "tiny", "--seed", "2"]) == 2
    assert "--force" in capsys.readouterr().err
    assert json.loads((out / "dataset.json").read_text()) == before  # untouched
    assert main(["data", "synth", "--out", str(out), "--preset", "tiny", "--seed", "2", "--force"]) == 0
    assert json.loads((out / "dataset.json").read_text())["files"] != before["files"]


def test_empty_directory_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["data", "synth", "--out", str(out), "--preset", "tiny"]) == 0
    assert (out / "dataset.json").is_file()


def test_import_and_export_and_train_refuse_foreign_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _foreign(tmp_path)
    mapping = tmp_path / "mapping.json"
    mapping.write_text("{}")
    # each refusal must come before the command reads its inputs (which here do not even exist)
    assert main(["data", "import", "--mapping", str(mapping), "--out", str(d), "--force"]) == 2
    assert "not written by unimatch" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "no-run"), "--out", str(d), "--force"]) == 2
    assert "not written by unimatch" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "no-data"), "--method", "dnn", "--out", str(d)]) == 2
    assert "not a unimatch run" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_a_foreign_manifest_does_not_make_a_directory_ours(tmp_path: Path) -> None:
    d = _foreign(tmp_path)
    (d / "dataset.json").write_text('{"name": "my own thing"}')
    assert not is_ours(d, "dataset.json")
    (d / "dataset.json").write_text("not json")
    assert not is_ours(d, "dataset.json")
    with pytest.raises(OutputDirError, match="not written by unimatch"):
        check_output_dir(d, marker="dataset.json", force=True)


def test_symlink_and_file_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OutputDirError, match="symbolic link"):
        check_output_dir(link, marker="dataset.json", force=True)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputDirError, match="not a directory"):
        check_output_dir(f, marker="dataset.json", force=True)


def test_atomic_directory_rechecks_before_the_swap(tmp_path: Path) -> None:
    """Files that appear in ``final`` while the work runs are not deleted by the swap."""
    final = tmp_path / "out"
    with pytest.raises(OutputDirError):
        with atomic_directory(final, marker="dataset.json") as tmp:
            (tmp / "dataset.json").write_text('{"format_version": 1}')
            final.mkdir()
            (final / "theirs.txt").write_text("keep")
    assert (final / "theirs.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging directory is gone


def test_atomic_directory_replaces_ours(tmp_path: Path) -> None:
    final = tmp_path / "out"
    for generation in ("1", "2"):
        with atomic_directory(final, marker="dataset.json") as tmp:
            (tmp / "dataset.json").write_text(json.dumps({"format_version": 1, "gen": generation}))
    assert json.loads((final / "dataset.json").read_text())["gen"] == "2"

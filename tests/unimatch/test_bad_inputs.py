"""A broken bundle or a bad dataset given to any command: one line on stderr, exit 2, no traceback.

Each command is run in-process (``unimatch.cli.main`` or the runner's own ``main``) on the same three
bad inputs: a bundle with a truncated graph file (its checksum no longer matches), a directory that
is not a bundle, and a directory that is not a dataset. Nothing here needs a service or Redis: the
runners must refuse before they start one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    good = make_fake_bundle(root / "bundle", num_entities=400)
    data = make_fake_dataset(root / "data", good, num_users=60)
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    layer0 = truncated / "graph" / "layer0_neighbors.npy"
    layer0.write_bytes(layer0.read_bytes()[:100])
    (root / "not-a-bundle").mkdir()
    (root / "not-a-bundle" / "notes.txt").write_text("a user's file\n")
    (root / "not-a-dataset").mkdir()
    return {"bundle": good, "data": data, "truncated": truncated, "not-a-bundle": root / "not-a-bundle",
            "not-a-dataset": root / "not-a-dataset", "root": root}


def _unimatch(argv: list[str]) -> int:
    from unimatch.cli import main

    return main(argv)


def _loadtests_run(argv: list[str]) -> int:
    from loadtests.run import main

    return main(argv)


def _chaos(argv: list[str]) -> int:
    from loadtests.chaos import main

    return main(argv)


Runner = Callable[[list[str]], int]
# (name, runner, argv template): BUNDLE / DATA are replaced by the bad input under test, OUT by a fresh path
COMMANDS: list[tuple[str, Runner, list[str]]] = [
    ("bench search", _unimatch, ["bench", "search", "--bundle", "BUNDLE", "--data", "DATA", "--users", "5", "--no-sweep"]),
    ("loadtest", _unimatch, ["loadtest", "--host", "http://127.0.0.1:9", "--users-file", "DATA", "--bundle", "BUNDLE",
                             "--data", "DATA", "--out", "OUT"]),
    ("loadtests.run", _loadtests_run, ["--host", "http://127.0.0.1:9", "--users-file", "DATA", "--bundle", "BUNDLE",
                                       "--data", "DATA", "--out", "OUT"]),
    ("chaos", _chaos, ["--bundle", "BUNDLE", "--data", "DATA", "--seconds", "1"]),
    ("index calibrate", _unimatch, ["index", "calibrate", "--bundle", "BUNDLE", "--data", "DATA"]),
    ("serve", _unimatch, ["serve", "--bundle", "BUNDLE", "--data", "DATA", "--port", "9"]),
]
BAD = [("truncated", "data"), ("not-a-bundle", "data"), ("bundle", "not-a-dataset")]


@pytest.mark.parametrize(("bundle_key", "data_key"), BAD)
@pytest.mark.parametrize(("name", "runner", "template"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_bad_bundle_or_dataset_is_one_line_and_exit_2(
    name: str, runner: Runner, template: list[str], bundle_key: str, data_key: str, inputs: dict[str, Path],
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    if name == "serve" and data_key == "not-a-dataset":
        pytest.skip("serve reads --data only for the embedded store, after the bundle")
    monkeypatch.delenv("UNIMATCH_DEBUG", raising=False)
    subst = {"BUNDLE": str(inputs[bundle_key]), "DATA": str(inputs[data_key]), "OUT": str(tmp_path / "out")}
    argv = [subst.get(a, a) for a in template]
    rc = runner(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (name, err)
    assert len(lines) == 1 and "Traceback" not in err, (name, err)
    bad = inputs[bundle_key] if bundle_key != "bundle" else inputs[data_key]
    assert str(bad) in lines[0], (name, lines[0])  # names the input at fault
    assert (inputs["not-a-bundle"] / "notes.txt").read_text() == "a user's file\n"  # untouched


def test_features_load_bad_dataset_is_one_line(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _unimatch(["features", "load", "--data", str(inputs["not-a-dataset"]), "--redis-url", "redis://127.0.0.1:9/15"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(inputs["not-a-dataset"]) in err

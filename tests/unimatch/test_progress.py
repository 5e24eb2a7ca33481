"""Progress off a terminal (unimatch/progress.py): periodic plain lines, never a bar's carriage returns.

pytest's captured stderr is not a terminal, so the commands here take the log-line path.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import pytest

from unimatch.progress import LineProgress, progress, working


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_at_most_every_interval_first_and_last_always() -> None:
    out, clock = io.StringIO(), Clock()
    lines = LineProgress("index build", 1000, interval_s=10.0, stream=out, clock=clock, unit="vectors")
    for done in range(0, 1001, 50):  # 20 updates, one per second
        lines(done)
        clock.t += 1.0
    text = out.getvalue().splitlines()
    assert len(text) == 3, text  # the first, one ten seconds later, the last
    assert text[0].startswith("index build 0/1,000 vectors (0%")
    assert text[-1].startswith("index build 1,000/1,000 vectors (100%")
    assert "~" in text[1] and "left" in text[1]  # an estimate of the time left while running
    lines.emit()
    assert len(out.getvalue().splitlines()) == 3  # the same state is not printed twice


def test_a_new_stage_prints_at_once() -> None:
    out, clock = io.StringIO(), Clock()
    lines = LineProgress("index build", stream=out, clock=clock, interval_s=60.0)
    lines(10, 100, stage="inserting vectors")
    lines(20, 100, stage="inserting vectors")
    lines(1, 5, stage="health check")
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "index build: inserting vectors 10/100", "index build: health check 1/5"]


def test_a_stage_of_unknown_length_shows_no_total_of_the_stage_before() -> None:
    out, clock = io.StringIO(), Clock()
    lines = LineProgress("calibrating", stream=out, clock=clock, interval_s=60.0)
    lines(500, 500, stage="exhaustive reference")
    lines(3, 0, stage="phone k=200: search point 3")  # what `unimatch index calibrate` passes: total 0
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("calibrating: phone k=200: search point 3 3 (") and "/500" not in last and "left" not in last


def test_progress_off_a_terminal_is_lines_and_disabled_is_silent() -> None:
    out = io.StringIO()
    with progress("features load", 3, stream=out) as update:
        for i in range(1, 4):
            update(i)
    assert "\r" not in out.getvalue() and "features load 3/3" in out.getvalue()
    quiet = io.StringIO()
    with progress("features load", 3, stream=quiet, enabled=False) as update:
        update(3)
    assert quiet.getvalue() == ""


def test_working_beats_while_the_step_runs() -> None:
    out = io.StringIO()
    with working("export: run -> bundle", stream=out, interval_s=0.02):
        time.sleep(0.15)
    text = out.getvalue().splitlines()
    assert text[0].startswith("export: run -> bundle: still running (")
    assert text[-1].startswith("export: run -> bundle: done after")
    quick = io.StringIO()
    with working("export: run -> bundle", stream=quick, interval_s=10.0):
        pass
    assert quick.getvalue() == ""  # shorter than one interval: nothing (a bad input stays one line)


def test_data_synth_prints_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from unimatch.cli import main

    monkeypatch.setenv("UNIMATCH_PROGRESS_EVERY_S", "0")
    assert main(["data", "synth", "--preset", "tiny", "--out", str(tmp_path / "ds")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("data synth tiny")]
    assert lines and "users" in lines[-1] and "(100%" in lines[-1], err
    assert "\r" not in err


def test_index_build_prints_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures.fake_bundle import make_fake_bundle
    from unimatch.cli import main

    bundle = make_fake_bundle(tmp_path / "bundle", num_entities=3000, with_graph=False)
    monkeypatch.setenv("UNIMATCH_PROGRESS_EVERY_S", "0")
    assert main(["index", "build", "--bundle", str(bundle)]) == 0
    err = capsys.readouterr().err
    assert "index build: inserting vectors" in err and "/3,000" in err, err
    assert "\r" not in err


def test_features_load_prints_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset
    from unimatch.cli import main

    bundle = make_fake_bundle(tmp_path / "bundle", num_entities=300)
    data = make_fake_dataset(tmp_path / "data", bundle, num_users=120)
    monkeypatch.setenv("UNIMATCH_PROGRESS_EVERY_S", "0")
    import redis

    url, prefix = "redis://127.0.0.1:6379/13", f"progress-test-{tmp_path.name}"
    try:
        rc = main(["features", "load", "--data", str(data), "--redis-url", url, "--chunk", "50", "--prefix", prefix])
        err = capsys.readouterr().err
    finally:  # the keys this test wrote, and only those
        with contextlib.suppress(redis.exceptions.ConnectionError):
            client = redis.Redis.from_url(url)
            for key in client.scan_iter(f"{prefix}:*"):
                client.delete(key)
    if rc == 2 and "cannot reach Redis" in err:
        pytest.skip("no Redis on 127.0.0.1:6379")
    assert rc == 0
    lines = [line for line in err.splitlines() if line.startswith("features load")]
    assert lines and lines[-1].startswith("features load 120/120 users"), err
